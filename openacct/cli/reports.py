"""``openacct statement``: a project's statement for a month or any period, as of any date."""

from __future__ import annotations

import datetime as dt
import enum
import sys
from pathlib import Path
from typing import Annotated

import typer

from openacct.cli.output import JsonFlag, emit_rows
from openacct.cli.pipeline import MetricsPort
from services.reporter import render
from services.reporter.statements import Statement, month, statements
from services.reporter.usage import DIMENSIONS
from shared.db import session_scope
from shared.errors import InvalidInput, NotFound
from shared.timestamps import parse_time


class Format(enum.StrEnum):
    text = "text"
    json = "json"
    csv = "csv"
    html = "html"


def statement(
    project: Annotated[str | None, typer.Argument(help="Project (default: every project).")] = None,
    period: Annotated[str | None, typer.Option(help="A month, such as 2026-10.")] = None,
    from_: Annotated[str | None, typer.Option("--from", help="Start of the period (instead of --period).")] = None,
    to: Annotated[str | None, typer.Option(help="End of the period (instead of --period).")] = None,
    format_: Annotated[Format, typer.Option("--format", help="text, json, csv or html.")] = Format.text,
    summary_only: Annotated[bool, typer.Option("--summary", help="Totals only, no transactions.")] = False,
    output: Annotated[Path | None, typer.Option(help="Write to this file instead of standard output.")] = None,
) -> None:
    """Opening balance, deposits, charges, refunds, adjustments and closing balance of a period."""
    if (period is None) == (from_ is None and to is None):
        raise InvalidInput("give --period MONTH, or --from and --to")
    if period is None and (from_ is None or to is None):
        missing = "--to (the end of the period)" if to is None else "--from (the start of the period)"
        raise InvalidInput(f"{missing} is missing: give --from and --to, or --period MONTH")
    try:
        start, end = month(period) if period else (parse_time(from_, "--from"), parse_time(to, "--to"))
    except ValueError as exc:
        raise InvalidInput(str(exc)) from None
    if end <= start:
        raise InvalidInput(f"the period ends ({end.isoformat()}) before it starts ({start.isoformat()})")
    if format_ is Format.html and project is None:
        raise InvalidInput("an HTML statement is for one project: name it")
    with session_scope() as s:
        found = statements(s, start, end, [project] if project else None, itemized=not summary_only)
    if project and not found:
        raise NotFound(f"no project named {project!r}")
    if format_ is Format.text:
        if output is not None:
            raise InvalidInput("--output writes json, csv or html; text is for the terminal")
        _print(found)
        return
    if format_ is Format.json:
        text = render.to_json(found)
    elif format_ is Format.csv:
        parts = [render.to_csv(st) for st in found]
        text = "".join(part if n == 0 else part.split("\n", 1)[1] for n, part in enumerate(parts))  # one header
    else:
        text = render.to_html(found[0])
    if output is None:
        sys.stdout.write(text)
    else:
        output.write_text(text, encoding="utf-8")


def _print(found: list[Statement]) -> None:
    for st in found:
        emit_rows([{"": label, "amount": amount} for label, amount in render.summary(st)], ["", "amount"],
                  as_json=False, title=f"{st.project}: {st.start:%Y-%m-%d %H:%M} to {st.end:%Y-%m-%d %H:%M} UTC")
        if st.lines:
            emit_rows([vars(line) for line in st.lines], render.LINE_COLUMNS, as_json=False)


BEAT_LOCK = 0x0A_CC7_BEA7  # pg_advisory_lock key: one beat per database


def beat(
    loglevel: Annotated[str, typer.Option(help="debug, info, warning or error.")] = "info",
    metrics_port: MetricsPort = None,
) -> None:
    """Run the scheduler of the reporter's alerts, usage rollup and statements.

    Exactly one runs per site: a second one waits (holding nothing) until the first stops."""
    import psycopg

    from shared.db import database_url

    if loglevel.lower() not in ("debug", "info", "warning", "error"):
        raise InvalidInput(f"unknown log level {loglevel!r}")
    from shared import signing
    from shared.config import get_settings

    signing.required("beat")
    settings = get_settings()
    lock = psycopg.connect(database_url().replace("postgresql+psycopg://", "postgresql://"), autocommit=True)
    if not lock.execute("SELECT pg_try_advisory_lock(%s)", (BEAT_LOCK,)).fetchone()[0]:
        typer.echo("another openacct beat is running for this database; waiting for it to stop", err=True)
        lock.execute("SELECT pg_advisory_lock(%s)", (BEAT_LOCK,))
    from services.reporter.tasks import app

    if metrics_port is not None:  # what beat sends is counted by shared.celery_app
        from shared import metrics

        metrics.serve(metrics_port)
    schedule = settings.data_dir / "beat-schedule"
    schedule.parent.mkdir(parents=True, exist_ok=True)
    try:
        app.Beat(loglevel=loglevel.upper(), schedule=str(schedule)).run()
    finally:
        lock.close()


def alerts(
    dry_run: Annotated[bool, typer.Option(help="List the alerts due now; send and record nothing.")] = False,
    as_json: JsonFlag = False,
) -> None:
    """Send the low-balance and expiry alerts due now (each once per threshold), as the reporter does."""
    from services.reporter import alerts as alerting
    from shared.config import get_settings

    settings = get_settings()
    with session_scope() as s:
        found = alerting.due(s, settings)
        if not dry_run:
            found = alerting.send(s, settings, found)
    emit_rows([{"project": a.project, "kind": a.kind, "message": a.message} for a in found],
              ["project", "kind", "message"], as_json=as_json,
              title=f"{len(found)} alerts {'due' if dry_run else 'sent'}")


report_app = typer.Typer(help="Usage reports, from the daily rollup and, for the days it has not settled, "
                              "the ledger.", no_args_is_help=True)


def _days(from_: str, to: str) -> tuple[dt.date, dt.date]:
    try:
        first, last = dt.date.fromisoformat(from_), dt.date.fromisoformat(to)
    except ValueError as exc:
        raise InvalidInput(f"bad day: {exc} (want YYYY-MM-DD)") from None
    if last < first:
        raise InvalidInput(f"--to {last} is before --from {first}")
    return first, last


@report_app.command("rollup")
def report_rollup(
    from_: Annotated[str, typer.Option("--from", help="First day, YYYY-MM-DD (UTC).")],
    to: Annotated[str, typer.Option(help="Last day, YYYY-MM-DD (UTC).")],
) -> None:
    """Roll up these days' usage again from the ledger (the reporter does the last days hourly)."""
    from services.reporter import usage

    first, last = _days(from_, to)
    with session_scope() as s:
        rows = usage.rollup(s, first, last)
    typer.echo(f"rolled up {first} to {last}: {rows} rows")


@report_app.command("usage")
def report_usage(
    from_: Annotated[str, typer.Option("--from", help="First day, YYYY-MM-DD (UTC).")],
    to: Annotated[str, typer.Option(help="Last day, YYYY-MM-DD (UTC).")],
    by: Annotated[str, typer.Option(help=f"Comma-separated: {', '.join(DIMENSIONS)}.")] = "project",
    format_: Annotated[Format, typer.Option("--format", help="text, json, csv or html (with charts).")] = Format.text,
) -> None:
    """Jobs, charges and refunds per project, PI, user, partition, job size, … (sreport-like)."""
    import csv

    from services.reporter import usage

    first, last = _days(from_, to)
    dimensions = [d.strip() for d in by.split(",") if d.strip()]
    try:
        with session_scope() as s:
            rows = usage.report(s, first, last, dimensions)
            if format_ is Format.html:
                charts = [usage.report(s, first, last, [d]) for d in ("day", "user", "service")]
    except ValueError as exc:
        raise InvalidInput(str(exc)) from None
    if format_ is Format.html:
        sys.stdout.write(render.usage_page(first, last, dimensions, rows, *charts))
        return
    columns = [*dimensions, *(["quantity"] if "service" in dimensions else []), "jobs", "charged", "refunded", "net"]
    if format_ is Format.csv:
        writer = csv.DictWriter(sys.stdout, columns, extrasaction="ignore")
        writer.writeheader()
        writer.writerows({k: render.cell(v) for k, v in row.items()} for row in rows)
    else:
        emit_rows(rows, columns, as_json=format_ is Format.json, title=f"usage {first} to {last} by {', '.join(dimensions)}")
