"""``openacct flower`` serves Flower on the workers' broker (a real Flower on a real Redis)."""

from __future__ import annotations

import os
import signal
import urllib.request
from pathlib import Path
from typing import Any

from tests.pipeline import Process, free_port, wait_for


def test_flower_serves_its_dashboard_on_the_workers_broker(redis: Any, tmp_path: Path) -> None:
    port = free_port()
    flower = Process(["flower", "--port", str(port)], {**os.environ, "OPENACCT_BROKER_URL": redis.url},
                     tmp_path / "flower.log").start()

    def page(path: str) -> str:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=10) as response:
                return response.read().decode()
        except OSError:
            return ""

    try:
        wait_for(lambda: page("/healthcheck") == "OK", 60, "Flower")
        assert "Flower" in page("/workers") and "<table" in page("/workers")
        log = (tmp_path / "flower.log").read_text()
        assert f"Broker: {redis.url}" in log
        for task in ("charger.process_batch", "refunder.process_batch", "reporter.process_batch", "reporter.alerts"):
            assert task in log  # it knows all three workers' tasks
        # It stops on SIGTERM, as systemd and compose stop it, and soon: not killed after their timeouts.
        os.killpg(flower.popen.pid, signal.SIGTERM)
        assert flower.popen.wait(10) == 0
        assert "shutting down" in (tmp_path / "flower.log").read_text()
    finally:
        flower.kill()
