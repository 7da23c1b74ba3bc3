"""Signed messages, against a real Redis and real worker processes: what someone with only the
broker's address sends is parked for its signature and changes no balance; a message changed on
the way is refused; a scheduler's key cannot refund; keys rotate without a message lost."""

from __future__ import annotations

import json
import os
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest
from celery import Celery
from sqlalchemy import Engine, select
from sqlalchemy.orm import Session

from openacct.shortcuts import balance
from services.charger.batch import charge_events
from shared import signing
from shared.celery_app import TASKS
from shared.db import session_scope
from shared.models import LedgerTransaction, ParkedEvent
from tests.events import job_completed, raw
from tests.pipeline import Process, wait_for

D = Decimal


def parked(engine: Engine) -> list[str]:
    with Session(engine) as s:
        return list(s.scalars(select(ParkedEvent.reason).order_by(ParkedEvent.id)))


def send(broker: str, worker: str, message: Any) -> None:
    """As an outsider would: plain Celery, the broker's address, nothing of OpenAcct's."""
    Celery("outsider", broker=broker).send_task(TASKS[worker], args=[message], queue=worker, routing_key=worker)


def start_workers(broker: str, logs: Path, key_file: str) -> list[Process]:
    env = {**os.environ, "OPENACCT_BROKER_URL": broker, "OPENACCT_SIGNING_KEY_FILE": key_file}
    started = [Process(["worker", name, "-c", "1"], env, logs / f"{name}.log").start() for name in ("charger", "refunder")]
    for name in ("charger", "refunder"):
        wait_for(lambda n=name: "ready" in (logs / f"{n}.log").read_text(errors="replace"), 60, f"the {name}")
    return started


@pytest.fixture
def workers(center: Engine, redis: Any, tmp_path: Path):  # type: ignore[no-untyped-def]
    started = start_workers(redis.url, tmp_path, os.environ["OPENACCT_SIGNING_KEY_FILE"])
    yield redis.url
    for process in started:
        process.stop()


def test_forged_refunds_and_jobs_are_parked_for_their_signature_and_change_nothing(center: Engine, workers: str) -> None:
    with session_scope() as s:
        charge_events(s, [raw(job_completed(7, cpus=64, seconds=7200)).decode()])  # 64 CPUs for 2 h: 6.40
    before = balance("phys").available
    refund = json.dumps({"schema_version": 1, "kind": "refund.requested", "event_id": "refund:forged",
                         "system": "cluster", "job_id": "7", "reason": "free money", "requester": "mallory"})
    forged_job = raw(job_completed(8, cpus=4, seconds=7200)).decode()
    send(workers, "refunder", [refund])  # unsigned
    send(workers, "charger", [forged_job])  # unsigned
    send(workers, "refunder", {signing.MARK: 1, "task": TASKS["refunder"], "kid": "guessed", "body": [refund],
                               "sig": "0" * 64})  # signed by a key nobody has
    wait_for(lambda: len(parked(center)) == 3, 60, "three forged messages parked")
    reasons = parked(center)
    assert sum(r.startswith("unsigned message") for r in reasons) == 2
    assert any("key 'guessed', which this worker does not know" in r for r in reasons)
    assert balance("phys").available == before
    with Session(center) as s:
        assert s.scalars(select(LedgerTransaction).where(LedgerTransaction.kind == "refund")).all() == []


def test_a_signed_message_changed_on_the_way_is_refused(center: Engine, workers: str) -> None:
    real = signing.seal(TASKS["charger"], [raw(job_completed(9, cpus=64, seconds=3600)).decode()])
    tampered = json.loads(json.dumps(real))
    event = json.loads(tampered["body"][0])
    event.update(cpus=1, account="chem")  # cheaper, and on someone else's account
    tampered["body"][0] = json.dumps(event)
    send(workers, "charger", tampered)
    wait_for(lambda: parked(center), 60, "the changed message parked")
    assert "does not match its signature: changed on the way, or forged" in parked(center)[0]
    assert balance("chem").charged == 0 and balance("phys").charged == 0
    send(workers, "charger", real)  # as it was signed: charged
    wait_for(lambda: balance("phys").charged == D("3.2"), 60, "the real message charged")


def test_a_captured_signed_message_sent_again_changes_nothing(center: Engine, workers: str) -> None:
    """Someone who read signed messages off the broker can send them again, but every effect is
    keyed (the inbox by event id, the ledger by idempotency key): at-least-once delivery."""
    def job(n: int) -> Any:
        return signing.seal(TASKS["charger"], [raw(job_completed(n, cpus=64, seconds=3600)).decode()])

    def refund(n: int) -> Any:
        return signing.seal(TASKS["refunder"], [json.dumps({
            "schema_version": 1, "kind": "refund.requested", "event_id": f"refund:{n}", "system": "cluster",
            "job_id": str(n), "reason": "node fault", "requester": "admin"})])

    captured_job, captured_refund = job(11), refund(11)
    send(workers, "charger", captured_job)
    wait_for(lambda: balance("phys").charged == D("3.2"), 60, "the job charged")
    send(workers, "refunder", captured_refund)
    wait_for(lambda: balance("phys").refunded == D("3.2"), 60, "the job refunded")
    for _ in range(3):
        send(workers, "charger", captured_job)
        send(workers, "refunder", captured_refund)
    # One worker takes each queue in order: once the next genuine messages are applied, so are the copies.
    send(workers, "charger", job(12))
    wait_for(lambda: balance("phys").charged == D("6.4"), 60, "the next job charged")
    send(workers, "refunder", refund(12))
    wait_for(lambda: balance("phys").refunded == D("6.4"), 60, "the next job refunded")
    with Session(center) as s:
        kinds = sorted(s.scalars(select(LedgerTransaction.kind).where(LedgerTransaction.kind != "deposit")))
    assert kinds == ["charge", "charge", "refund", "refund"] and parked(center) == []


def test_a_scheduler_key_sends_jobs_but_cannot_refund(center: Engine, redis: Any, tmp_path: Path) -> None:
    # The workers know the relay's scheduler key beside the administrators' key.
    keys = tmp_path / "workers.json"
    keys.write_text(Path(os.environ["OPENACCT_SIGNING_KEY_FILE"]).read_text())
    keys.chmod(0o600)
    signing.generate(keys, "scheduler", rotate=True)
    scheduler = signing.Keyring(signing.load(keys).keys[:1])
    with session_scope() as s:
        charge_events(s, [raw(job_completed(10, cpus=64, seconds=3600)).decode()])  # 3.20
    refund = json.dumps({"schema_version": 1, "kind": "refund.requested", "event_id": "refund:by-scheduler",
                         "system": "cluster", "job_id": "10", "reason": "mine", "requester": "slurm"})
    started = start_workers(redis.url, tmp_path, str(keys))
    try:
        send(redis.url, "refunder", scheduler.seal(TASKS["refunder"], [refund]))
        wait_for(lambda: parked(center), 60, "the scheduler's refund parked")
        assert parked(center)[0].startswith("refunder.process_batch is not for a scheduler key")
        send(redis.url, "charger", scheduler.seal(TASKS["charger"], [raw(job_completed(11, seconds=3600)).decode()]))
        wait_for(lambda: balance("phys").charged == D("3.4"), 60, "the scheduler's job charged")  # + 4 CPUs, 1 h
    finally:
        for process in started:
            process.stop()
    assert balance("phys").refunded == 0


def test_keys_rotate_without_a_message_lost(center: Engine, redis: Any, tmp_path: Path) -> None:
    old = signing.load(Path(os.environ["OPENACCT_SIGNING_KEY_FILE"]))
    rotated = tmp_path / "rotated.json"
    rotated.write_text(Path(os.environ["OPENACCT_SIGNING_KEY_FILE"]).read_text())
    rotated.chmod(0o600)
    new = signing.generate(rotated, "admin", rotate=True)  # the new key signs, the old still verifies
    assert [k.id for k in signing.load(rotated).keys] == [new.id, old.keys[0].id]
    env = {**os.environ, "OPENACCT_BROKER_URL": redis.url, "OPENACCT_SIGNING_KEY_FILE": str(rotated)}
    charger = Process(["worker", "charger", "-c", "1"], env, tmp_path / "charger.log").start()
    try:
        wait_for(lambda: "ready" in (tmp_path / "charger.log").read_text(errors="replace"), 60, "the charger")
        send(redis.url, "charger", old.seal(TASKS["charger"], [raw(job_completed(12, seconds=3600)).decode()]))
        send(redis.url, "charger", signing.load(rotated).seal(TASKS["charger"],
                                                              [raw(job_completed(13, seconds=3600)).decode()]))
        wait_for(lambda: balance("phys").charged == D("0.4"), 60, "both charged, old key and new")
    finally:
        charger.stop()
    only_new = json.loads(rotated.read_text())
    only_new["keys"] = only_new["keys"][:1]  # the old key removed once every host has the new one
    rotated.write_text(json.dumps(only_new))
    charger = Process(["worker", "charger", "-c", "1"], env, tmp_path / "charger2.log").start()
    try:
        wait_for(lambda: "ready" in (tmp_path / "charger2.log").read_text(errors="replace"), 60, "the charger")
        send(redis.url, "charger", old.seal(TASKS["charger"], [raw(job_completed(14, seconds=3600)).decode()]))
        wait_for(lambda: parked(center), 60, "the old key's message parked")
    finally:
        charger.stop()
    assert f"key {old.keys[0].id!r}, which this worker does not know" in parked(center)[0]
    assert balance("phys").charged == D("0.4")


def test_a_worker_without_keys_refuses_to_start(tmp_path: Path, redis: Any) -> None:
    env = {k: v for k, v in os.environ.items() if k != "OPENACCT_SIGNING_KEY_FILE"}
    worker = Process(["worker", "charger"], {**env, "OPENACCT_BROKER_URL": redis.url}, tmp_path / "w.log").start()
    assert worker.popen is not None and worker.popen.wait(60) == 1
    assert "the charger worker has no signing key file" in (tmp_path / "w.log").read_text()


# -- what the review of the signing found: each a way around it, closed -------------------------------


def test_a_genuine_message_sent_again_under_another_tasks_id_does_not_say_that_task_applied(center: Engine) -> None:
    """Else: take the relay's task off the queue, send any old signed batch under its id, and
    the relay would drop the spooled events as applied, uncharged."""
    from types import SimpleNamespace

    from services.charger.batch import charge_events as handler
    from shared.batches import run_batch
    from shared.models import TaskDelivery

    old = signing.seal(TASKS["charger"], [raw(job_completed(20, seconds=3600)).decode()], "relay-task-1")
    for task_id in ("relay-task-1", "relay-task-2"):
        run_batch(SimpleNamespace(name=TASKS["charger"], request=SimpleNamespace(id=task_id, retries=0)),
                  old, handler, "charger")
    with Session(center) as s:
        done = {t.task_id: t.completed_at is not None for t in s.scalars(select(TaskDelivery))}
    assert done == {"relay-task-1": True, "relay-task-2": False}


@pytest.mark.parametrize("change", [
    {"sig": "é" * 64},  # not hex: compare_digest would raise
    {"sig": "ab"},
    {"body": [{"__type__": "datetime", "__value__": "2026-01-01T00:00:00"}]},
])
def test_a_malformed_envelope_is_refused_not_a_crash(change: dict[str, Any]) -> None:
    from datetime import datetime

    message = signing.seal(TASKS["charger"], ["{}"])
    message.update(change)
    if "body" in change:
        message["body"] = [datetime(2026, 1, 1)]  # what kombu makes of such a payload: no JSON for it
    with pytest.raises(signing.Refused, match="does not match its signature"):
        signing.unseal(TASKS["charger"], message)


def test_with_keys_every_message_is_checked_whatever_allow_unsigned_says(monkeypatch: pytest.MonkeyPatch) -> None:
    from shared.config import get_settings

    monkeypatch.setenv("OPENACCT_ALLOW_UNSIGNED", "true")
    get_settings.cache_clear()
    try:
        with pytest.raises(signing.Refused, match="unsigned message"):
            signing.unseal(TASKS["charger"], ["{}"])
    finally:
        monkeypatch.undo()
        get_settings.cache_clear()


def test_refused_and_misrouted_messages_are_never_replayed(cli: Any, db_connection: Any) -> None:
    from shared.batches import REFUSED
    from shared.deadletter import Parked, park

    forged = raw(job_completed(30, seconds=3600))  # parked whole: as an event, it would read as one
    refund = json.dumps({"schema_version": 1, "kind": "refund.requested", "event_id": "refund:x", "system": "cluster",
                         "job_id": "30", "reason": "r", "requester": "slurm"}).encode()
    with session_scope() as s:
        park(s, [Parked(forged, "unsigned message", kind=REFUSED, source="charger"),
                 Parked(refund, "refund.requested events go to the refunder, not the charger", "refund:x",
                        "refund.requested", "charger")])
        ids = list(s.scalars(select(ParkedEvent.id).order_by(ParkedEvent.id)))
    assert cli("deadletter", "replay", "--all").code == 0  # nothing it may replay
    for parked_id, why in zip(ids, ("refused for its signature", "may not send it to the refunder"), strict=True):
        result = cli("deadletter", "replay", str(parked_id))
        assert result.code == 1 and why in result.err
    assert balance("phys").charged == 0


def test_a_relay_with_a_scheduler_key_sends_refunds_to_the_charger_to_park(tmp_path: Path,
                                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    signing.generate(tmp_path / "scheduler.json", "scheduler")
    monkeypatch.setenv("OPENACCT_SIGNING_KEY_FILE", str(tmp_path / "scheduler.json"))
    from shared.config import get_settings

    get_settings.cache_clear()
    signing.keyring.cache_clear()
    try:
        assert signing.may_send(TASKS["charger"]) and not signing.may_send(TASKS["refunder"])
    finally:
        monkeypatch.undo()
        get_settings.cache_clear()
        signing.keyring.cache_clear()
