"""the charger's rows cost the database less: no per-row checks left, one count for entries whole

Revision ID: 0016
Revises: 0015
Create Date: 2026-12-06

Issue 16. Three per-row costs of a charge, each paid by every row of a batch (EXPLAIN ANALYZE of
a charger batch of 5,000 events, 2026-12-06):

- ``ledger_transactions.refers_to_id`` kept its row-level foreign key when migration 0003 made
  the other references of the hot tables statement checks: 4.1 ms a batch, though a charge
  refers to nothing. It is now checked per statement like the rest, and its index holds only the
  rows that refer to something (refunds, releases, adjustments), not one NULL per charge.
- ``processed_events.transaction_id`` was never written by any code: its foreign key cost 2.2 ms
  a batch to check NULLs. The column is dropped.
- ``openacct_entries_whole`` (migration 0011) counted each touched transaction's entries with a
  probe of its own, 13 ms a batch. One count of the entries of all the touched transactions,
  against the statement's own, says the same: the statement's entries are among them, so the two
  counts are equal exactly when no transaction has an entry from elsewhere. The probe per
  transaction is now made only to name the one at fault.
"""

import sqlalchemy as sa
from alembic import op

revision = '0016'
down_revision = '0015'
branch_labels = None
depends_on = None

SAFE_PATH = "SET search_path = public, pg_temp"
ONLY_ON = ("IF TG_RELID <> 'public.ledger_entries'::regclass THEN "
           "RAISE EXCEPTION '% guards ledger_entries only', TG_NAME; END IF;")

# migration 0003's checks of ledger_transactions, then with refers_to_id
REFERENCES = [("account_id", "accounts"), ("counterparty_account_id", "accounts"), ("service_id", "services"),
              ("job_id", "jobs"), ("user_id", "users")]
FK = "fk_ledger_transactions_refers_to_id_ledger_transactions"
INDEX = "ix_ledger_transactions_refers_to_id"


def _references_trigger(pairs: list[tuple[str, str]]) -> str:
    arguments = ", ".join(f"'{name}'" for pair in pairs for name in pair)
    return ("CREATE TRIGGER ledger_transactions_references_insert AFTER INSERT ON ledger_transactions "
            "REFERENCING NEW TABLE AS new_rows FOR EACH STATEMENT "
            f"EXECUTE FUNCTION openacct_check_references({arguments})")


def _whole(check: str) -> str:
    return f"""
CREATE OR REPLACE FUNCTION openacct_entries_whole() RETURNS trigger LANGUAGE plpgsql SECURITY DEFINER {SAFE_PATH} AS $$
DECLARE
    bad record;
    touched bigint[];
BEGIN
    {ONLY_ON}
{check}
    IF FOUND THEN
        RAISE EXCEPTION 'ledger refused: transaction #%: %', bad.transaction_id, bad.problem
            USING ERRCODE = 'check_violation';
    END IF;
    RETURN NULL;
END $$
"""


# The transaction that had entries before this statement, by one probe each (0011's check).
PROBE_EACH = """SELECT n.transaction_id, 'entries were added to it after it was written' AS problem INTO bad
      FROM (SELECT transaction_id, count(*) AS written FROM added GROUP BY transaction_id) n
     WHERE n.written <> (SELECT count(*) FROM public.ledger_entries e WHERE e.transaction_id = n.transaction_id)
     LIMIT 1;"""
# An array, not a join with `added`: the condition then reaches into the view, which reads these
# transactions by their keys instead of the whole ledger.
MISSHAPEN = """SELECT m.transaction_id, m.problem INTO bad FROM public.ledger_misshapen m
         WHERE m.transaction_id = ANY(touched) LIMIT 1;"""

WHOLE = _whole(f"""    SELECT array_agg(DISTINCT transaction_id) INTO touched FROM added;
    IF (SELECT count(*) FROM public.ledger_entries WHERE transaction_id = ANY(touched))
       <> (SELECT count(*) FROM added) THEN
        {PROBE_EACH}
    ELSE
        {MISSHAPEN}
    END IF;""")
OLD_WHOLE = _whole(f"""    {PROBE_EACH}
    IF NOT FOUND THEN
        SELECT array_agg(DISTINCT transaction_id) INTO touched FROM added;
        {MISSHAPEN}
    END IF;""")


def upgrade() -> None:
    op.drop_constraint(FK, "ledger_transactions", type_="foreignkey")
    op.execute("DROP TRIGGER ledger_transactions_references_insert ON ledger_transactions")
    op.execute(_references_trigger([*REFERENCES, ("refers_to_id", "ledger_transactions")]))
    op.drop_index(INDEX, "ledger_transactions")
    op.create_index(INDEX, "ledger_transactions", ["refers_to_id"], postgresql_where=sa.text("refers_to_id IS NOT NULL"))
    op.drop_column("processed_events", "transaction_id")
    op.execute(WHOLE)


def downgrade() -> None:
    op.execute(OLD_WHOLE)
    op.add_column("processed_events", sa.Column("transaction_id", sa.BigInteger(), nullable=True))
    op.create_foreign_key("fk_processed_events_transaction_id_ledger_transactions", "processed_events",
                          "ledger_transactions", ["transaction_id"], ["id"])
    op.drop_index(INDEX, "ledger_transactions")
    op.create_index(INDEX, "ledger_transactions", ["refers_to_id"])
    op.execute("DROP TRIGGER ledger_transactions_references_insert ON ledger_transactions")
    op.execute(_references_trigger(REFERENCES))
    op.create_foreign_key(FK, "ledger_transactions", "ledger_transactions", ["refers_to_id"], ["id"])
