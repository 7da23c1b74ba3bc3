"""a transaction's shape checked from the statement's own entries, and unknown counts as wrong

Revision ID: 0017
Revises: 0016
Create Date: 2026-12-06

Two faults of migration 0011's shape rule (the view ``ledger_misshapen``, which the entries'
trigger and ``openacct ledger verify`` read), and one scan that grew with the jobs table:

- **A NULL let a misshapen transaction through.** The rule was ``NOT (own AND … )``, and SQL's
  unknown is neither true nor false: a charge of account A with its entry on account B (no
  counterparty, so ``B IN (A, NULL)`` is unknown, which ``bool_and`` skips) was taken by the
  database and passed ``ledger verify``; so was a transfer whose entries all sat on the
  counterparty (``sum(...) FILTER`` of no rows is NULL): money made from nothing. A login allowed
  to write ledger rows could do either. Now every test is made true or false (``coalesce``): what
  the rule cannot show to be right is wrong.
- **The check probed the ledger per transaction.** The trigger read the view for the statement's
  transactions, one lateral probe of their entries each: 32 ms of a charger batch of 5,000
  (EXPLAIN ANALYZE, 2026-12-06). The whole-check before it proves that a touched transaction's
  entries are all in the statement, so the shape is now worked out from the statement's own rows,
  in one pass. ``SHAPE`` and ``PROBLEM`` below are the one text of the rule, which the view and
  the trigger both use.
- **Refused runs were looked up by scanning the system's jobs.** The charger asks, every batch,
  which of its jobs admission control refused (``shared.rating.jobs.refused_runs``): with no index
  on the policy, PostgreSQL read every job of the system. A partial index holds the refused runs
  only, so each batch reads a few rows whatever the size of the jobs table.
"""

from alembic import op

from shared.migrate import earlier_revision

revision = '0017'
down_revision = '0016'
branch_labels = None
depends_on = None

SAFE_PATH = "SET search_path = public, pg_temp"
ONLY_ON = ("IF TG_RELID <> 'public.ledger_entries'::regclass THEN "
           "RAISE EXCEPTION '% guards ledger_entries only', TG_NAME; END IF;")

# What a transaction `t` and its entries `e` add up to, grouped by the transaction. Every test
# below is true or false, never unknown: an entry on an account that is neither of the
# transaction's is not its own even where the counterparty is NULL.
SHAPE = """t.kind, t.amount,
           coalesce(t.counterparty_account_id <> t.account_id, false) AS two_accounts,
           count(*) AS entries,
           bool_and(coalesce(e.account_id = t.account_id OR e.account_id = t.counterparty_account_id, false)) AS own,
           count(DISTINCT e.bucket) AS buckets, min(e.bucket) AS bucket, sum(e.amount) AS total,
           sum(e.amount) FILTER (WHERE e.account_id = t.account_id) AS from_account,
           sum(e.amount) FILTER (WHERE e.account_id = t.counterparty_account_id) AS to_counterparty"""
# The rule each kind's entries obey, over SHAPE's columns (`s`): NULL where they do, else why not.
PROBLEM = """CASE WHEN NOT s.own THEN 'an entry is on another account than the transaction''s'
            WHEN coalesce(s.buckets = 1 AND CASE s.kind
                WHEN 'deposit' THEN s.bucket = 'allocated' AND s.total = s.amount
                WHEN 'charge' THEN s.bucket = 'charged' AND s.total = s.amount
                WHEN 'refund' THEN s.bucket = 'refunded' AND s.total = s.amount
                WHEN 'hold' THEN s.bucket = 'held' AND s.total = s.amount
                WHEN 'release' THEN s.bucket = 'held' AND s.total = -s.amount
                WHEN 'adjustment' THEN s.bucket IN ('allocated', 'charged') AND abs(s.total) = s.amount
                WHEN 'transfer' THEN s.bucket = 'allocated' AND s.two_accounts
                                     AND s.from_account = -s.amount AND s.to_counterparty = s.amount
                ELSE false END, false) THEN NULL
            ELSE 'its entries do not add up to its amount in the bucket its kind moves' END"""
NO_TRANSACTION = "'an entry of a transaction that does not exist'"

MISSHAPEN = f"""
CREATE OR REPLACE VIEW ledger_misshapen AS
SELECT t.id AS transaction_id, t.kind, p.problem
  FROM public.ledger_transactions t
  CROSS JOIN LATERAL (SELECT {SHAPE}
                        FROM public.ledger_entries e WHERE e.transaction_id = t.id) s
  CROSS JOIN LATERAL (SELECT {PROBLEM} AS problem) p
 WHERE s.entries > 0 AND p.problem IS NOT NULL
UNION ALL
SELECT e.transaction_id, NULL, {NO_TRANSACTION}
  FROM public.ledger_entries e
 WHERE NOT EXISTS (SELECT FROM public.ledger_transactions t WHERE t.id = e.transaction_id)
"""

# 0011's view, for the downgrade
OLD_MISSHAPEN = earlier_revision("0011_balances_by_the_database.py").MISSHAPEN.replace(
    "CREATE VIEW", "CREATE OR REPLACE VIEW", 1)


# Every entry of the touched transactions is in `added` (the counts are equal), so their shape
# is the statement's rows', read once, each transaction's row joined by its key. EXECUTE, not a
# query of the function's own: PL/pgSQL would keep the plan made at a session's first call,
# with that statement's row count (often one), and join 5,000 entries as if they were one (a
# nested loop, 1.4 s a batch where 0.03 s will do). Planned for the rows it has, it reads the
# transactions by key, or all of them only while that costs less.
SHAPED = f"""SELECT s.transaction_id, coalesce(p.problem, {NO_TRANSACTION}) AS problem
                  FROM (SELECT e.transaction_id, t.id IS NOT NULL AS has_row, {SHAPE}
                          FROM added e LEFT JOIN public.ledger_transactions t ON t.id = e.transaction_id
                         GROUP BY e.transaction_id, t.id) s
                 CROSS JOIN LATERAL (SELECT CASE WHEN s.has_row THEN {PROBLEM} END AS problem) p
                 WHERE NOT s.has_row OR p.problem IS NOT NULL
                 LIMIT 1"""

WHOLE = f"""
CREATE OR REPLACE FUNCTION openacct_entries_whole() RETURNS trigger LANGUAGE plpgsql SECURITY DEFINER {SAFE_PATH} AS $$
DECLARE
    bad record;
    touched bigint[];
    wrong bigint;
BEGIN
    {ONLY_ON}
    SELECT array_agg(DISTINCT transaction_id) INTO touched FROM added;
    IF (SELECT count(*) FROM public.ledger_entries WHERE transaction_id = ANY(touched))
       <> (SELECT count(*) FROM added) THEN
        SELECT n.transaction_id, 'entries were added to it after it was written' AS problem INTO bad
          FROM (SELECT transaction_id, count(*) AS written FROM added GROUP BY transaction_id) n
         WHERE n.written <> (SELECT count(*) FROM public.ledger_entries e WHERE e.transaction_id = n.transaction_id)
         LIMIT 1;
    ELSE
        EXECUTE $shaped$ {SHAPED} $shaped$ INTO bad;
    END IF;
    GET DIAGNOSTICS wrong = ROW_COUNT;
    IF wrong > 0 THEN
        RAISE EXCEPTION 'ledger refused: transaction #%: %', bad.transaction_id, bad.problem
            USING ERRCODE = 'check_violation';
    END IF;
    RETURN NULL;
END $$
"""

# migration 0016's, for the downgrade
OLD_WHOLE = earlier_revision("0016_fewer_checks_per_row.py").WHOLE

REFUSED_INDEX = "ix_jobs_refused_runs"
# shared.rating.jobs.REFUSED, as it is written on the runs admission control refused
REFUSED = "refused by admission control: never ran"


def upgrade() -> None:
    op.execute(MISSHAPEN)
    op.execute(WHOLE)
    op.execute(f"CREATE INDEX {REFUSED_INDEX} ON jobs (system_id, job_id) WHERE charge_policy = '{REFUSED}'")


def downgrade() -> None:
    op.execute(f"DROP INDEX {REFUSED_INDEX}")
    op.execute(OLD_WHOLE)
    op.execute(OLD_MISSHAPEN)
