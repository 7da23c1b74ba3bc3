"""The database's statement-level checks and the batch writer, on batches of many rows: a
reference checked per distinct value (migration 0015) still finds the one row that points
nowhere, and a JSONB column written from text arrives as JSON, not as a string."""

from __future__ import annotations

import pytest
from sqlalchemy import text
from sqlalchemy.exc import IntegrityError


def test_one_bad_reference_among_many_good_ones_is_found(db_connection, quickstart) -> None:  # type: ignore[no-untyped-def]
    account = db_connection.execute(text("SELECT id FROM accounts ORDER BY id LIMIT 1")).scalar_one()
    system = db_connection.execute(text("SELECT id FROM systems ORDER BY id LIMIT 1")).scalar_one()
    insert_jobs = ("INSERT INTO jobs (system_id, job_id, submit_time, account_id) "
                   "SELECT :system, 'b' || n, now(), CASE WHEN n = 777 THEN 999999 ELSE :account END "
                   "FROM generate_series(1, :rows) n")
    with pytest.raises(IntegrityError, match=r"jobs.account_id = 999999 refers to no row of accounts"):
        with db_connection.begin_nested():
            db_connection.execute(text(insert_jobs), {"system": system, "account": account, "rows": 2000})
    with db_connection.begin_nested():  # the same batch without it goes in
        db_connection.execute(text(insert_jobs.replace("n = 777", "n = -1")),
                              {"system": system, "account": account, "rows": 2000})
    jobs = db_connection.execute(text("SELECT count(*) FROM jobs WHERE job_id LIKE 'b%'")).scalar_one()
    assert jobs == 2000
    # NULLs are no references, and a missing one among distinct values of many is named
    with pytest.raises(IntegrityError, match=r"ledger_transactions.job_id = 424242 refers to no row of jobs"):
        with db_connection.begin_nested():
            db_connection.execute(text(
                "INSERT INTO ledger_transactions (kind, idempotency_key, request_hash, amount, account_id, job_id, "
                "effective_at, details) SELECT 'charge', 'k' || n, '', 0, :account, "
                "CASE WHEN n = 3 THEN 424242 WHEN n % 2 = 0 THEN NULL ELSE (SELECT min(id) FROM jobs) END, now(), '{}' "
                "FROM generate_series(1, 500) n"), {"account": account})


def test_bulk_insert_writes_jsonb_from_text(db_connection, quickstart) -> None:  # type: ignore[no-untyped-def]
    import json

    from shared import bulk, db
    from shared.models import LedgerTransaction

    account = db_connection.execute(text("SELECT id FROM accounts ORDER BY id LIMIT 1")).scalar_one()
    details = [json.dumps({"n": n, "s": f"é{n}", "nested": {"a": [1, None]}}) for n in range(3)] + [
        json.dumps({"n": 3})]
    with db.session_scope() as session:
        written = bulk.insert_columns(session, LedgerTransaction.__table__, {
            "kind": ["charge"] * 4, "idempotency_key": [f"jsonb-{n}" for n in range(4)], "request_hash": [""] * 4,
            "amount": [0] * 4, "account_id": [account] * 4, "effective_at": [None] * 4, "details": details,
        } | {"effective_at": [db_connection.execute(text("SELECT now()")).scalar_one()] * 4},
            returning=("idempotency_key",))
        assert len(written) == 4
        # a constant JSONB column (sent once, not as an array) too
        bulk.insert_columns(session, LedgerTransaction.__table__, {
            "kind": ["charge"] * 2, "idempotency_key": ["jsonb-c1", "jsonb-c2"], "request_hash": [""] * 2,
            "amount": [0] * 2, "account_id": [account] * 2,
            "effective_at": [db_connection.execute(text("SELECT now()")).scalar_one()] * 2,
            "details": ['{"same": true}'] * 2})
    rows = dict(db_connection.execute(text(
        "SELECT idempotency_key, details FROM ledger_transactions WHERE idempotency_key LIKE 'jsonb-%' "
        "AND jsonb_typeof(details) = 'object'")).all())
    assert rows == {**{f"jsonb-{n}": json.loads(details[n]) for n in range(4)},
                    "jsonb-c1": {"same": True}, "jsonb-c2": {"same": True}}
