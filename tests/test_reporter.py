"""The reporter's batch logic in-process: report requests applied once, statement files written
whole, requests for reports not available parked with the reason."""

from __future__ import annotations

import json
from collections.abc import Iterator

import pytest
from sqlalchemy import select

from openacct.shortcuts import charge, deposit
from services.reporter.tasks import previous_month, report_events
from shared.config import get_settings
from shared.db import session_scope
from shared.models import AlertSent, ParkedEvent


def request(event_id: str, report: str, **params: object) -> str:
    return json.dumps({"schema_version": 1, "kind": "report.requested", "event_id": event_id,
                       "report": report, "params": params})


def apply(*items: str):  # type: ignore[no-untyped-def]
    with session_scope() as s:
        return report_events(s, list(items))


@pytest.fixture
def settled_now(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Statements issued count what was posted up to this very second (the history was posted now)."""
    monkeypatch.setenv("OPENACCT_STATEMENT_SETTLE", "0")
    get_settings.cache_clear()
    yield
    monkeypatch.undo()
    get_settings.cache_clear()


@pytest.mark.usefixtures("quickstart")
def test_report_requests_are_applied_once_and_unknown_reports_parked(settled_now: None) -> None:
    deposit("phys", "100", start="2026-01-01")
    charge("phys", "cluster-core-hours", "1200", user="tux", effective_at="2026-10-05T12:00:00Z")  # 60 of 100
    outcome = apply(request("r:1", "alerts"), request("r:2", "statements", period="2026-10"),
                    request("r:3", "usage"), request("r:1", "alerts"))
    assert (outcome.recorded, outcome.duplicates, outcome.parked) == (2, 1, 1)
    with session_scope() as s:
        assert [k.split(":")[0] for k in s.scalars(select(AlertSent.key))] == ["low"]
        (reason,) = s.scalars(select(ParkedEvent.reason))
    assert reason == "report 'usage' is not available yet: one of alerts, rollup, statements"
    directory = get_settings().data_dir / "reports" / "2026-10"
    assert sorted(p.name for p in directory.iterdir()) == [
        "chem.csv", "chem.html", "chem.json", "phys.csv", "phys.html", "phys.json"]
    phys = json.loads((directory / "phys.json").read_text())
    assert (phys["opening"], phys["charges"], phys["closing"]) == ("100.00", "-60.00", "40.00")


def test_last_month_is_the_default_period() -> None:
    import datetime as dt

    assert previous_month(dt.date(2026, 1, 15)) == "2025-12"
    assert previous_month(dt.date(2026, 11, 1)) == "2026-10"


def test_one_beat_runs_and_a_second_waits_for_it(center, redis, tmp_path) -> None:  # type: ignore[no-untyped-def]
    import os

    from tests.pipeline import Process, wait_for

    env = {**os.environ, "OPENACCT_BROKER_URL": redis.url, "OPENACCT_DATA_DIR": str(tmp_path)}
    first = Process(["beat", "--loglevel", "info"], env, tmp_path / "first.log").start()
    second = Process(["beat", "--loglevel", "info"], env, tmp_path / "second.log")
    try:
        wait_for(lambda: "beat: Starting" in (tmp_path / "first.log").read_text(errors="replace"), 60, "the first beat")
        second.start()
        wait_for(lambda: "another openacct beat is running" in (tmp_path / "second.log").read_text(errors="replace"),
                 60, "the second beat to wait")
        assert "beat: Starting" not in (tmp_path / "second.log").read_text(errors="replace")
        first.stop()
        wait_for(lambda: "beat: Starting" in (tmp_path / "second.log").read_text(errors="replace"), 60,
                 "the second beat to take over")
    finally:
        second.stop()
        first.stop()


def test_schedules_are_cron_lines() -> None:
    from shared.celery_app import cron
    from shared.config import Settings

    assert Settings(statements_schedule="0 2 1 * *").statements_schedule == "0 2 1 * *"
    assert cron("0 2 1 * *").day_of_month == {1} and cron("0 2 1 * *").hour == {2}
    with pytest.raises(ValueError, match="five fields"):
        Settings(rollup_schedule="hourly")
    with pytest.raises(ValueError, match="Invalid end range"):
        Settings(rollup_schedule="99 * * * *")


@pytest.mark.usefixtures("quickstart")
def test_a_failed_report_request_can_be_replayed() -> None:
    bad = request("r:9", "rollup", **{"from": "not-a-date"})
    assert apply(bad).parked == 1
    with session_scope() as s:
        from shared.models import ProcessedEvent

        assert s.get(ProcessedEvent, "r:9") is None  # not claimed: a replay runs it again
    again = apply(bad)
    assert again.duplicates == 0 and again.recorded == 0  # it ran, and failed the same way
