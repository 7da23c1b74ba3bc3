"""What someone with nothing but the broker's address can do to the workers: not stop them."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from celery import Celery

from tests.pipeline import Process, wait_for


def test_a_remote_control_shutdown_from_the_broker_stops_no_worker(redis: Any, tmp_path: Path, engine: Any) -> None:
    env = {**os.environ, "OPENACCT_BROKER_URL": redis.url}
    worker = Process(["worker", "refunder", "-c", "1"], env, tmp_path / "worker.log").start()
    outsider = Celery("outsider", broker=redis.url)  # plain Celery: no OpenAcct code, no secrets
    try:
        wait_for(lambda: outsider.control.ping(timeout=0.5), 60, "the refunder to answer a ping")
        for command in ("shutdown", "pool_restart", "rate_limit", "time_limit", "cancel_consumer"):
            outsider.control.broadcast(command, arguments={"task_name": "refunder.process_batch",
                                                           "rate_limit": "1/h", "queue": "refunder"})
        assert outsider.control.ping(timeout=2), "the worker stopped answering"
        assert worker.alive()
        stats = outsider.control.inspect(timeout=2).stats()  # what Flower asks still answers
        assert stats and all(s["pool"]["max-concurrency"] == 1 for s in stats.values())
        queues = outsider.control.inspect(timeout=2).active_queues()
        assert [q["name"] for qs in queues.values() for q in qs] == ["refunder"]
    finally:
        worker.stop()
