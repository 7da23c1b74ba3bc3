"""the rules money obeys, checked on every running total written

Revision ID: 0009
Revises: 0008
Create Date: 2026-12-06

Checked after each statement on the rows it wrote (a CHECK constraint would see an upsert's
increment, not the total it makes). Rows written before are not checked here: ``openacct ledger
verify`` names any that break a rule.
"""

from alembic import op

revision = '0009'
down_revision = '0008'
branch_labels = None
depends_on = None

FUNCTION = """
CREATE FUNCTION openacct_balance_rules() RETURNS trigger LANGUAGE plpgsql AS $$
DECLARE
    bad record;
BEGIN
    SELECT account_id, allocation_id, allocated, charged, refunded, held,
           CASE WHEN held < 0 THEN 'held money is below zero'
                WHEN refunded > charged AND allocation_id IS NULL
                    THEN 'the row of what no allocation covered would be positive'
                WHEN refunded > charged THEN 'the allocation would hold more than was put into it'
                WHEN allocation_id IS NULL THEN 'the row of what no allocation covered holds no allocated money'
                ELSE 'the allocation would have less than nothing left' END AS broken
      INTO bad
      FROM changed
     WHERE NOT (refunded <= charged AND held >= 0
                AND (allocation_id IS NULL OR allocated - charged + refunded >= 0)
                AND (allocation_id IS NOT NULL OR allocated = 0))
     LIMIT 1;
    IF FOUND THEN
        RAISE EXCEPTION 'ledger refused: % (account #%, allocation #%: allocated %, charged %, refunded %, held %)',
            bad.broken, bad.account_id, coalesce(bad.allocation_id::text, 'none'), bad.allocated, bad.charged,
            bad.refunded, bad.held
            USING ERRCODE = 'check_violation';
    END IF;
    RETURN NULL;
END $$
"""


def upgrade() -> None:
    op.execute(FUNCTION)
    for event in ("INSERT", "UPDATE"):
        op.execute(f"CREATE TRIGGER account_balances_rules_{event.lower()} AFTER {event} ON account_balances "
                   "REFERENCING NEW TABLE AS changed FOR EACH STATEMENT EXECUTE FUNCTION openacct_balance_rules()")


def downgrade() -> None:
    for event in ("INSERT", "UPDATE"):
        op.execute(f"DROP TRIGGER account_balances_rules_{event.lower()} ON account_balances")
    op.execute("DROP FUNCTION openacct_balance_rules()")
