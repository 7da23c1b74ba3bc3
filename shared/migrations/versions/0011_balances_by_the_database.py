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

Entries are written whole: all of a transaction's in one statement, never added to later, each on
the transaction's own account (or a transfer's counterparty), summing to its amount in the
bucket its kind moves (the view ``ledger_misshapen``, which ``openacct ledger verify`` reads too).
So a login that may write ledger rows cannot move a charge to another account nor cancel one.

Upgrading: stop the workers first. Workers of before this revision add to the running totals
themselves; a write to account_balances that does not come from the ledger's trigger is refused
(for any login but a superuser), so they fail loudly rather than count twice.
"""

from alembic import op

revision = '0011'
down_revision = '0010'
branch_labels = None
depends_on = None

# pg_temp last: a login may create temporary tables, which must never stand in for ours.
SAFE_PATH = "SET search_path = public, pg_temp"
# A trigger function of the owner's, SECURITY DEFINER, must do its work for its own table only:
# anyone may create a trigger on a temporary table of theirs that calls it.
ONLY_ON = "IF TG_RELID <> 'public.{table}'::regclass THEN RAISE EXCEPTION '% guards {table} only', TG_NAME; END IF;"

# One upsert per (account, allocation) in a fixed order (the one the ledger locks in), after each
# statement that inserts entries: a batch of charges costs one statement, as it did in Python.
POST = f"""
CREATE FUNCTION openacct_post_entries() RETURNS trigger LANGUAGE plpgsql SECURITY DEFINER {SAFE_PATH} AS $$
BEGIN
    {ONLY_ON.format(table="ledger_entries")}
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

# What no application role may write but the trigger above (pg_trigger_depth 2: a statement of a
# trigger's). A superuser may: it could drop the trigger anyway, and the tests break rows on purpose.
BALANCES_GUARD = """
CREATE FUNCTION openacct_balances_by_trigger() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF pg_trigger_depth() < 2 AND NOT (SELECT rolsuper FROM pg_roles WHERE rolname = current_user) THEN
        RAISE EXCEPTION 'account_balances are added up from the ledger entries; % refused (workers of an older '
                        'OpenAcct still running?)', TG_OP USING ERRCODE = 'insufficient_privilege';
    END IF;
    RETURN NULL;
END $$
"""

# The shape each kind of transaction gives its entries. A transaction with no entries yet (one
# being written) is not misshapen; one whose entries break its kind's rule is, and so is an entry
# whose transaction does not exist.
MISSHAPEN = """
CREATE VIEW ledger_misshapen AS
SELECT t.id AS transaction_id, t.kind,
       CASE WHEN NOT s.own THEN 'an entry is on another account than the transaction''s'
            ELSE 'its entries do not add up to its amount in the bucket its kind moves' END AS problem
  FROM public.ledger_transactions t
  CROSS JOIN LATERAL (
      SELECT count(*) AS entries,
             bool_and(e.account_id IN (t.account_id, t.counterparty_account_id)) AS own,
             count(DISTINCT e.bucket) AS buckets, min(e.bucket) AS bucket, sum(e.amount) AS total,
             sum(e.amount) FILTER (WHERE e.account_id = t.account_id) AS from_account,
             sum(e.amount) FILTER (WHERE e.account_id = t.counterparty_account_id) AS to_counterparty
        FROM public.ledger_entries e WHERE e.transaction_id = t.id) s
 WHERE s.entries > 0 AND NOT (s.own AND s.buckets = 1 AND CASE t.kind
           WHEN 'deposit' THEN s.bucket = 'allocated' AND s.total = t.amount
           WHEN 'charge' THEN s.bucket = 'charged' AND s.total = t.amount
           WHEN 'refund' THEN s.bucket = 'refunded' AND s.total = t.amount
           WHEN 'hold' THEN s.bucket = 'held' AND s.total = t.amount
           WHEN 'release' THEN s.bucket = 'held' AND s.total = -t.amount
           WHEN 'adjustment' THEN s.bucket IN ('allocated', 'charged') AND abs(s.total) = t.amount
           WHEN 'transfer' THEN s.bucket = 'allocated' AND t.counterparty_account_id <> t.account_id
                                AND s.from_account = -t.amount AND s.to_counterparty = t.amount
           ELSE false END)
UNION ALL
SELECT e.transaction_id, NULL, 'an entry of a transaction that does not exist'
  FROM public.ledger_entries e
 WHERE NOT EXISTS (SELECT FROM public.ledger_transactions t WHERE t.id = e.transaction_id)
"""
WHOLE = f"""
CREATE FUNCTION openacct_entries_whole() RETURNS trigger LANGUAGE plpgsql SECURITY DEFINER {SAFE_PATH} AS $$
DECLARE
    bad record;
    touched bigint[];
BEGIN
    {ONLY_ON.format(table="ledger_entries")}
    SELECT n.transaction_id, 'entries were added to it after it was written' AS problem INTO bad
      FROM (SELECT transaction_id, count(*) AS written FROM added GROUP BY transaction_id) n
     WHERE n.written <> (SELECT count(*) FROM public.ledger_entries e WHERE e.transaction_id = n.transaction_id)
     LIMIT 1;
    IF NOT FOUND THEN
        -- An array, not a join with `added`: the condition then reaches into the view, which
        -- reads these transactions by their keys instead of the whole ledger.
        SELECT array_agg(DISTINCT transaction_id) INTO touched FROM added;
        SELECT m.transaction_id, m.problem INTO bad FROM public.ledger_misshapen m
         WHERE m.transaction_id = ANY(touched) LIMIT 1;
    END IF;
    IF FOUND THEN
        RAISE EXCEPTION 'ledger refused: transaction #%: %', bad.transaction_id, bad.problem
            USING ERRCODE = 'check_violation';
    END IF;
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

# Grants of before this revision, which `openacct db roles` gave and would give no more.
OLD_GRANTS = """
DO $$ BEGIN
    IF EXISTS (SELECT FROM pg_roles WHERE rolname = 'openacct_charger') THEN
        REVOKE INSERT, UPDATE, DELETE ON account_balances FROM openacct_charger;
        REVOKE UPDATE ON accounts FROM openacct_charger;
    END IF;
    IF EXISTS (SELECT FROM pg_roles WHERE rolname = 'openacct_admin') THEN
        REVOKE INSERT, UPDATE, DELETE ON account_balances FROM openacct_admin;
    END IF;
END $$
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
    op.execute(MISSHAPEN)
    op.execute(WHOLE)
    # Triggers of one event fire in name order: the entries are checked before they are added up.
    op.execute("CREATE TRIGGER ledger_entries_checked_whole AFTER INSERT ON ledger_entries "
               "REFERENCING NEW TABLE AS added FOR EACH STATEMENT EXECUTE FUNCTION openacct_entries_whole()")
    op.execute(POST)
    op.execute("CREATE TRIGGER ledger_entries_post AFTER INSERT ON ledger_entries "
               "REFERENCING NEW TABLE AS added FOR EACH STATEMENT EXECUTE FUNCTION openacct_post_entries()")
    op.execute(BALANCES_GUARD)
    op.execute("CREATE TRIGGER account_balances_by_trigger BEFORE INSERT OR UPDATE OR DELETE ON account_balances "
               "FOR EACH STATEMENT EXECUTE FUNCTION openacct_balances_by_trigger()")
    op.execute(LOCK)
    op.execute(NO_TRUNCATE)
    for table in GUARDED:
        op.execute(f"CREATE TRIGGER {table}_no_truncate BEFORE TRUNCATE ON {table} "
                   "FOR EACH STATEMENT EXECUTE FUNCTION openacct_no_truncate()")
    # Nobody calls these but their triggers, and the lock only those `openacct db roles` lets.
    for function in ("openacct_post_entries()", "openacct_entries_whole()", "openacct_lock_accounts(integer[])"):
        op.execute(f"REVOKE ALL ON FUNCTION {function} FROM PUBLIC")
    # The one function of earlier revisions that names tables runs as the caller: ours, not a
    # temporary table of the caller's, must be what it checks references against.
    op.execute(f"ALTER FUNCTION openacct_check_references() {SAFE_PATH}")
    op.execute(OLD_GRANTS)


def downgrade() -> None:
    op.execute("ALTER FUNCTION openacct_check_references() RESET search_path")
    for table in GUARDED:
        op.execute(f"DROP TRIGGER {table}_no_truncate ON {table}")
    op.execute("DROP FUNCTION openacct_no_truncate()")
    op.execute("DROP FUNCTION openacct_lock_accounts(integer[])")
    op.execute("DROP TRIGGER account_balances_by_trigger ON account_balances")
    op.execute("DROP FUNCTION openacct_balances_by_trigger()")
    op.execute("DROP TRIGGER ledger_entries_post ON ledger_entries")
    op.execute("DROP FUNCTION openacct_post_entries()")
    op.execute("DROP TRIGGER ledger_entries_checked_whole ON ledger_entries")
    op.execute("DROP FUNCTION openacct_entries_whole()")
    op.execute("DROP VIEW ledger_misshapen")
