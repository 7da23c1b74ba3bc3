"""Least-privilege roles: the charger can charge, and nobody but the owner can rewrite the ledger."""

from __future__ import annotations

import pytest
from sqlalchemy import Connection, text
from sqlalchemy.exc import ProgrammingError

from services.charger.batch import charge_events
from shared import roles
from shared.db import session_scope
from tests.events import job_completed, raw


@pytest.fixture
def as_role(db_connection: Connection, quickstart: None):  # type: ignore[no-untyped-def]
    from openacct.shortcuts import deposit

    deposit("phys", "100", start="2000-01-01")
    roles.apply(db_connection)

    def become(role: str) -> None:
        db_connection.execute(text(f"SET LOCAL ROLE {role}"))

    return become


def refused(connection: Connection, statement: str) -> bool:
    savepoint = connection.begin_nested()
    try:
        connection.execute(text(statement))
    except ProgrammingError as exc:
        savepoint.rollback()
        return "permission denied" in str(exc)
    savepoint.rollback()
    return False


def test_the_charger_role_charges_a_batch(as_role, db_connection: Connection) -> None:  # type: ignore[no-untyped-def]
    as_role("openacct_charger")
    with session_scope() as s:
        outcome = charge_events(s, [raw(job_completed(1)).decode(), "{not json"])
    assert (outcome.charged, outcome.parked) == (1, 1)


@pytest.mark.parametrize("role", ["openacct_charger", "openacct_admin", "openacct_reader"])
def test_no_role_rewrites_the_ledger_or_the_center_it_does_not_own(as_role, db_connection: Connection, role: str) -> None:  # type: ignore[no-untyped-def]
    as_role(role)
    assert refused(db_connection, "UPDATE ledger_transactions SET amount = 0")
    assert refused(db_connection, "DELETE FROM ledger_entries")
    assert refused(db_connection, "TRUNCATE ledger_transactions CASCADE")
    if role != "openacct_admin":
        assert refused(db_connection, "UPDATE service_rates SET rate = 0")
        assert refused(db_connection, "INSERT INTO users (name) VALUES ('mallory')")
    if role == "openacct_reader":
        assert refused(db_connection, "INSERT INTO processed_events (event_id, kind) VALUES ('x', 'job.completed')")
