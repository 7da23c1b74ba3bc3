"""Metrics, JSON logs and ``openacct health``, against real servers and real processes: the
charger's counters move when a job is charged (in a prefork child, read by the main process),
the relay shows its backlog, and health names exactly what is down."""

from __future__ import annotations

import json
import os
import subprocess
import time
import urllib.request
from pathlib import Path
from typing import Any

from celery import Celery
from prometheus_client.parser import text_string_to_metric_families
from sqlalchemy import Engine, func, select
from sqlalchemy.orm import Session

from shared import signing, spool
from shared.celery_app import TASKS
from shared.models import LedgerTransaction
from tests.events import job_completed, raw
from tests.pipeline import OPENACCT, Process, RedisServer, free_port, stop_all, wait_for


def scrape(port: int) -> dict[tuple[str, frozenset[tuple[str, str]]], float] | None:
    """Every sample of a /metrics page by name and labels; None while nothing answers."""
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as page:
            text = page.read().decode()
    except OSError:
        return None
    return {(s.name, frozenset(s.labels.items())): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def value(port: int, name: str, **labels: str) -> float | None:
    return (scrape(port) or {}).get((name, frozenset(labels.items())))


def send_signed(broker: str, events: list[dict[str, Any]]) -> None:
    task = TASKS["charger"]
    Celery("test", broker=broker).send_task(task, args=[signing.seal(task, [raw(e).decode() for e in events])],
                                            queue="charger", routing_key="charger")


def charges(engine: Engine) -> int:
    with Session(engine) as s:
        return s.scalar(select(func.count()).where(LedgerTransaction.kind == "charge")) or 0


def test_the_chargers_metrics_count_a_charged_job_and_its_logs_are_json_lines(
    center: Engine, redis: RedisServer, tmp_path: Path
) -> None:
    port = free_port()
    log = tmp_path / "charger.log"  # stderr: the log lines; stdout has Celery's own notices
    env = {**os.environ, "OPENACCT_BROKER_URL": redis.url, "OPENACCT_LOG_FORMAT": "json"}
    worker = Process(["worker", "charger", "-c", "2", "--metrics-port", str(port)], env, tmp_path / "stdout",
                     stderr=log).start()
    try:
        wait_for(lambda: "ready" in log.read_text(errors="replace"), 60, "the charger")
        assert value(port, "openacct_events_charged_total") == 0
        assert value(port, "openacct_events_received_total", worker="charger") == 0
        assert value(port, "openacct_holds_open") == 0  # read from the database at the scrape
        nobody = job_completed(2, account="nosuch")  # parked: no such account
        send_signed(redis.url, [job_completed(1, cpus=8), nobody])
        # Counted in the prefork child that ran the batch, served by the main process.
        wait_for(lambda: value(port, "openacct_events_charged_total") == 1, 60, "the charge to be counted")
        assert charges(center) == 1
        assert value(port, "openacct_events_received_total", worker="charger") == 2
        assert value(port, "openacct_events_parked_total", worker="charger") == 1
        assert value(port, "openacct_batch_events_count", worker="charger") == 1
        assert value(port, "openacct_batch_duration_seconds_count", worker="charger") == 1
    finally:
        worker.stop()
    lines = [json.loads(line) for line in log.read_text().splitlines() if line.strip()]  # every line is JSON
    assert {"time", "level", "logger", "message"} <= set(lines[0])
    (parked,) = [line for line in lines if line["message"].startswith("event parked")]
    assert (parked["event_id"], parked["job_id"], parked["worker"]) == (nobody["event_id"], "2", "charger")
    assert parked["task_id"]


def test_the_relays_metrics_show_its_backlog_while_the_broker_is_away(database_url: str, tmp_path: Path) -> None:
    spool_dir = tmp_path / "spool"
    for n in range(7):
        event = job_completed(100 + n)
        spool.write(spool_dir, event["event_id"], raw(event))
    port = free_port()
    broker = RedisServer(tmp_path / "redis")  # never started: the broker is away
    env = {**os.environ, "OPENACCT_BROKER_URL": broker.url, "OPENACCT_SPOOL_DIR": str(spool_dir)}
    relay = Process(["relay", "--metrics-port", str(port)], env, tmp_path / "relay.log").start()
    try:
        wait_for(lambda: value(port, "openacct_relay_backlog_events") == 7, 30, "the relay to report its backlog")
        assert value(port, "openacct_relay_backlog_oldest_seconds") > 0  # type: ignore[operator]
        assert value(port, "openacct_relay_shipped_events_total") == 0
    finally:
        relay.stop()


def health(env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    started = time.monotonic()
    result = subprocess.run([OPENACCT, "health"], env=env, capture_output=True, text=True, timeout=30)
    assert time.monotonic() - started < 10, "health took too long"
    return result


def test_health_is_0_with_everything_up_and_names_the_charger_or_the_database_when_they_are_down(
    center: Engine, redis: RedisServer, tmp_path: Path
) -> None:
    spool.ensure(tmp_path / "spool")
    # Beat's most frequent task (the hold expiry) every 10 s: its first run comes within the test.
    env = {**os.environ, "OPENACCT_BROKER_URL": redis.url, "OPENACCT_SPOOL_DIR": str(tmp_path / "spool"),
           "OPENACCT_DATA_DIR": str(tmp_path / "data"), "OPENACCT_HOLD_EXPIRY_INTERVAL": "10"}
    workers = {kind: Process(["worker", kind, "-c", "1"], env, tmp_path / f"{kind}.log").start()
               for kind in ("charger", "refunder", "reporter")}
    beat_port = free_port()
    beat = Process(["beat", "--metrics-port", str(beat_port)], env, tmp_path / "beat.log").start()
    try:
        # Beat's first run (its least interval, 10 s) is the long wait: watched where it costs
        # nothing, then health is asked until it says everything is up.
        wait_for(lambda: (value(beat_port, "openacct_beat_sent_total", task="reporter.expire_holds") or 0) >= 1, 90,
                 "beat's first run")
        last: list[subprocess.CompletedProcess[str]] = []
        wait_for(lambda: last.append(health(env)) or last[-1].returncode == 0, 60, "a healthy pipeline", interval=0.2)
        out = last[-1].stdout
        for check in ("database", "broker", "charger", "refunder", "reporter", "beat", "relay", "parked"):
            assert f"ok   {check}: " in out, out
        assert last[-1].stderr == ""
        assert value(beat_port, "openacct_beat_sent_total", task="reporter.expire_holds") >= 1  # type: ignore[operator]

        workers["charger"].stop()
        down = health(env)
        assert down.returncode == 1
        assert down.stderr.splitlines() == ["FAIL charger: no worker on the charger queue answered within 2 s"]
        assert "ok   refunder: " in down.stdout and "ok   reporter: " in down.stdout

        away = health({**env, "OPENACCT_DATABASE_URL": "postgresql://nobody@127.0.0.1:1/none"})
        assert away.returncode == 1
        assert [line.split(":")[0] for line in away.stderr.splitlines()] == ["FAIL database", "FAIL charger"]
        assert "--   beat: not checked: needs the database" in away.stdout
    finally:
        stop_all([beat, *workers.values()])


def test_health_refuses_an_unknown_check() -> None:
    result = subprocess.run([OPENACCT, "health", "--skip", "nothing"], capture_output=True, text=True, timeout=30)
    assert result.returncode != 0
    assert "no check named nothing" in result.stderr
