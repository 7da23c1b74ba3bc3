"""The refunder: its batch logic in-process (each test rolled back), the host list syntax, and
``openacct refund`` / ``openacct incident --wait`` through a real refunder worker and Redis."""

from __future__ import annotations

import datetime as dt
import json
import os
import time
from collections.abc import Iterator
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import Engine, func, select
from sqlalchemy.orm import Session

from openacct.shortcuts import balance, create_service, deposit, grant_service_access
from services.charger.batch import charge_events
from services.refunder.batch import refund_events
from shared import hostlist, ledger
from shared.db import session_scope
from shared.errors import InvalidInput
from shared.models import LedgerTransaction, ParkedEvent
from tests.conftest import Cli, Result
from tests.events import job_completed, raw
from tests.pipeline import Process, wait_for

D = Decimal
UTC = dt.UTC


def refund_request(request_id: str, **fields: Any) -> str:
    event = {"schema_version": 1, "kind": "refund.requested", "event_id": f"refund:{request_id}",
             "reason": "node c01 lost its memory", "requester": "admin", **fields}
    if "job_id" in event:
        event.setdefault("system", "cluster")
    return json.dumps(event)


def charge_jobs(*events: dict[str, Any]) -> None:
    with session_scope() as s:
        outcome = charge_events(s, [raw(e).decode() for e in events])
    assert outcome.charged == len(events)


def refund(*requests: str):  # type: ignore[no-untyped-def]
    with session_scope() as s:
        return refund_events(s, list(requests))


def transactions(kind: str) -> list[LedgerTransaction]:
    with session_scope() as s:
        return list(s.scalars(select(LedgerTransaction).where(LedgerTransaction.kind == kind)
                              .order_by(LedgerTransaction.id)))


def parked_reasons() -> list[str]:
    with session_scope() as s:
        return list(s.scalars(select(ParkedEvent.reason).order_by(ParkedEvent.id)))


def verify_clean() -> None:
    with session_scope() as s:
        assert ledger.verify(s) == []


@pytest.fixture
def funded(quickstart: None) -> None:
    gpu = create_service("cluster-gpu-hours", system="cluster", units="gpu-hours", charge_rate="0.8")
    grant_service_access(gpu, project="phys")
    deposit("phys", "1000", start="2000-01-01")


@pytest.mark.usefixtures("funded")
class TestRefunds:
    def test_a_job_refunded_in_full_gets_all_its_charges_back(self) -> None:
        charge_jobs(job_completed(1, cpus=16, seconds=5400, gpus=2))  # core-hours and GPU-hours
        before = balance("phys").available
        charged = sum(c.amount for c in transactions("charge"))
        outcome = refund(refund_request("r1", job_id="1"))
        assert (outcome.recorded, outcome.transactions, outcome.parked) == (1, 2, 0)
        refunds = transactions("refund")
        assert {r.refers_to_id for r in refunds} == {c.id for c in transactions("charge")}
        assert sum(r.amount for r in refunds) == charged
        assert balance("phys").available == before + charged == D("1000")
        assert refunds[0].description == "node c01 lost its memory" and "admin" in refunds[0].actor
        verify_clean()

    def test_the_same_request_twice_refunds_once(self) -> None:
        charge_jobs(job_completed(2))
        first = refund(refund_request("same", job_id="2", fraction="0.25"))
        again = refund(refund_request("same", job_id="2", fraction="0.25"))
        both = refund(refund_request("same", job_id="2", fraction="0.25"), refund_request("same", job_id="2", fraction="0.25"))
        assert (first.recorded, again.duplicates, both.duplicates) == (1, 1, 2)
        (r,) = transactions("refund")
        assert r.amount == transactions("charge")[0].amount / 4

    def test_a_refund_larger_than_what_is_left_is_refused_with_the_reason(self) -> None:
        charge_jobs(job_completed(3, cpus=10, seconds=3600))  # 10 core-hours at 0.05: 0.50
        refund(refund_request("half", job_id="3", amount="0.3"))
        outcome = refund(refund_request("too-much", job_id="3", amount="0.25"))
        assert outcome.parked == 1
        assert parked_reasons() == ["refund of 0.25 refused: job 3 has 0.20 left to refund"]
        assert sum(r.amount for r in transactions("refund")) == D("0.3")
        refund(refund_request("rest", job_id="3"))  # everything left
        assert sum(r.amount for r in transactions("refund")) == D("0.5")
        assert refund(refund_request("more", job_id="3")).parked == 1
        assert "has nothing left to refund" in parked_reasons()[-1]
        verify_clean()

    def test_fractions_add_up_to_the_whole_and_no_further(self) -> None:
        charge_jobs(job_completed(4, cpus=3, seconds=3600))
        for n in range(2):
            assert refund(refund_request(f"half-{n}", job_id="4", fraction="0.5")).recorded == 1
        assert refund(refund_request("half-2", job_id="4", fraction="0.5")).parked == 1
        assert sum(r.amount for r in transactions("refund")) == transactions("charge")[0].amount

    def test_an_amount_is_spread_over_a_jobs_charges_by_what_each_has_left(self) -> None:
        charge_jobs(job_completed(5, cpus=4, gpus=1, seconds=3600))
        charges = {c.id: c.amount for c in transactions("charge")}
        total = sum(charges.values())
        refund(refund_request("part", job_id="5", amount=str(total / 2)))
        given = {r.refers_to_id: r.amount for r in transactions("refund")}
        assert sum(given.values()) == total / 2
        for charge_id, amount in charges.items():
            assert abs(given[charge_id] - amount / 2) <= D("0.000001")

    def test_one_charge_by_transaction_id(self) -> None:
        charge_jobs(job_completed(6, cpus=2, gpus=1))
        cpu, gpu = transactions("charge")
        refund(refund_request("one", transaction_id=gpu.id))
        (r,) = transactions("refund")
        assert (r.refers_to_id, r.amount) == (gpu.id, gpu.amount)

    @pytest.mark.parametrize(("fields", "reason"), [
        ({"job_id": "404"}, "no job 404 on cluster"),
        ({"job_id": "1", "system": "nowhere"}, "unknown system 'nowhere'"),
        ({"transaction_id": 999999}, "no transaction #999999"),
        ({"transaction_id": "the deposit"}, "is a deposit, not a charge"),
    ])
    def test_requests_that_name_nothing_refundable_are_parked(self, fields: dict[str, Any], reason: str) -> None:
        if fields.get("transaction_id") == "the deposit":
            fields = {"transaction_id": transactions("deposit")[0].id}
        outcome = refund(refund_request("bad", **fields))
        assert outcome.parked == 1 and transactions("refund") == []
        assert reason in parked_reasons()[0]

    def test_a_job_that_was_not_charged_is_refused(self) -> None:
        with session_scope() as s:
            charge_events(s, [raw(job_completed(7, state="NODE_FAIL")).decode()])
        assert refund(refund_request("free", job_id="7")).parked == 1
        assert "was not charged: nothing to refund" in parked_reasons()[0]

    def test_job_events_sent_to_the_refunder_are_parked_and_the_rest_applied(self) -> None:
        charge_jobs(job_completed(8))
        outcome = refund(raw(job_completed(9)).decode(), "{not json", refund_request("ok", job_id="8"))
        assert (outcome.recorded, outcome.parked) == (1, 2)
        assert "job.completed events go to the charger, not the refunder" in parked_reasons()


@pytest.mark.parametrize(("text", "hosts"), [
    ("c01", ["c01"]),
    ("c[01-03],gpu7", ["c01", "c02", "c03", "gpu7"]),
    ("c[08-10]", ["c08", "c09", "c10"]),
    ("r[1-2]n[1,3]", ["r1n1", "r1n3", "r2n1", "r2n3"]),
    ("c[1-2]-ib,c1-ib", ["c1-ib", "c2-ib"]),
])
def test_slurm_host_lists_expand(text: str, hosts: list[str]) -> None:
    assert hostlist.expand(text) == hosts


@pytest.mark.parametrize(("text", "message"), [
    ("c[01-", "unclosed"), ("c[3-1]", "runs backwards"), ("c[a-b]", "bad range"), ("", "empty host list"),
    ("c;rm", "bad host name"), ("c[0-99999999]", "more than"),
])
def test_bad_host_lists_are_refused(text: str, message: str) -> None:
    with pytest.raises(InvalidInput, match=message):
        hostlist.expand(text)


# --------------------------------------------------------------------------- the commands refuse early


@pytest.fixture
def refund_cli(funded: None, cli: Cli, redis: Any, monkeypatch: pytest.MonkeyPatch) -> Iterator[Cli]:
    """``openacct`` in-process on the funded center, its broker a real Redis with no worker:
    job 1 charged (4 core-hours, 0.20), job 2 not charged (NODE_FAIL)."""
    from shared import config
    from shared.celery_app import get_app

    with session_scope() as s:
        charge_events(s, [raw(job_completed(1)).decode(), raw(job_completed(2, state="NODE_FAIL")).decode()])
    monkeypatch.setenv("OPENACCT_BROKER_URL", redis.url)
    monkeypatch.setenv("OPENACCT_DEFAULT_SYSTEM", "cluster")
    config.get_settings.cache_clear()
    get_app.cache_clear()
    yield cli
    monkeypatch.undo()
    config.get_settings.cache_clear()
    get_app.cache_clear()


def queued(redis: Any) -> int:
    """Messages waiting in the broker's refunder queue (kombu keeps one list per priority)."""
    import redis as redis_client

    broker = redis_client.Redis(unix_socket_path=str(redis.socket))
    try:
        return sum(broker.llen(key) for key in broker.keys("refunder*") if broker.type(key) == b"list")
    finally:
        broker.close()


def one_error_line(result: Result) -> str:
    assert (result.code, result.out) == (1, ""), result
    (line,) = result.err.splitlines()
    assert line.startswith("error: "), line
    return line


WHY = ["--reason", "node c01 lost its memory"]


@pytest.mark.parametrize(("argv", "reason"), [
    (["refund", "404", *WHY], "no job 404 on cluster"),
    (["refund", "1", "--system", "nowhere", *WHY], "unknown system 'nowhere'"),
    (["refund", "txn:999999", *WHY], "no transaction #999999"),
    (["refund", "the deposit", *WHY], "is a deposit, not a charge: only charges are refunded"),
    (["refund", "2", *WHY], "job 2 on cluster was not charged: nothing to refund"),
    (["refund", "1", "--amount", "0.25", *WHY], "refund of 0.25 refused: job 1 has 0.20 left to refund"),
    (["refund", "1", "--amount", "0.25", "--wait", *WHY], "refund of 0.25 refused: job 1 has 0.20 left to refund"),
    (["incident", "c01", "--system", "nowhere", "--from", "2000-01-01", "--to", "2000-01-02", *WHY],
     "no system or alias named 'nowhere'"),
    (["rerate", "--service", "nope", "--from", "2000-01-01", "--to", "2000-01-02"], "no service named 'nope'"),
    (["rerate", "--service", "cluster-core-hours", "--project", "nope", "--from", "2000-01-01", "--to", "2000-01-02"],
     "no project named 'nope'"),
])
def test_a_refund_of_nothing_refundable_is_refused_before_anything_is_sent(
        refund_cli: Cli, redis: Any, argv: list[str], reason: str) -> None:
    if argv[1] == "the deposit":
        argv = ["refund", f"txn:{transactions('deposit')[0].id}", *WHY]
    line = one_error_line(refund_cli(*argv))
    assert reason in line
    assert queued(redis) == 0
    assert transactions("refund") == []


def test_a_job_refunded_in_full_is_refused_before_anything_is_sent(refund_cli: Cli, redis: Any) -> None:
    refund(refund_request("all", job_id="1"))
    line = one_error_line(refund_cli("refund", "1", "--reason", "again"))
    assert line == "error: job 1 has nothing left to refund: its charges were refunded in full"
    assert queued(redis) == 0


def test_a_request_applied_before_is_not_sent_again(refund_cli: Cli, redis: Any) -> None:
    refund(refund_request("r1", job_id="1"))
    result = refund_cli("refund", "1", *WHY, "--request-id", "r1")
    assert (result.code, result.out, result.err) == (0, "refund request refund:r1 was applied before: nothing sent\n", "")
    assert queued(redis) == 0


def test_a_refund_that_can_be_applied_is_sent(refund_cli: Cli, redis: Any) -> None:
    result = refund_cli("refund", "1", *WHY, "--request-id", "r2")
    assert (result.code, result.out, result.err) == (0, "refund request refund:r2 sent to the refunder\n", "")
    assert queued(redis) == 1


def test_wait_with_no_refunder_running_fails_fast_and_sends_nothing(refund_cli: Cli, redis: Any) -> None:
    started = time.monotonic()
    line = one_error_line(refund_cli("refund", "1", *WHY, "--wait"))
    assert time.monotonic() - started < 10  # not the minute --wait waits for an answer
    assert line == (f"error: no refunder is running (none answered on {redis.url} within 2 s): "
                    "start `openacct worker refunder`")
    assert queued(redis) == 0


def test_refund_and_incident_commands_through_a_real_refunder(center: Engine, redis: Any, tmp_path: Path,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    from openacct.cli import run
    from shared import config
    from shared.celery_app import get_app

    now = dt.datetime.now(UTC).replace(microsecond=0)
    hour = dt.timedelta(hours=1)
    jobs = [  # (job, nodes, ended): the incident is c[02-03] from now-3h to now-1h
        (101, "c[01-02]", now - 2 * hour),      # on c02 during the incident: refunded
        (102, "c[03-04]", now - 30 * dt.timedelta(minutes=1)),  # ran into the window on c03: refunded
        (103, "c[04-05]", now - 2 * hour),      # other nodes: kept
        (104, "c02", now - 5 * hour),           # ended before the incident: kept
        (105, "c01", now - 2 * hour),           # other node: kept
    ]
    with session_scope() as s:
        charge_events(s, [raw(job_completed(j, node_list=nodes, end=end, seconds=3600)).decode()
                          for j, nodes, end in jobs])
    env = {"OPENACCT_BROKER_URL": redis.url, "OPENACCT_DEFAULT_SYSTEM": "cluster"}
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    config.get_settings.cache_clear()
    get_app.cache_clear()
    worker = Process(["worker", "refunder", "-c", "1"], {**os.environ, **env}, tmp_path / "refunder.log").start()
    try:
        wait_for(lambda: "ready" in (tmp_path / "refunder.log").read_text(errors="replace"), 60, "the refunder")
        assert run(["refund", "105", "--fraction", "0.5", "--reason", "slow disk", "--wait"]) == 0
        assert run(["refund", "105", "--fraction", "0.5", "--reason", "slow disk", "--wait"]) == 0  # the same request
        assert run(["refund", "105", "--amount", "99", "--reason", "all of it", "--wait"]) == 1  # more than is left
        window = ["--from", (now - 3 * hour).isoformat(), "--to", (now - hour).isoformat()]
        assert run(["incident", "c[02-03]", *window, "--reason", "PSU failure", "--wait"]) == 0
        assert run(["incident", "c[02-03]", *window, "--reason", "PSU failure", "--wait"]) == 0  # nothing left: no-op
    finally:
        worker.stop()
        monkeypatch.undo()
        config.get_settings.cache_clear()
        get_app.cache_clear()
    with Session(center) as s:
        refunded = dict(s.execute(
            select(LedgerTransaction.job_id, func.sum(LedgerTransaction.amount))
            .where(LedgerTransaction.kind == "refund").group_by(LedgerTransaction.job_id)).all())
        charged = dict(s.execute(
            select(LedgerTransaction.job_id, LedgerTransaction.amount).where(LedgerTransaction.kind == "charge")).all())
        from shared.models import Job
        job_of = dict(s.execute(select(Job.id, Job.job_id)).all())
        assert {job_of[j]: amount for j, amount in refunded.items()} == {
            "105": charged[_key(job_of, "105")] / 2,
            "101": charged[_key(job_of, "101")], "102": charged[_key(job_of, "102")]}
        assert ledger.verify(s) == []


def _key(job_of: dict[int, str], job: str) -> int:
    return next(k for k, v in job_of.items() if v == job)


def test_a_host_list_too_big_to_build_is_refused_before_it_is_built() -> None:
    with pytest.raises(InvalidInput, match="more than"):
        hostlist.expand("a[0-999999]b[0-999999]")
