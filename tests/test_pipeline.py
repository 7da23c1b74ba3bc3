"""The whole pipeline with real processes: hook -> spool -> relay -> broker -> charger -> ledger."""

from __future__ import annotations

import os
import subprocess
import time
from collections.abc import Iterator
from decimal import Decimal
from pathlib import Path

import pytest
from sqlalchemy import Engine, func, select
from sqlalchemy.orm import Session

from shared import ledger, spool
from shared.models import Job, LedgerTransaction, ProcessedEvent
from tests.events import job_completed, raw
from tests.pipeline import OPENACCT, Process, RedisServer, wait_for

BROKERS = ["redis"] + (["amqp"] if os.environ.get("OPENACCT_TEST_AMQP_URL") else [])


@pytest.fixture(params=BROKERS)
def broker_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    if request.param == "redis":
        server = RedisServer(tmp_path / "redis")
        server.start()
        yield server.url
        server.stop()
    else:
        url = os.environ["OPENACCT_TEST_AMQP_URL"]
        _purge(url)
        yield url


def _purge(url: str) -> None:
    """Quorum queues outlive a test on a shared RabbitMQ: start each test with them empty."""
    from kombu import Connection

    from shared.celery_app import QUEUES

    with Connection(url) as conn:
        for queue in QUEUES:
            channel = conn.channel()
            try:
                channel.queue_purge(queue)
            except Exception:  # not declared yet: nothing to purge (and the broker closed the channel)
                pass
            finally:
                try:
                    channel.close()
                except Exception:
                    pass


def _env(broker: str, spool_dir: Path, **extra: str) -> dict[str, str]:
    return {**os.environ, "OPENACCT_BROKER_URL": broker, "OPENACCT_SPOOL_DIR": str(spool_dir),
            "OPENACCT_BROKER_VISIBILITY_TIMEOUT": "10", "OPENACCT_RELAY_BATCH_SIZE": "200", **extra}


def _count(engine: Engine, query) -> int:  # type: ignore[no-untyped-def]
    with Session(engine) as s:
        return s.scalar(query)


def charges(engine: Engine) -> int:
    return _count(engine, select(func.count()).where(LedgerTransaction.kind == "charge"))


def processed(engine: Engine) -> int:
    return _count(engine, select(func.count()).select_from(ProcessedEvent))


def verify_clean(engine: Engine) -> None:
    with Session(engine) as s:
        assert ledger.verify(s) == []


def hook(env: dict[str, str], jobcomp_env: dict[str, str]) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run([OPENACCT, "hook", "slurm-jobcomp"], capture_output=True, timeout=30,
                          env={"PATH": "/usr/bin:/bin", "OPENACCT_SPOOL_DIR": env["OPENACCT_SPOOL_DIR"],
                               "OPENACCT_CONFIG": env["OPENACCT_CONFIG"], **jobcomp_env})


def jobcomp_env(job_id: int, *, cpus: int = 8, seconds: int = 7200) -> dict[str, str]:
    end = int(time.time()) - 60
    return {"JOBID": str(job_id), "ARRAYJOBID": "0", "ARRAYTASKID": "4294967294", "USERNAME": "tux",
            "ACCOUNT": "phys", "PARTITION": "batch", "QOS": "normal", "CLUSTER": "cluster",
            "JOBNAME": "sim", "JOBSTATE": "COMPLETED", "EXITCODE": "0:0", "DERIVED_EC": "0:0",
            "SUBMIT": str(end - seconds - 30), "START": str(end - seconds), "END": str(end),
            "NODECNT": "1", "PROCS": str(cpus), "NODES": "c01", "LIMIT": "04:00:00", "BATCH": "yes",
            "UID": "1000", "GID": "1000"}


def test_one_job_hooked_five_times_is_charged_once(center: Engine, broker_url: str, tmp_path: Path) -> None:
    env = _env(broker_url, tmp_path / "spool")
    worker = Process(["worker", "charger", "-c", "1"], env, tmp_path / "worker.log").start()
    relay = Process(["relay"], env, tmp_path / "relay.log").start()
    try:
        job = jobcomp_env(4242, cpus=8, seconds=7200)
        for _ in range(5):
            result = hook(env, job)
            assert result.returncode == 0, result.stderr
        wait_for(lambda: processed(center) >= 1 and spool.backlog(tmp_path / "spool")[0] == 0, 60,
                 "the event to be charged")
        time.sleep(1.5)  # let any repeat reach the worker
        wait_for(lambda: spool.backlog(tmp_path / "spool")[0] == 0, 30, "the spool to drain")
    finally:
        relay.stop()
        worker.stop()
    with Session(center) as s:
        (txn,) = s.scalars(select(LedgerTransaction).where(LedgerTransaction.kind == "charge")).all()
        assert txn.quantity == Decimal(16)  # 8 CPUs x 2 hours
        assert txn.amount == Decimal("0.8")
        assert s.scalar(select(Job.job_id).where(Job.id == txn.job_id)) == "4242"
    verify_clean(center)


def test_a_charger_killed_mid_batch_loses_nothing_and_charges_nothing_twice(
    center: Engine, redis: RedisServer, tmp_path: Path
) -> None:
    total = 6000
    spool_dir = tmp_path / "spool"
    for i in range(total):
        event = job_completed(10_000 + i, cpus=2, seconds=1800)
        spool.write(spool_dir, event["event_id"], raw(event))
    env = _env(redis.url, spool_dir)
    worker = Process(["worker", "charger", "-c", "1"], env, tmp_path / "worker.log").start()
    relay = Process(["relay"], env, tmp_path / "relay.log").start()
    try:
        wait_for(lambda: processed(center) > 0, 60, "the first batch to commit", interval=0.02)
        worker.kill()  # SIGKILL to the whole process group, mid-stream
        at_kill = processed(center)
        assert 0 < at_kill < total, "the worker finished before it could be killed"
        worker.start()  # unacknowledged batches come back after the visibility timeout
        wait_for(lambda: processed(center) >= total, 120, "every event to be charged")
    finally:
        relay.stop()
        worker.stop()
    with Session(center) as s:
        count, amount = s.execute(
            select(func.count(), func.sum(LedgerTransaction.amount)).where(LedgerTransaction.kind == "charge")
        ).one()
    assert count == total
    assert amount == total * Decimal("0.05")  # 2 CPUs x 0.5 h x 0.05 each
    verify_clean(center)


def test_hooks_keep_working_with_the_broker_down_and_everything_is_charged_when_it_returns(
    center: Engine, tmp_path: Path
) -> None:
    redis = RedisServer(tmp_path / "redis")  # not started: the broker is down
    spool_dir = tmp_path / "spool"
    env = _env(redis.url, spool_dir)
    relay = Process(["relay"], env, tmp_path / "relay.log").start()
    worker = None
    try:
        for job in range(5):
            started = time.monotonic()
            result = hook(env, jobcomp_env(500 + job))
            assert result.returncode == 0, result.stderr
            assert time.monotonic() - started < 2
        time.sleep(2)
        assert relay.alive()
        assert spool.backlog(spool_dir)[0] == 5  # kept while the broker is away
        redis.start()
        worker = Process(["worker", "charger", "-c", "1"], env, tmp_path / "worker.log").start()
        wait_for(lambda: charges(center) == 5, 90, "the spooled events to be charged")
        wait_for(lambda: spool.backlog(spool_dir)[0] == 0, 10, "the spool to drain")
    finally:
        relay.stop()
        if worker is not None:
            worker.stop()
        redis.stop()
    verify_clean(center)
