"""Dead letters from parking to replay, and what ``job show`` / ``transactions --job`` tell about a
charge, through the CLI in process (``openacct.cli.run``); and the worker's batch runner
(``shared.batches.run_batch``): poison batches and events that fail on their own.

Every test runs in the rolled-back transaction of ``db_connection`` (through ``quickstart``).
"""

from __future__ import annotations

import json
import uuid
from decimal import Decimal
from types import SimpleNamespace
from typing import Any

import pytest
from sqlalchemy import select
from sqlalchemy.exc import OperationalError

from openacct.shortcuts import add_user_to_project, create_user, deposit
from services.charger.batch import charge_events
from shared import signing
from shared.batches import Outcome, run_batch
from shared.celery_app import TASKS
from shared.config import get_settings
from shared.db import session_scope
from shared.models import ChargeMultiplier, LedgerTransaction, ParkedEvent, System
from tests.conftest import Result
from tests.events import job_completed

D = Decimal


@pytest.fixture(autouse=True)
def funded(quickstart: None) -> None:
    deposit("phys", "1000", start="2000-01-01")


def charge(*events: dict[str, Any] | str) -> Outcome:
    with session_scope() as s:
        return charge_events(s, [e if isinstance(e, str) else json.dumps(e) for e in events], source="test")


def parked_rows() -> list[ParkedEvent]:
    with session_scope() as s:
        return list(s.scalars(select(ParkedEvent).order_by(ParkedEvent.id)))


def charges() -> list[LedgerTransaction]:
    with session_scope() as s:
        return list(s.scalars(select(LedgerTransaction).where(LedgerTransaction.kind == "charge")
                              .order_by(LedgerTransaction.id)))


def one_error_line(result: Result) -> str:
    assert result.code == 1 and result.out == "", result
    (line,) = result.err.splitlines()
    return line


# --------------------------------------------------------------------------- park, list, show, replay


def test_a_parked_event_is_listed_shown_and_charged_once_replayed(cli) -> None:  # type: ignore[no-untyped-def]
    event = job_completed(501, user="newbie", cpus=2, seconds=7200)
    raw = json.dumps(event)
    assert charge(event).parked == 1

    listed = cli("deadletter", "list", "--json")
    assert listed.code == 0
    (row,) = listed.json()
    assert (row["kind"], row["event_id"], row["reason"], row["replayed_at"]) == (
        "job.completed", event["event_id"], "unknown user 'newbie' on system 'cluster'", None)
    parked_id = row["id"]

    shown = cli("deadletter", "show", str(parked_id), "--json")
    assert shown.code == 0
    record = shown.json()
    assert record["payload"] == raw and record["payload_bytes"] == len(raw.encode())
    assert (record["reason"], record["source"], record["event_id"]) == (row["reason"], "test", event["event_id"])

    create_user("newbie")
    add_user_to_project("newbie", "phys")
    replayed = cli("deadletter", "replay", str(parked_id))
    assert (replayed.code, replayed.err) == (0, ""), replayed
    assert f"#{parked_id}: charged" in replayed.out
    (txn,) = charges()
    assert (txn.quantity, txn.amount) == (D(4), D("0.2"))  # 2 CPUs x 2 hours x 0.05
    (p,) = parked_rows()
    assert p.replayed_at is not None
    assert cli("deadletter", "list", "--json").json() == []
    assert [r["id"] for r in cli("deadletter", "list", "--all", "--json").json()] == [parked_id]

    again = cli("deadletter", "replay", str(parked_id))
    assert one_error_line(again).startswith(f"error: parked event #{parked_id} was already replayed at ")
    assert len(charges()) == 1 and len(parked_rows()) == 1


def test_a_replay_that_still_fails_exits_1_and_parks_the_event_anew(cli) -> None:  # type: ignore[no-untyped-def]
    event = job_completed(502, user="ghost")
    charge(event)
    (first,) = parked_rows()

    result = cli("deadletter", "replay", str(first.id))
    assert result.code == 1 and result.out == ""
    assert result.err.strip() == f"#{first.id}: parked again (see openacct deadletter list)"
    old, new = parked_rows()
    assert old.replayed_at is not None and new.replayed_at is None
    assert (new.reason, new.payload, new.event_id, new.source) == (
        "unknown user 'ghost' on system 'cluster'", json.dumps(event).encode(), event["event_id"], "replay")
    assert [r["id"] for r in cli("deadletter", "list", "--json").json()] == [new.id]
    assert charges() == []


def test_replay_all(cli) -> None:  # type: ignore[no-untyped-def]
    charge(job_completed(601, user="newbie"), job_completed(602, user="newbie", cpus=8), "{not json")
    assert len(parked_rows()) == 3
    create_user("newbie")
    add_user_to_project("newbie", "phys")

    broken = next(p.id for p in parked_rows() if p.reason.startswith("Invalid JSON"))
    fixable = [p.id for p in parked_rows() if p.id != broken]
    result = cli("deadletter", "replay", "--all")
    assert result.code == 1  # the one that is not JSON cannot be fixed by replaying it
    assert result.out.splitlines() == [f"#{i}: charged" for i in fixable]
    assert result.err.strip() == f"#{broken}: parked again (see openacct deadletter list)"
    assert sorted(t.quantity for t in charges()) == [D(4), D(8)]
    (left,) = cli("deadletter", "list", "--json").json()
    assert left["reason"].startswith("Invalid JSON") and left["id"] > max(fixable)

    # Nothing left that a replay can fix: --all replays just that one, which fails again.
    assert cli("deadletter", "replay", "--all").code == 1
    usage = cli("deadletter", "replay")
    assert usage.code == 2 and "name parked event numbers, or --all" in usage.err


def test_replaying_an_unknown_number_is_one_error_line(cli) -> None:  # type: ignore[no-untyped-def]
    assert one_error_line(cli("deadletter", "replay", "999999")) == "error: no parked event #999999"
    assert one_error_line(cli("deadletter", "show", "999999")) == "error: no parked event #999999"


# --------------------------------------------------------------------------- what a charge tells


def test_job_show_and_transactions_explain_a_charge(cli) -> None:  # type: ignore[no-untyped-def]
    with session_scope() as s:
        cluster = s.scalar(select(System).where(System.name == "cluster"))
        s.add(ChargeMultiplier(system_id=cluster.id, kind="partition", name="gpu", multiplier=D("2")))
    charge(job_completed(701, cpus=8, seconds=5400, partition="gpu"), job_completed(702, state="NODE_FAIL"))

    job = cli("job", "show", "701", "--json").json()
    assert (job["state"], job["charge_policy"], job["cpus"], job["user"], job["account"]) == (
        "COMPLETED", "charged for elapsed time", 8, "tux", "phys")
    (txn,) = job["transactions"]
    assert (txn["kind"], txn["service"], txn["quantity"], txn["rate"], txn["amount"]) == (
        "charge", "cluster-core-hours", "12.00", "0.05", "-1.20")  # 8 CPUs x 1.5 h x 0.05 x 2, money out
    details = txn["details"]
    assert (details["policy"], details["elapsed_seconds"], details["count"], details["resource"]) == (
        "charged for elapsed time", 5400, 8, "cpu")
    assert (details["partition_multiplier"], details["qos_multiplier"], details["multiplier"]) == ("2.000000", "1", "2.00")

    (listed,) = cli("transactions", "--job", "701", "--json").json()
    assert (listed["id"], listed["job"], listed["quantity"], listed["rate"], listed["amount"]) == (
        txn["id"], "701", "12.00", "0.05", "-1.20")
    assert listed["details"] == details

    free = cli("job", "show", "702", "--json").json()
    assert (free["state"], free["charge_policy"], free["transactions"]) == (
        "NODE_FAIL", "state NODE_FAIL is not charged", [])
    assert cli("transactions", "--job", "702", "--json").json() == []
    assert one_error_line(cli("job", "show", "703")) == "error: no job '703'"


# --------------------------------------------------------------------------- the batch runner


class Killed(BaseException):
    """The worker process dying under its task (out of memory, SIGKILL): nothing is caught."""


def task(retries: int = 0) -> SimpleNamespace:
    return SimpleNamespace(name=TASKS["charger"], request=SimpleNamespace(id=f"task-{uuid.uuid4()}", retries=retries))


def signed(items: list[Any]) -> Any:
    return signing.seal(TASKS["charger"], items)


def test_a_batch_delivered_more_than_max_deliveries_is_parked_whole() -> None:
    limit = get_settings().max_deliveries
    the_task = task()
    items = [json.dumps(job_completed(801)), {"b64": "//79"}, "{not json"]
    calls = 0

    def dies(*_: Any, **__: Any) -> Outcome:
        nonlocal calls
        calls += 1
        raise Killed

    for _ in range(limit):
        with pytest.raises(Killed):
            run_batch(the_task, signed(items), dies, "charger")
    assert calls == limit and parked_rows() == [] and charges() == []

    result = run_batch(the_task, signed(items), dies, "charger")
    assert calls == limit  # not tried again
    assert result == {"charged": 0, "recorded": 0, "duplicates": 0, "parked": 3, "transactions": 0}
    rows = parked_rows()
    assert [p.payload for p in rows] == [items[0].encode(), b"\xff\xfe\xfd", b"{not json"]
    assert {p.reason for p in rows} == {
        f"batch {the_task.request.id} was delivered {limit + 1} times without completing (its worker died, "
        "or it ran out of time or database each time); parked for an administrator to replay"}
    assert {p.source for p in rows} == {"charger"}

    # A retry keeps the task id, so it counts too: a batch that never fits cannot loop forever.
    the_task.request.retries = 1
    assert run_batch(the_task, signed(items[:1]), charge_events, "charger")["parked"] == 1


def test_an_event_failing_on_its_own_is_parked_with_the_exception_and_the_rest_applied() -> None:
    items = [json.dumps(job_completed(901)), json.dumps(job_completed(902, name="poison")),
             json.dumps(job_completed(903, cpus=2))]

    def handler(session: Any, batch: list[Any], *, source: str) -> Outcome:
        if any("poison" in item for item in batch):
            raise ValueError("poison pill in this batch")
        return charge_events(session, batch, source=source)

    result = run_batch(task(), signed(items), handler, "charger")
    assert (result["charged"], result["parked"], result["transactions"]) == (2, 1, 2)
    assert sorted(t.quantity for t in charges()) == [D(2), D(4)]
    (p,) = parked_rows()
    assert p.payload == items[1].encode() and p.source == "charger"
    assert p.reason == "could not be applied: ValueError: poison pill in this batch"


def test_a_database_outage_is_raised_for_celery_to_retry() -> None:
    def handler(*_: Any, **__: Any) -> Outcome:
        raise OperationalError("SELECT 1", {}, Exception("server closed the connection"))

    with pytest.raises(OperationalError):
        run_batch(task(), signed([json.dumps(job_completed(950))]), handler, "charger")
    assert parked_rows() == [] and charges() == []
