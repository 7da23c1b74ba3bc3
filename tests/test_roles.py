"""Least privilege, enforced by the database: the charger can charge and refund but cannot change a
running balance, an account or a ledger row, nor give money; nobody, the owner included, can
TRUNCATE the ledger; ``openacct db roles`` is idempotent and every upgrade keeps the grants whole."""

from __future__ import annotations

import json
import os
import uuid
from collections.abc import Iterator
from decimal import Decimal
from pathlib import Path
from typing import Any

import psycopg
import pytest
from celery import Celery
from sqlalchemy import Connection, Engine, make_url, select, text
from sqlalchemy.exc import DBAPIError
from sqlalchemy.orm import Session

from services.charger.batch import charge_events
from shared import db, roles, signing
from shared.celery_app import TASKS
from shared.db import session_scope
from shared.ledger import now as ledger_now
from shared.migrate import upgrade
from shared.models import Base, LedgerTransaction
from tests.conftest import QUICKSTART
from tests.events import job_completed, raw
from tests.pipeline import Process, wait_for
from tests.test_schema import HEAD

D = Decimal


@pytest.fixture
def as_role(db_connection: Connection, quickstart: None):  # type: ignore[no-untyped-def]
    from openacct.shortcuts import deposit

    deposit("phys", "100", start="2000-01-01")
    roles.apply(db_connection)

    def become(role: str) -> None:
        db_connection.execute(text(f"SET LOCAL ROLE {role}"))

    return become


def refusal(connection: Connection, statement: str) -> str:
    """Why the database refused the statement ('' if it did not)."""
    savepoint = connection.begin_nested()
    try:
        connection.execute(text(statement))
    except DBAPIError as exc:
        savepoint.rollback()
        return str(exc.orig)
    savepoint.rollback()
    return ""


def refused(connection: Connection, statement: str) -> bool:
    why = refusal(connection, statement)
    return "permission denied" in why or "row-level security" in why


def test_the_charger_role_charges_a_batch(as_role, db_connection: Connection) -> None:  # type: ignore[no-untyped-def]
    as_role("openacct_charger")
    with session_scope() as s:
        outcome = charge_events(s, [raw(job_completed(1)).decode(), "{not json"])
    assert (outcome.charged, outcome.parked) == (1, 1)
    (row,) = db_connection.execute(text("SELECT charged FROM account_balances WHERE charged > 0")).all()
    assert row.charged > 0  # added up by the owner's trigger, not by the charger


@pytest.mark.parametrize("role", ["openacct_charger", "openacct_admin", "openacct_reader", "openacct_api"])
def test_no_role_rewrites_the_ledger_or_the_balances(as_role, db_connection: Connection, role: str) -> None:  # type: ignore[no-untyped-def]
    as_role(role)
    assert refused(db_connection, "UPDATE ledger_transactions SET amount = 0")
    assert refused(db_connection, "DELETE FROM ledger_entries")
    assert refused(db_connection, "TRUNCATE ledger_transactions CASCADE")
    assert refused(db_connection, "UPDATE account_balances SET allocated = allocated + 1000000")
    assert refused(db_connection, "INSERT INTO account_balances (account_id, allocated) VALUES (1, 1000000)")
    assert refused(db_connection, "DELETE FROM account_balances")
    if role != "openacct_admin":
        assert refused(db_connection, "UPDATE accounts SET admission_policy = 'allow'")
        assert refused(db_connection, "UPDATE allocations SET credit_limit = 1000000")
        assert refused(db_connection, "UPDATE service_rates SET rate = 0")
        assert refused(db_connection, "INSERT INTO users (name) VALUES ('mallory')")
    if role == "openacct_reader":
        assert refused(db_connection, "INSERT INTO processed_events (event_id, kind) VALUES ('x', 'job.completed')")
        assert refused(db_connection, "SELECT openacct_lock_accounts(ARRAY[1])")


def _forged_deposit(connection: Connection) -> str:
    """What an intruder with a worker's login would try: a ledger row that gives money."""
    return (
        "WITH t AS (INSERT INTO ledger_transactions (kind, idempotency_key, request_hash, amount, account_id, "
        "effective_at, details) SELECT 'deposit', 'forged', '', 1000000, account_id, now(), '{}' "
        "FROM account_balances WHERE allocation_id IS NOT NULL LIMIT 1 RETURNING id, account_id) "
        "INSERT INTO ledger_entries (transaction_id, account_id, allocation_id, bucket, amount, effective_at) "
        "SELECT t.id, t.account_id, b.allocation_id, 'allocated', 1000000, now() FROM t "
        "JOIN account_balances b ON b.account_id = t.account_id AND b.allocation_id IS NOT NULL"
    )


def test_a_worker_login_cannot_give_money_even_through_ledger_rows(as_role, db_connection: Connection) -> None:  # type: ignore[no-untyped-def]
    as_role("openacct_charger")
    assert "row-level security" in refusal(db_connection, _forged_deposit(db_connection))
    db_connection.execute(text("RESET ROLE"))
    as_role("openacct_admin")  # administrators deposit by the same rows
    assert refusal(db_connection, _forged_deposit(db_connection)) == ""


def test_nobody_truncates_the_ledger_not_even_its_owner(as_role, db_connection: Connection) -> None:  # type: ignore[no-untyped-def]
    as_role(roles.OWNER)
    for table in ("ledger_entries", "ledger_transactions", "account_balances"):
        assert f"ledger table {table} cannot be truncated" in refusal(db_connection, f"TRUNCATE {table} CASCADE")
    db_connection.execute(text("RESET ROLE"))  # a superuser, outside replica mode: the same
    assert "cannot be truncated" in refusal(db_connection, "TRUNCATE ledger_entries")


def test_the_api_role_manages_membership_and_moves_no_money(as_role, db_connection: Connection) -> None:  # type: ignore[no-untyped-def]
    """What ``openacct api serve`` writes: members and managers (through the shortcuts, as its
    endpoints do) and a token's last use; never a ledger row, an account or an allocation."""
    from openacct import shortcuts
    from openacct.api import tokens

    with session_scope() as s:
        _, token = tokens.create(s, shortcuts.get_user("bob"), scope="manage", expires_days=None)
    as_role("openacct_api")
    with session_scope() as s:
        shortcuts.add_user_to_project("sue", "phys", actor="api:bob")
        shortcuts.add_project_manager("sue", "phys", actor="api:bob")
        shortcuts.remove_user_from_project("sue", "phys", actor="api:bob")  # and stops managing
        row = tokens.find(s, token)
        assert row is not None
        row.last_used_at = None
        tokens.note_use(row, ledger_now())
    assert refused(db_connection, _forged_deposit(db_connection))
    assert refused(db_connection, "UPDATE allocations SET credit_limit = 1000000")
    assert refused(db_connection, "INSERT INTO api_tokens (user_id, token_hash, scope) VALUES (1, 'x', 'manage')")
    assert refused(db_connection, "UPDATE projects SET pi_id = (SELECT id FROM users WHERE name = 'tux')")


def test_every_table_has_its_grants() -> None:
    """A table a migration adds without a line in ROLES would be unreadable to every process."""
    named = {table for grants in roles.ROLES.values() for _, tables in grants for table in tables}
    assert set(Base.metadata.tables) - named == set()


def _privileges(connection: Connection) -> list[tuple[Any, ...]]:
    return [tuple(r) for r in connection.execute(text(
        "SELECT grantee, table_name, privilege_type FROM information_schema.role_table_grants "
        "WHERE grantee LIKE 'openacct\\_%' UNION ALL "
        "SELECT policyname, tablename, cmd FROM pg_policies WHERE schemaname = 'public' UNION ALL "
        "SELECT tableowner, tablename, '' FROM pg_tables WHERE schemaname = 'public' ORDER BY 1, 2, 3"))]


def test_roles_are_idempotent_and_every_upgrade_keeps_the_grants(scratch_engine: Engine) -> None:
    upgrade(scratch_engine, "0010")
    with scratch_engine.begin() as conn:
        roles.apply(conn)
        at_0010 = _privileges(conn)
        roles.apply(conn)
        assert _privileges(conn) == at_0010
    assert upgrade(scratch_engine) == HEAD  # run under the owner, grants made anew
    with scratch_engine.begin() as conn:
        after = _privileges(conn)
        assert {owner for owner, table, kind in after if kind == ""} == {roles.OWNER}
        functions = conn.execute(text(
            "SELECT proname, pg_get_userbyid(proowner) FROM pg_proc WHERE proname LIKE 'openacct\\_%'")).all()
        assert {owner for _, owner in functions} == {roles.OWNER}  # security definers run as the owner
        assert "openacct_lock_accounts" in {name for name, _ in functions}
        roles.apply(conn)
        assert _privileges(conn) == after


@pytest.fixture
def charger_login(scratch_engine: Engine) -> Iterator[str]:
    """A center on a database of its own, its roles in place, and a login granted openacct_charger
    only: its URL."""
    upgrade(scratch_engine)
    db.bind(scratch_engine)
    try:
        from openacct import shortcuts

        with session_scope():
            exec(QUICKSTART.read_text(), {n: getattr(shortcuts, n) for n in shortcuts.__all__})
            shortcuts.deposit("phys", "1000", start="2000-01-01")
    finally:
        db.bind(db.engine())
    login = f"openacct_test_{uuid.uuid4().hex[:8]}"
    with scratch_engine.begin() as conn:
        roles.apply(conn)
        conn.execute(text(f"CREATE ROLE {login} LOGIN IN ROLE openacct_charger"))
    try:
        yield make_url(str(scratch_engine.url)).set(username=login, password=None, drivername="postgresql") \
            .render_as_string(hide_password=False)
    finally:
        scratch_engine.dispose()
        with scratch_engine.begin() as conn:
            conn.execute(text(f"DROP OWNED BY {login}"))
            conn.execute(text(f"DROP ROLE {login}"))


def test_a_charger_login_runs_the_workers_and_cannot_touch_money_otherwise(
    charger_login: str, scratch_engine: Engine, redis: Any, tmp_path: Path
) -> None:
    env = {**os.environ, "OPENACCT_DATABASE_URL": charger_login, "OPENACCT_BROKER_URL": redis.url}
    workers = [Process(["worker", name, "-c", "1"], env, tmp_path / f"{name}.log").start()
               for name in ("charger", "refunder")]
    broker = Celery("admin", broker=redis.url)
    try:
        job = raw(job_completed(77, cpus=64, seconds=3600)).decode()  # 64 core-hours at 0.05: 3.20
        broker.send_task(TASKS["charger"], args=[signing.seal(TASKS["charger"], [job])], queue="charger",
                         routing_key="charger")
        charged = "SELECT coalesce(sum(charged), 0) - coalesce(sum(refunded), 0) FROM account_balances"
        with scratch_engine.connect() as conn:
            wait_for(lambda: conn.execute(text(charged)).scalar() == D("3.2"), 60, "the job charged")
        refund = json.dumps({"schema_version": 1, "kind": "refund.requested", "event_id": "refund:77",
                             "system": "cluster", "job_id": "77", "reason": "node fault", "requester": "admin"})
        broker.send_task(TASKS["refunder"], args=[signing.seal(TASKS["refunder"], [refund])], queue="refunder",
                         routing_key="refunder")
        with scratch_engine.connect() as conn:
            wait_for(lambda: conn.execute(text(charged)).scalar() == 0, 60, "the job refunded")
    finally:
        for worker in workers:
            worker.stop()
    with Session(scratch_engine) as s:
        assert sorted(s.scalars(select(LedgerTransaction.kind))) == ["charge", "deposit", "refund"]

    with psycopg.connect(charger_login, autocommit=True) as conn:
        for statement in ("UPDATE account_balances SET allocated = allocated + 1000000",
                          "UPDATE accounts SET admission_policy = 'allow'", "UPDATE allocations SET amount = 1000000",
                          "UPDATE ledger_entries SET amount = 0", "DELETE FROM ledger_transactions",
                          "TRUNCATE ledger_entries", "UPDATE service_rates SET rate = 0"):
            with pytest.raises(psycopg.errors.InsufficientPrivilege, match="permission denied"):
                conn.execute(statement)


def test_nobody_calls_the_owners_functions_from_a_table_of_their_own(as_role, db_connection: Connection) -> None:  # type: ignore[no-untyped-def]
    """A login's temporary table with a trigger calling the owner's balance function would add up
    whatever the login inserts into it, as the owner."""
    as_role("openacct_reader")
    mint = ("CREATE TEMP TABLE mint (account_id int, allocation_id int, bucket text, amount numeric); "
            "CREATE TRIGGER mint AFTER INSERT ON mint REFERENCING NEW TABLE AS added FOR EACH STATEMENT "
            "EXECUTE FUNCTION public.openacct_post_entries(); "
            "INSERT INTO mint SELECT account_id, allocation_id, 'allocated', 1000000 FROM account_balances")
    db_connection.execute(text("RESET ROLE"))
    db_connection.execute(text("GRANT TEMPORARY ON DATABASE " + db_connection.engine.url.database + " TO PUBLIC"))
    as_role("openacct_charger")
    assert "permission denied for function public.openacct_post_entries" in refusal(db_connection, mint)
    db_connection.execute(text("RESET ROLE"))  # even were it granted, it works for the ledger's entries only
    db_connection.execute(text("GRANT EXECUTE ON FUNCTION openacct_post_entries() TO PUBLIC"))
    as_role("openacct_charger")
    assert "guards ledger_entries only" in refusal(db_connection, mint)


def test_a_worker_login_cannot_move_or_cancel_a_charge(as_role, db_connection: Connection) -> None:  # type: ignore[no-untyped-def]
    with session_scope() as s:
        charge_events(s, [raw(job_completed(1)).decode()])
    as_role("openacct_charger")
    moved = ("INSERT INTO ledger_entries (transaction_id, account_id, allocation_id, bucket, amount, effective_at) "
             "SELECT t.id, a.id, NULL::int, 'charged', {sign} t.amount, now() FROM ledger_transactions t "
             "JOIN accounts a ON a.name = '{account}' WHERE t.kind = 'charge'")
    # the charge cancelled on its own account, or moved onto another's: both refused
    assert "entries were added to it after it was written" in refusal(db_connection, moved.format(sign="-",
                                                                                                   account="phys"))
    assert "ledger refused" in refusal(db_connection, moved.format(sign="-", account="phys") + " UNION ALL " +
                                       moved.format(sign="", account="chem").split(") ", 1)[1])
    # a temporary ledger_transactions cannot vouch for a transaction that does not exist
    db_connection.execute(text("RESET ROLE"))
    db_connection.execute(text("GRANT TEMPORARY ON DATABASE " + db_connection.engine.url.database + " TO PUBLIC"))
    as_role("openacct_charger")
    orphan = ("CREATE TEMP TABLE ledger_transactions (id bigint); INSERT INTO ledger_transactions VALUES (424242); "
              "INSERT INTO ledger_entries (transaction_id, account_id, allocation_id, bucket, amount, effective_at) "
              "SELECT 424242, id, NULL, 'charged', -10, now() FROM accounts WHERE name = 'chem'")
    assert "an entry of a transaction that does not exist" in refusal(db_connection, orphan)


def test_the_admission_role_holds_money_and_nothing_else(as_role, db_connection: Connection) -> None:  # type: ignore[no-untyped-def]
    as_role("openacct_admission")
    entry = ("WITH t AS (INSERT INTO ledger_transactions (kind, idempotency_key, request_hash, amount, account_id, "
             "effective_at, details) SELECT '{kind}', '{kind}-by-admission', '', 5, id, now(), '{{}}' FROM accounts "
             "WHERE name = 'phys' RETURNING id, account_id) INSERT INTO ledger_entries (transaction_id, account_id, "
             "allocation_id, bucket, amount, effective_at) SELECT id, account_id, NULL, '{bucket}', 5, now() FROM t")
    assert "row-level security" in refusal(db_connection, entry.format(kind="refund", bucket="refunded"))
    assert refusal(db_connection, entry.format(kind="hold", bucket="held")) == ""


def test_balances_written_by_anything_but_the_ledger_are_refused(as_role, db_connection: Connection) -> None:  # type: ignore[no-untyped-def]
    """Workers of an older OpenAcct add to the totals themselves: after the upgrade they would count
    twice, so they fail instead."""
    db_connection.execute(text("GRANT UPDATE ON account_balances TO openacct_charger"))  # as the old grants did
    as_role("openacct_charger")
    assert "account_balances are added up from the ledger entries; UPDATE refused" in refusal(
        db_connection, "UPDATE account_balances SET charged = charged + 1")


def test_verify_names_a_transaction_whose_entries_break_its_kind(as_role, db_connection: Connection) -> None:  # type: ignore[no-untyped-def]
    from shared import ledger

    with session_scope() as s:
        charge_events(s, [raw(job_completed(1)).decode()])
        assert ledger.verify(s) == []
    db_connection.execute(text("SET LOCAL session_replication_role = replica"))  # history broken behind its back
    db_connection.execute(text("INSERT INTO ledger_entries (transaction_id, account_id, bucket, amount, effective_at) "
                               "SELECT id, account_id, 'charged', 1, now() FROM ledger_transactions WHERE kind = 'charge'"))
    db_connection.execute(text("SET LOCAL session_replication_role = origin"))
    with session_scope() as s:
        problems = [str(p) for p in ledger.verify(s)]
    assert any("do not add up to its amount" in p for p in problems), problems


def test_an_upgrade_with_nothing_to_do_waits_on_no_writer(scratch_engine: Engine) -> None:
    """Granting anew after every upgrade must not lock the ledger: row-level security is set only
    where it is not already."""
    upgrade(scratch_engine)
    with scratch_engine.begin() as conn:
        roles.apply(conn)
    with scratch_engine.connect() as writer, scratch_engine.connect() as upgrader:
        writer.execute(text("LOCK TABLE ledger_entries IN ROW EXCLUSIVE MODE"))  # a charge in flight
        upgrader.execute(text("SET LOCAL lock_timeout = '2s'"))
        roles.apply(upgrader, create=False)
        upgrader.commit()
        writer.rollback()
