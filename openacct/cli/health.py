"""``openacct health``: whether every part of the pipeline is up, each asked for real.

One line per check. All well: exit 0. Otherwise exit 1, and each broken part has a line on
stderr that starts with its name ("charger: no worker answered …"). A check that needs a part
that is down (the workers need the broker) is not run, and says so, without failing twice.
The database and the broker are asked at once, each within ``--timeout``: a few seconds in all.
"""

from __future__ import annotations

import datetime as dt
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from typing import Annotated

import typer

from openacct.cli.output import JsonFlag, emit_json
from shared.config import get_settings
from shared.errors import InvalidInput

WORKER_KINDS = ("charger", "refunder", "reporter")
CHECKS = ("database", "broker", *WORKER_KINDS, "beat", "relay", "parked")
PARKED_WINDOW = dt.timedelta(days=1)


@dataclass(frozen=True)
class Check:
    name: str
    ok: bool | None  # None: not checked
    detail: str


def health(
    skip: Annotated[list[str] | None, typer.Option(
        "--skip", metavar="CHECK", help=f"A check not to run (repeat for more): {', '.join(CHECKS)}. Beat where no "
        "openacct beat runs, say.")] = None,
    timeout: Annotated[float, typer.Option(min=0.2, max=30, help="Seconds each part has to answer.")] = 2.0,
    max_backlog_age: Annotated[float, typer.Option(
        min=1, help="Seconds the oldest spooled event may wait before the relay counts as broken.")] = 300.0,
    as_json: JsonFlag = False,
) -> None:
    """Check the database, the broker, each worker kind (a real answer), beat's last run, the
    relay's backlog on this host and parked events; exit 1 naming each broken part."""
    skipped = set(skip or [])
    if unknown := skipped - set(CHECKS):
        raise InvalidInput(f"no check named {', '.join(sorted(unknown))}: one of {', '.join(CHECKS)}")
    with ThreadPoolExecutor(max_workers=2) as pool:
        database = pool.submit(database_checks, timeout)
        broker = pool.submit(broker_checks, timeout)
        checks = [*database.result(), *broker.result(), relay_check(max_backlog_age)]
    checks = sorted((c if c.name not in skipped else Check(c.name, None, "skipped")
                     for c in checks), key=lambda c: CHECKS.index(c.name))
    healthy = all(c.ok is not False for c in checks)
    if as_json:
        emit_json({"healthy": healthy, "checks": [asdict(c) for c in checks]})
    else:
        for c in checks:
            mark = {True: "ok  ", None: "--  ", False: "FAIL"}[c.ok]
            typer.echo(f"{mark} {c.name}: {c.detail}", err=c.ok is False)
    if not healthy:
        raise typer.Exit(1)


def database_checks(timeout: float) -> list[Check]:
    """The database (reachable, schema at head), and what only it knows: beat's last run and
    the parked events. A connection of its own, with the timeout, outside the session pool."""
    from sqlalchemy import create_engine, func, select, text
    from sqlalchemy.exc import SQLAlchemyError
    from sqlalchemy.orm import Session
    from sqlalchemy.pool import NullPool

    from shared.db import database_url, sqlalchemy_url
    from shared.migrate import current_revision, head_revision
    from shared.models import ParkedEvent
    from shared.scheduled_runs import last_run

    engine = create_engine(sqlalchemy_url(database_url()), poolclass=NullPool, connect_args={
        "connect_timeout": max(1, round(timeout)), "options": f"-c statement_timeout={int(timeout * 1000)}"})
    needs = "not checked: needs the database"
    try:
        with engine.connect() as conn:
            now = conn.scalar(text("SELECT now()"))
            at, head = current_revision(conn), head_revision()
            if at != head:
                return [Check("database", False, f"schema at {at or 'nothing'}, the code needs {head}: "
                                                 "run openacct db upgrade"),
                        Check("beat", None, needs), Check("parked", None, needs)]
            with Session(bind=conn) as session:
                last = last_run(session)
                recent, older = session.execute(
                    select(func.count().filter(ParkedEvent.parked_at >= now - PARKED_WINDOW),
                           func.count().filter(ParkedEvent.parked_at < now - PARKED_WINDOW))
                    .where(ParkedEvent.replayed_at.is_(None))).one()
    except SQLAlchemyError as exc:
        reason = str(getattr(exc, "orig", None) or exc).strip().splitlines()[0]
        return [Check("database", False, f"unreachable: {reason}"), Check("beat", None, needs),
                Check("parked", None, needs)]
    finally:
        engine.dispose()
    return [Check("database", True, f"reachable, schema at head ({head})"), beat_check(last, now),
            parked_check(recent, older)]


def beat_check(last: dt.datetime | None, now: dt.datetime) -> Check:
    # Beat sends the alerts every alert_interval, the hold expiry more often: a reporter that
    # ran none for twice that has not been sent any.
    limit = 2 * get_settings().alert_interval
    if last is None:
        return Check("beat", False, "no scheduled task has ever run (is openacct beat running? a reporter?)")
    age = (now - last).total_seconds()
    if age > limit:
        return Check("beat", False, f"no scheduled task has run for {age:.0f} s, more than twice alert_interval "
                                    f"({limit} s): is openacct beat running?")
    return Check("beat", True, f"a scheduled task ran {age:.0f} s ago")


def parked_check(recent: int, older: int) -> Check:
    since = f"; {older} older not replayed" if older else ""
    if recent:
        return Check("parked", False, f"{recent} event{'s' if recent != 1 else ''} parked in the last day and not "
                                      f"replayed{since} (openacct deadletter list)")
    return Check("parked", True, f"none in the last day{since}")


def broker_checks(timeout: float) -> list[Check]:
    """The broker (a connection), then each worker kind: the workers consuming its queue that
    answer a broadcast question within the timeout."""
    from shared.celery_app import consumers, get_app

    try:
        with get_app().connection_for_write(connect_timeout=timeout) as conn:
            conn.ensure_connection(max_retries=0, timeout=timeout)
            where = conn.as_uri()  # without its password
    except Exception as exc:  # whatever the transport raises: the broker is what is broken
        needs = "not checked: needs the broker"
        return [Check("broker", False, f"unreachable: {type(exc).__name__}: {exc}"),
                *(Check(kind, None, needs) for kind in WORKER_KINDS)]
    found = consumers(timeout)
    return [Check("broker", True, f"reachable at {where}"),
            *(Check(kind, True, f"{', '.join(found[kind])} answered") if found.get(kind)
              else Check(kind, False, f"no worker on the {kind} queue answered within {timeout:g} s")
              for kind in WORKER_KINDS)]


def relay_check(max_age: float) -> Check:
    """The spool's backlog, where this host has a spool (a scheduler's host, where the relay runs)."""
    from shared import spool

    path = get_settings().spool_path
    if not path.is_dir():
        return Check("relay", None, f"no spool at {path} on this host")
    count, oldest = spool.backlog(path)
    waiting = f"{count} event{'s' if count != 1 else ''} waiting in {path}"
    if oldest > max_age:
        return Check("relay", False, f"{waiting}, the oldest for {oldest:.0f} s (more than {max_age:g}): is "
                                     "openacct relay running, and the broker and the workers?")
    return Check("relay", True, f"{waiting}" + (f", the oldest for {oldest:.0f} s" if count else ""))
