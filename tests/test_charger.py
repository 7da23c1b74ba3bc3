"""The charger's batch logic in-process, against real PostgreSQL, each test rolled back."""

from __future__ import annotations

from decimal import ROUND_HALF_UP, Decimal

import pytest
from sqlalchemy import func, select

from openacct.shortcuts import deposit
from services.charger.batch import charge_events
from shared import ledger
from shared.db import session_scope
from shared.models import ChargeMultiplier, Job, LedgerTransaction, ParkedEvent, System
from tests.events import job_completed, raw

pytestmark = pytest.mark.usefixtures("quickstart")
D = Decimal


@pytest.fixture(autouse=True)
def funded(quickstart: None) -> None:
    deposit("phys", "1000", start="2000-01-01")
    deposit("chem", "1000", start="2000-01-01")


def run(*items: object):  # type: ignore[no-untyped-def]
    with session_scope() as s:
        # Events travel as JSON text; {"b64": ...} carries bytes that are not UTF-8.
        return charge_events(s, [i if isinstance(i, str) or "b64" in i else raw(i).decode() for i in items])


def charges() -> list[LedgerTransaction]:
    with session_scope() as s:
        return list(s.scalars(select(LedgerTransaction).where(LedgerTransaction.kind == "charge")
                              .order_by(LedgerTransaction.id)))


def parked() -> list[ParkedEvent]:
    with session_scope() as s:
        return list(s.scalars(select(ParkedEvent).order_by(ParkedEvent.id)))


def test_a_completed_job_is_charged_cpus_times_elapsed_hours() -> None:
    outcome = run(job_completed(1, cpus=16, seconds=5400))
    assert (outcome.charged, outcome.parked) == (1, 0)
    (c,) = charges()
    assert (c.quantity, c.rate, c.amount) == (D("24"), D("0.05"), D("1.2"))
    assert c.details["policy"] == "charged for elapsed time" and c.details["elapsed_seconds"] == 5400


def test_the_same_event_twice_in_a_batch_and_again_later_charges_once() -> None:
    event = job_completed(7)
    first = run(event, event)
    again = run(event)
    assert (first.charged, first.duplicates, again.charged, again.duplicates) == (1, 1, 0, 1)
    assert len(charges()) == 1


def test_node_fail_is_not_charged_but_recorded() -> None:
    run(job_completed(8, state="NODE_FAIL"))
    assert charges() == []
    with session_scope() as s:
        job = s.scalar(select(Job).where(Job.job_id == "8"))
        assert job.state == "NODE_FAIL" and job.charge_policy == "state NODE_FAIL is not charged"


def test_partition_and_qos_multipliers_apply() -> None:
    with session_scope() as s:
        cluster = s.scalar(select(System).where(System.name == "cluster"))
        s.add_all([ChargeMultiplier(system_id=cluster.id, kind="partition", name="gpu", multiplier=D("2")),
                   ChargeMultiplier(system_id=cluster.id, kind="qos", name="low", multiplier=D("0.5"))])
    run(job_completed(9, cpus=10, seconds=3600, partition="gpu", qos="low"))
    (c,) = charges()
    assert c.amount == D("0.5")  # 10 core-hours x 0.05 x 2 x 0.5


def test_unknown_names_are_parked_with_a_precise_reason_and_the_rest_is_charged() -> None:
    outcome = run(job_completed(10, user="mallory"), job_completed(11), job_completed(12, account="nope"),
                  job_completed(13, system="other"), job_completed(14, account=None),
                  job_completed(15, user="sue"))
    assert outcome.charged == 1 and outcome.parked == 5
    reasons = [p.reason for p in parked()]
    assert reasons == [
        "unknown user 'mallory' on system 'cluster'",
        "unknown account 'nope' on system 'cluster': no account, project or alias by that name",
        "unknown system 'other' (add it, or an alias for it)",
        "the job names no account, and OpenAcct charges every job to one",
        "user 'sue' is not a member of project 'phys'",
    ]


def test_parked_events_keep_the_raw_payload() -> None:
    run("{not json", {"b64": "//79"})
    first, second = parked()
    assert first.payload == b"{not json" and "Invalid JSON" in first.reason
    assert second.payload == b"\xff\xfe\xfd" and second.reason.startswith("payload is not UTF-8")


def test_verify_is_clean_after_a_batch() -> None:
    run(*[job_completed(100 + i, cpus=i + 1, seconds=600 * (i + 1)) for i in range(50)])
    with session_scope() as s:
        assert ledger.verify(s) == []
        total = s.scalar(select(func.sum(LedgerTransaction.amount)).where(LedgerTransaction.kind == "charge"))
    six = D("0.000001")
    # Priced from the exact CPU-seconds, rounded once (not from hours rounded to 6 places first).
    assert total == sum((D(i + 1) * D(600 * (i + 1)) * D("0.05") / 3600).quantize(six, ROUND_HALF_UP) for i in range(50))




def test_a_state_with_an_automatic_refund_is_charged_then_refunded_in_part(monkeypatch: pytest.MonkeyPatch) -> None:
    from shared.config import get_settings

    monkeypatch.setenv("OPENACCT_REFUND_STATES", '{"PREEMPTED": 0.5}')
    get_settings.cache_clear()
    try:
        outcome = run(job_completed(30, cpus=10, seconds=3600, state="PREEMPTED"), job_completed(31, cpus=10))
    finally:
        monkeypatch.undo()
        get_settings.cache_clear()
    assert outcome.charged == 2
    # (charges are written in the order of their keys, which hash the event: pick them by state)
    preempted, completed = sorted(charges(), key=lambda c: c.details["state"] != "PREEMPTED")
    with session_scope() as s:
        (refund,) = s.scalars(select(LedgerTransaction).where(LedgerTransaction.kind == "refund"))
    assert (refund.refers_to_id, refund.amount) == (preempted.id, D("0.25"))  # half of 10 core-hours at 0.05
    assert refund.description == "automatic refund of 50% for jobs ending PREEMPTED"
    assert completed.amount == D("0.5")


def test_refund_states_are_checked() -> None:
    from shared.config import Settings

    with pytest.raises(ValueError, match="unknown job state EXPLODED"):
        Settings(refund_states={"EXPLODED": 0.5})
    with pytest.raises(ValueError, match="a fraction above 0 and at most 1"):
        Settings(refund_states={"PREEMPTED": 1.5})
