"""The migrations build exactly the schema the models describe, from scratch or by upgrade."""

from __future__ import annotations

import pytest
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from sqlalchemy import Engine, inspect, text

from shared.migrate import alembic_config, upgrade
from shared.models import Base

HEAD = "0019"


def test_migrated_database_matches_the_models(engine: Engine) -> None:
    with engine.connect() as conn:
        diff = compare_metadata(MigrationContext.configure(conn, opts={"compare_type": True}), Base.metadata)
    assert diff == []


def _schema(engine: Engine) -> dict[str, object]:
    inspector = inspect(engine)
    return {
        table: (
            [(c["name"], str(c["type"]), c["nullable"]) for c in inspector.get_columns(table)],
            sorted(i["name"] for i in inspector.get_indexes(table)),
            sorted(str(c["name"]) for c in inspector.get_check_constraints(table)),
        )
        for table in sorted(inspector.get_table_names())
    }


def test_downgrade_then_upgrade_ends_identical(engine: Engine, scratch_engine: Engine) -> None:
    from alembic import command

    assert upgrade(scratch_engine) == HEAD
    fresh = _schema(scratch_engine)
    with scratch_engine.begin() as conn:
        command.downgrade(alembic_config(conn), "base")
    assert [t for t in inspect(scratch_engine).get_table_names() if t != "alembic_version"] == []
    upgrade(scratch_engine)
    assert _schema(scratch_engine) == fresh == _schema(engine)
    # Upgrading an up-to-date database is a no-op.
    assert upgrade(scratch_engine) == HEAD


def test_references_of_the_hot_tables_are_checked_per_statement(db_connection, quickstart) -> None:  # type: ignore[no-untyped-def]
    """jobs, ledger_transactions and ledger_entries have no row-level foreign keys: a trigger
    checks each statement's rows, and refuses one that points nowhere, naming it."""
    from sqlalchemy.exc import IntegrityError

    account = db_connection.execute(text("SELECT id FROM accounts ORDER BY id LIMIT 1")).scalar_one()
    system = db_connection.execute(text("SELECT id FROM systems ORDER BY id LIMIT 1")).scalar_one()
    insert_job = ("INSERT INTO jobs (system_id, job_id, submit_time, account_id) "
                  "SELECT :system, 'j' || n, now(), :account FROM generate_series(1, 3) n")
    with db_connection.begin_nested():
        db_connection.execute(text(insert_job), {"system": system, "account": account})  # valid: accepted
    with pytest.raises(IntegrityError, match=r"jobs.account_id = 999999 refers to no row of accounts"):
        with db_connection.begin_nested():
            db_connection.execute(text(insert_job.replace("generate_series(1, 3)", "generate_series(4, 5)")),
                                  {"system": system, "account": 999999})
    # refers_to_id too (migration 0016), though no row refers to anything here
    refund = ("INSERT INTO ledger_transactions (kind, idempotency_key, request_hash, amount, account_id, refers_to_id, "
              "effective_at) VALUES ('refund', :key, '', 0, :account, :refers, now())")
    with pytest.raises(IntegrityError, match=r"ledger_transactions.refers_to_id = 424242 refers to no row of "
                                             r"ledger_transactions"):
        with db_connection.begin_nested():
            db_connection.execute(text(refund), {"key": "nowhere", "account": account, "refers": 424242})
    # (the ledger's own check of entries, migration 0011, fires first and says it its way)
    with pytest.raises(IntegrityError, match=r"transaction #424242: an entry of a transaction that does not exist"):
        with db_connection.begin_nested():
            db_connection.execute(text(
                "INSERT INTO ledger_entries (transaction_id, account_id, bucket, amount, effective_at) "
                "VALUES (424242, :account, 'charged', 1, now())"), {"account": account})


@pytest.mark.parametrize("table", ["systems", "users", "accounts", "services", "allocations", "jobs"])
def test_rows_the_ledger_refers_to_are_never_deleted(db_connection, quickstart, table: str) -> None:  # type: ignore[no-untyped-def]
    from sqlalchemy.exc import IntegrityError

    with pytest.raises(IntegrityError, match=f"rows of {table} are never deleted"):
        db_connection.execute(text(f"DELETE FROM {table}"))


def test_the_keys_every_event_inserts_compare_as_bytes(engine: Engine) -> None:
    """The charger inserts an inbox id, a transaction key and a job id per event into unique
    indexes: their comparisons are a memcmp, not the locale's (migration 0019). Every text column
    of a unique index on those tables is held to it, so a key added later is too."""
    with engine.connect() as conn:
        keyed = conn.execute(text("""
            SELECT c.relname, a.attname, coalesce(co.collname, 'default')
            FROM pg_index i
            JOIN pg_class c ON c.oid = i.indrelid
            JOIN pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = ANY(i.indkey)
            LEFT JOIN pg_collation co ON co.oid = a.attcollation AND a.attcollation <> 100
            WHERE i.indisunique AND c.relname IN ('processed_events', 'ledger_transactions', 'jobs')
              AND a.atttypid IN ('text'::regtype, 'varchar'::regtype)
        """)).all()
    assert sorted(keyed) == [("jobs", "job_id", "C"), ("ledger_transactions", "idempotency_key", "C"),
                             ("processed_events", "event_id", "C")]
