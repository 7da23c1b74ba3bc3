"""the rules money obeys, checked on every running total written

Revision ID: 0009
Revises: 0008
Create Date: 2026-12-06

Checked after each statement on the rows it wrote (a CHECK constraint would see an upsert's
increment, not the total it makes). A row that broke a rule before this migration (the bugs it
came with) is not held against later writes that leave it no worse, so that its account keeps
working while an administrator repairs it: `openacct ledger verify` names it.
"""

from alembic import op

revision = '0009'
down_revision = '0008'
branch_labels = None
depends_on = None

# How far a running total is past each rule (0: within it).
BREACHES = """
CREATE FUNCTION openacct_balance_breaches(allocation_id integer, allocated numeric, charged numeric,
                                          refunded numeric, held numeric)
RETURNS TABLE (rule text, amount numeric) LANGUAGE sql IMMUTABLE AS $$
    VALUES ('held money is below zero', greatest(-held, 0)),
           ('the row of what no allocation covered would be positive',
            CASE WHEN allocation_id IS NULL THEN greatest(refunded - charged, 0) ELSE 0 END),
           ('the row of what no allocation covered holds no allocated money',
            CASE WHEN allocation_id IS NULL THEN abs(allocated) ELSE 0 END),
           ('the allocation would hold more than was put into it',
            CASE WHEN allocation_id IS NOT NULL THEN greatest(refunded - charged, 0) ELSE 0 END),
           ('the allocation would have less than nothing left',
            CASE WHEN allocation_id IS NOT NULL THEN greatest(charged - refunded - allocated, 0) ELSE 0 END)
$$
"""
CHECK = """
CREATE FUNCTION openacct_balance_rules_{op}() RETURNS trigger LANGUAGE plpgsql AS $$
DECLARE
    bad record;
BEGIN
    SELECT n.account_id, n.allocation_id, n.allocated, n.charged, n.refunded, n.held, b.rule
      INTO bad
      FROM {rows}
     WHERE {worse}
     LIMIT 1;
    IF FOUND THEN
        RAISE EXCEPTION 'ledger refused: % (account #%, allocation #%: allocated %, charged %, refunded %, held %)',
            bad.rule, bad.account_id, coalesce(bad.allocation_id::text, 'none'), bad.allocated, bad.charged,
            bad.refunded, bad.held
            USING ERRCODE = 'check_violation';
    END IF;
    RETURN NULL;
END $$
"""
NEW = "changed n CROSS JOIN openacct_balance_breaches(n.allocation_id, n.allocated, n.charged, n.refunded, n.held) b"
OLD = "openacct_balance_breaches(o.allocation_id, o.allocated, o.charged, o.refunded, o.held) ob"
# On an insert, any breach; on an update, a breach anew or further than the row was already past it.
TRIGGERS = {
    "insert": (NEW, "b.amount > 0", "NEW TABLE AS changed"),
    "update": (f"{NEW} JOIN before o ON o.id = n.id CROSS JOIN {OLD}", "ob.rule = b.rule AND b.amount > ob.amount",
               "OLD TABLE AS before NEW TABLE AS changed"),
}


def upgrade() -> None:
    op.execute(BREACHES)
    for event, (rows, worse, tables) in TRIGGERS.items():
        op.execute(CHECK.format(op=event, rows=rows, worse=worse))
        op.execute(f"CREATE TRIGGER account_balances_rules_{event} AFTER {event.upper()} ON account_balances "
                   f"REFERENCING {tables} FOR EACH STATEMENT EXECUTE FUNCTION openacct_balance_rules_{event}()")


def downgrade() -> None:
    for event in TRIGGERS:
        op.execute(f"DROP TRIGGER account_balances_rules_{event} ON account_balances")
        op.execute(f"DROP FUNCTION openacct_balance_rules_{event}()")
    op.execute("DROP FUNCTION openacct_balance_breaches(integer, numeric, numeric, numeric, numeric)")
