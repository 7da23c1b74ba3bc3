"""The reporter's Celery tasks: report requests from the queue, and the beat schedule's runs.

Thin and late-acked like the other workers; each run is one transaction, and safe to repeat:
alerts are claimed once per threshold, statements are files written whole over the last run's.
Alerts are the exception to one transaction: none is open while they go out (``alerts.send``).
"""

from __future__ import annotations

import datetime as dt
import functools
import logging
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

from sqlalchemy.orm import Session

from services.reporter import alerts, render, usage
from services.reporter.statements import issue, month, statements
from shared import inbox, scheduled_runs, signing
from shared.batches import RETRYABLE, Outcome, run_batch, sort_out
from shared.celery_app import get_app
from shared.config import get_settings
from shared.db import session_scope
from shared.deadletter import Parked, park
from shared.events import ReportRequested

app = get_app()
AVAILABLE = {"alerts", "statements", "rollup"}
# Each scheduled rollup does the last few days again: late job events land within them.
ROLLUP_DAYS = usage.ROLLED_AGAIN_DAYS
# The most a rollup asked through the broker may redo (the CLI's `report rollup` has no such limit).
MAX_ROLLUP_DAYS = 400
# Seconds: jobs that ended this recently may still be on their way from the jobcomp hook.
RECONCILE_SETTLE = 600
log = logging.getLogger("openacct.reporter")


def scheduled(name: str) -> Callable[[Callable[..., Any]], Any]:
    """A task beat sends (or an administrator): its arguments come by name in a signed message,
    and the function checks them (a message may carry anything)."""
    def register(function: Callable[..., Any]) -> Any:
        @app.task(name=name, acks_late=True, autoretry_for=RETRYABLE, retry_backoff=True, max_retries=5,
                  typing=False)
        @functools.wraps(function)
        def task(message: Any = None) -> Any:
            arguments = signing.unseal(name, message)
            if not isinstance(arguments, dict):
                raise ValueError(f"{name} takes its arguments by name, not {arguments!r}")
            with session_scope() as session:  # before the run, which may fail: beat did send it
                scheduled_runs.note_run(session, name)
            return function(**arguments)

        return task

    return register


@app.task(name="reporter.process_batch", bind=True, autoretry_for=RETRYABLE, retry_backoff=True,
          retry_backoff_max=60, retry_jitter=True, max_retries=None)
def process_batch(self, events: list) -> dict[str, int]:  # type: ignore[no-untyped-def]
    asked: list[str] = []
    outcome = run_batch(self, events, functools.partial(report_events, alerts_asked=asked), source="reporter")
    if asked:
        # The batch's transaction recorded the alerts due as owed; they go out now that it is over
        # (a run too many, after a batch tried again one event at a time, gives nothing twice).
        deliver_alerts()
    return outcome


@scheduled("reporter.alerts")
def send_alerts() -> int:
    """Deliver the alerts due now (beat runs this every ``alert_interval`` seconds)."""
    return deliver_alerts()


def deliver_alerts() -> int:
    settings = get_settings()
    with session_scope() as session:
        return len(alerts.send(session, settings, alerts.due(session, settings)))


@scheduled("reporter.statements")
def write_statements(period: str | None = None) -> str:
    """Every project's statement for ``period`` (default: last month) as HTML, CSV and JSON
    files under ``<data dir>/reports/<period>/``."""
    if period is not None and not isinstance(period, str):
        raise ValueError(f"period must be a month such as 2026-10, not {period!r}")
    with session_scope() as session:
        return str(statement_files(session, period or previous_month()))


@scheduled("reporter.expire_holds")
def expire_holds() -> int:
    """Release the holds of jobs that never reported back (beat runs this every ``hold_expiry_interval`` s)."""
    from shared import ledger

    with session_scope() as session:
        return len(ledger.expire_holds(session))


@scheduled("reporter.reconcile")
def reconcile_slurm(settle: int = RECONCILE_SETTLE, lookback: int | None = None) -> dict[str, int]:
    """Charge the jobs sacct says ended in the ``lookback`` seconds (``reconcile_lookback``)
    before the last ``settle`` whose jobcomp record never arrived (beat runs this on
    ``reconcile_schedule``), as `openacct slurm reconcile` does. Their events go straight to
    the charger's queue: this worker may run where no relay ships a spool, and an event lost on
    the way is found missing by the next run."""
    import time

    from shared.slurm import reconcile as slurm_reconcile
    from shared.slurm import sacct

    settings = get_settings()
    # A message may carry any arguments: no wider window than the site set, no settling beyond a day.
    settle = bounded("settle", settle, 0, 86_400)
    lookback = bounded("lookback", settings.reconcile_lookback if lookback is None else lookback,
                       1, settings.reconcile_lookback)
    until = dt.datetime.now(dt.UTC) - dt.timedelta(seconds=settle)
    since = until - dt.timedelta(seconds=lookback)
    records, unreadable = sacct.query(since, until, None)
    with session_scope() as session:
        result = slurm_reconcile.reconcile(session, records, unreadable, publish=_to_charger, now=int(time.time()))
    for finding in result.findings:
        if finding.status in slurm_reconcile.UNRECONCILED:
            log.warning("reconcile: job %s %s: expected %s, charged %s %s", finding.job, finding.status,
                        finding.expected, finding.charged, finding.note,
                        extra={"job_id": finding.job, "event_id": finding.event_id})
    log.info("reconcile of jobs that ended from %s to %s: %s", since.isoformat(), until.isoformat(),
             " ".join(f"{k}={v}" for k, v in result.counts.items()))
    return result.counts


@scheduled("reporter.slurm_limits")
def slurm_limits() -> dict[str, int]:
    """Keep each Slurm account's GrpTRESMins in step with what its account can pay, as
    `openacct slurm limits` does (beat runs this on ``slurm_limits_schedule``; the refunder asks
    for it after each refund). A limit sacctmgr did not take fails the task (logged): the next run
    sets it."""
    from shared.slurm import limits

    with session_scope() as session:
        found, failures = limits.keep_in_step(session)
    for warning in found.warnings:
        log.warning("slurm limits: %s", warning)
    changed = [limit for limit in found.limits if limit.changed]
    for limit in changed:
        log.info("slurm limits: %s GrpTRESMins=billing=%s (was %s; %s used, %s payable)", limit.slurm_account,
                 limit.wanted, limit.current, limit.used, limit.payable)
    if failures:
        raise RuntimeError("sacctmgr did not set every limit: " + "; ".join(failures))
    return {"accounts": len(found.limits), "changed": len(changed)}


def _to_charger(events: list[tuple[str, bytes]]) -> None:
    from shared.celery_app import TASKS
    from shared.relay import message_item

    items = [message_item(raw)[1] for _, raw in events]
    size = get_settings().relay_batch_size
    for first in range(0, len(items), size):
        app.send_task(TASKS["charger"], args=[signing.seal(TASKS["charger"], items[first:first + size])],
                      queue="charger", routing_key="charger")


@scheduled("reporter.rollup")
def roll_up(days: int = ROLLUP_DAYS) -> int:
    """Roll up usage for today and the ``days`` before it (beat runs this hourly)."""
    days = bounded("days", days, 0, MAX_ROLLUP_DAYS)
    today = dt.datetime.now(dt.UTC).date()
    with session_scope() as session:
        return usage.rollup(session, today - dt.timedelta(days=days), today)


def bounded(name: str, value: object, low: int, high: int) -> int:
    """A task's whole-number argument within what the site allows, or ValueError: the task fails
    and is not retried."""
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise ValueError(f"{name} must be a whole number from {low} to {high}, not {value!r}")
    return value


def report_events(session: Session, items: list[Any], *, source: str = "",
                  alerts_asked: list[str] | None = None) -> Outcome:
    """Apply report requests in the batch's transaction. An alerts request only records the
    alerts due as owed, and its id in ``alerts_asked``: the caller sends them once the
    transaction is over (no network I/O inside it)."""
    outcome = Outcome()
    requests, parked = sort_out(items, (ReportRequested,), "reporter", source)
    for request, raw in requests:
        if request.report not in AVAILABLE:
            parked.append(Parked(raw, f"report {request.report!r} is not available yet: one of "
                                      f"{', '.join(sorted(AVAILABLE))}", request.event_id, request.kind, source))
            continue
        try:
            with session.begin_nested():  # a request that fails leaves no claim: it can be replayed
                if not inbox.claim(session, [(request.event_id, request.kind)]):
                    outcome.duplicates += 1
                    continue
                if request.report == "alerts":
                    alerts.owe(session, alerts.due(session, get_settings()))
                    if alerts_asked is not None:
                        alerts_asked.append(request.event_id)
                elif request.report == "rollup":
                    today = dt.datetime.now(dt.UTC).date()
                    first = dt.date.fromisoformat(str(request.params.get("from") or today - dt.timedelta(days=ROLLUP_DAYS)))
                    last = dt.date.fromisoformat(str(request.params.get("to") or today))
                    bounded("the days from 'from' to 'to'", (last - first).days, 0, MAX_ROLLUP_DAYS)
                    usage.rollup(session, first, last)
                else:
                    statement_files(session, str(request.params.get("period") or previous_month()))
        except (ValueError, OSError) as exc:
            parked.append(Parked(raw, f"report {request.report!r} failed: {exc}", request.event_id, request.kind, source))
            continue
        outcome.recorded += 1
    outcome.parked = park(session, parked)
    return outcome


def previous_month(today: dt.date | None = None) -> str:
    first = (today or dt.datetime.now(dt.UTC).date()).replace(day=1)
    last = first - dt.timedelta(days=1)
    return f"{last:%Y-%m}"


def statement_files(session: Session, period: str) -> Path:
    start, end = month(period)
    issue(session, start, end, get_settings().statement_settle)  # what is posted for it later shows next month
    # A project's money is its own: the files are for the reporter's user and its group alone.
    reports = get_settings().data_dir / "reports"
    directory = reports / period
    for folder in (reports, directory):
        folder.mkdir(mode=0o750, exist_ok=True, parents=folder is reports)
        folder.chmod(0o750)
    for st in statements(session, start, end):
        for suffix, text in (("html", render.to_html(st)), ("csv", render.to_csv(st)), ("json", render.to_json(st))):
            path = directory / f"{st.project}.{suffix}"
            tmp = path.with_suffix(f".{suffix}.tmp")
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o640)
            with os.fdopen(fd, "w", encoding="utf-8") as out:
                os.fchmod(out.fileno(), 0o640)
                out.write(text)
            os.replace(tmp, path)  # a reader never sees half a statement
    return directory
