"""balances kept by the database: no application role writes a running total or locks an account itself

Revision ID: 0011
Revises: 0010
Create Date: 2026-12-06

The running totals in account_balances are now added up from the ledger entries by a trigger
that runs as the tables' owner, so an application role needs no INSERT or UPDATE on them (and an
intruder with its login cannot add a million to a project: only a ledger entry moves money, and
entries are append-only history). Account locks are taken the same way, so that the workers need
no UPDATE on accounts either. TRUNCATE of the ledger, which neither row triggers nor privileges
held by the owner stop, is refused outright.
"""

from alembic import op

revision = '0011'
down_revision = '0010'
branch_labels = None
depends_on = None

# pg_temp last: a login may create temporary tables, which must never stand in for ours.
SAFE_PATH = "SET search_path = public, pg_temp"

# One upsert per (account, allocation) in a fixed order (the one the ledger locks in), after each
# statement that inserts entries: a batch of charges costs one statement, as it did in Python.
POST = f"""
CREATE FUNCTION openacct_post_entries() RETURNS trigger LANGUAGE plpgsql SECURITY DEFINER {SAFE_PATH} AS $$
BEGIN
    INSERT INTO public.account_balances AS b (account_id, allocation_id, allocated, charged, refunded, held)
    SELECT account_id, allocation_id,
           coalesce(sum(amount) FILTER (WHERE bucket = 'allocated'), 0),
           coalesce(sum(amount) FILTER (WHERE bucket = 'charged'), 0),
           coalesce(sum(amount) FILTER (WHERE bucket = 'refunded'), 0),
           coalesce(sum(amount) FILTER (WHERE bucket = 'held'), 0)
      FROM added
     GROUP BY account_id, allocation_id
     ORDER BY account_id, allocation_id NULLS FIRST
    ON CONFLICT (account_id, allocation_id) DO UPDATE
       SET allocated = b.allocated + excluded.allocated,
           charged = b.charged + excluded.charged,
           refunded = b.refunded + excluded.refunded,
           held = b.held + excluded.held;
    RETURN NULL;
END $$
"""

# FOR NO KEY UPDATE needs UPDATE on the table; a row lock belongs to the transaction, not to the
# role that took it, so the owner takes it for the caller.
LOCK = f"""
CREATE FUNCTION openacct_lock_accounts(ids integer[]) RETURNS void LANGUAGE sql SECURITY DEFINER {SAFE_PATH} AS $$
    SELECT 1 FROM public.accounts WHERE id = ANY(ids) ORDER BY id FOR NO KEY UPDATE
$$
"""

NO_TRUNCATE = """
CREATE FUNCTION openacct_no_truncate() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    RAISE EXCEPTION 'ledger table % cannot be truncated: its history is the accounts'' money', TG_TABLE_NAME
        USING ERRCODE = 'insufficient_privilege';
END $$
"""
GUARDED = ("ledger_transactions", "ledger_entries", "account_balances")


def upgrade() -> None:
    op.execute(POST)
    op.execute("CREATE TRIGGER ledger_entries_post AFTER INSERT ON ledger_entries "
               "REFERENCING NEW TABLE AS added FOR EACH STATEMENT EXECUTE FUNCTION openacct_post_entries()")
    op.execute(LOCK)
    op.execute(NO_TRUNCATE)
    for table in GUARDED:
        op.execute(f"CREATE TRIGGER {table}_no_truncate BEFORE TRUNCATE ON {table} "
                   "FOR EACH STATEMENT EXECUTE FUNCTION openacct_no_truncate()")


def downgrade() -> None:
    for table in GUARDED:
        op.execute(f"DROP TRIGGER {table}_no_truncate ON {table}")
    op.execute("DROP FUNCTION openacct_no_truncate()")
    op.execute("DROP FUNCTION openacct_lock_accounts(integer[])")
    op.execute("DROP TRIGGER ledger_entries_post ON ledger_entries")
    op.execute("DROP FUNCTION openacct_post_entries()")
