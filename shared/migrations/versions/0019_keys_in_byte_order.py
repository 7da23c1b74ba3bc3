"""the hot keys compare as bytes (collation "C")

Revision ID: 0019
Revises: 0018
Create Date: 2026-12-07

Three columns are looked up and inserted by key on every event the charger applies: the inbox's
``processed_events.event_id``, ``ledger_transactions.idempotency_key`` and the job id of
``jobs``' natural key. Their values are identifiers that OpenAcct or a scheduler makes, ASCII
with no order a person reads (``job.completed:<digest>/cpu``, ``12345_7``). Under the database's
collation, each comparison in their unique indexes went through the locale (``strcoll`` or ICU);
in byte order it is a ``memcmp``. On this machine class, for a charger batch of 5,000 events
(``bench/ingest.py``'s events, ``en-US`` ICU database): the four inserts 38.6 and 36.8 → 34.7 and
34.2 µs an event, a tenth of the database's time per event.

Equality does not change (every collation here is deterministic), so neither does any key's
uniqueness nor any lookup. Only ordering by these columns does, which nothing relies on. The
indexes are rebuilt; the tables are not rewritten (the type stays the same).
"""

from alembic import op

revision = '0019'
down_revision = '0018'
branch_labels = None
depends_on = None

COLUMNS = (("processed_events", "event_id", "varchar(200)"),
           ("ledger_transactions", "idempotency_key", "varchar(200)"),
           ("jobs", "job_id", "varchar(64)"))


def upgrade() -> None:
    for table, column, sql_type in COLUMNS:
        op.execute(f'ALTER TABLE {table} ALTER COLUMN {column} TYPE {sql_type} COLLATE "C"')


def downgrade() -> None:
    for table, column, sql_type in COLUMNS:
        op.execute(f'ALTER TABLE {table} ALTER COLUMN {column} TYPE {sql_type} COLLATE "default"')
