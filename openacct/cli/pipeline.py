"""The event pipeline's commands: workers, the relay, dead letters, jobs, event schemas."""

from __future__ import annotations

import json
import os
import signal
import threading
import time
from pathlib import Path
from typing import Annotated

import typer
from sqlalchemy import select
from sqlalchemy.orm import Session

from openacct import shortcuts as sc
from openacct.cli.output import JsonFlag, done, emit_json, emit_record, emit_rows
from shared.config import get_settings
from shared.db import session_scope
from shared.deadletter import Parked, park
from shared.errors import InvalidInput, NotFound
from shared.ledger import SIGNED_AMOUNT, now
from shared.models import Account, Job, LedgerTransaction, ParkedEvent, Service, System, User

WORKERS = ("charger", "refunder", "reporter")
SCHEMA_DIR = Path(__file__).resolve().parents[2] / "shared" / "schemas"

deadletter_app = typer.Typer(help="Events that could not be applied, with the reason.", no_args_is_help=True)
job_app = typer.Typer(help="Jobs and what they were charged.", no_args_is_help=True)
events_app = typer.Typer(help="The event contracts.", no_args_is_help=True)


MetricsPort = Annotated[int | None, typer.Option(
    "--metrics-port", min=1, max=65535, help="Serve Prometheus metrics on this port (address: metrics_address).")]


def worker(
    name: Annotated[str, typer.Argument(help=f"Which worker: {', '.join(WORKERS)}.")],
    concurrency: Annotated[int, typer.Option("--concurrency", "-c", min=1, max=64, help="Worker processes.")] = 2,
    loglevel: Annotated[str, typer.Option(help="debug, info, warning or error.")] = "info",
    metrics_port: MetricsPort = None,
) -> None:
    """Run a worker consuming its own queue (same as celery -A services.NAME.tasks worker -Q NAME)."""
    if name not in WORKERS:
        raise InvalidInput(f"no worker named {name!r}: one of {', '.join(WORKERS)}")
    if loglevel.lower() not in ("debug", "info", "warning", "error"):
        raise InvalidInput(f"unknown log level {loglevel!r}")
    import importlib

    from shared import signing

    signing.required(f"{name} worker")
    if get_settings().log_format == "json":
        # Every line on stderr is JSON, from the start (Celery keeps this handler). What Celery
        # prints past logging (its banner, its shutdown notice) goes to stdout.
        from shared import logs

        logs.setup(name, loglevel)
    if metrics_port is not None:
        count_in_every_process(name)
    tasks = importlib.import_module(f"services.{name}.tasks")
    if metrics_port is not None:
        from shared import metrics

        metrics.batches().show(name)
        metrics.serve(metrics_port, *([metrics.HoldsOpen()] if name == "charger" else []))
    tasks.app.worker_main(["worker", "-Q", name, "-n", f"{name}@%h", "-c", str(concurrency),
                           "--loglevel", loglevel, "--without-gossip", "--without-mingle"])


def count_in_every_process(name: str) -> None:
    """The worker's batches run in prefork children, each counting in its own memory, out of the
    reach of the main process that serves /metrics. Multiprocess mode keeps every process's
    values in files of one directory instead (a fresh one per worker, removed when it stops),
    which the main process adds up at each scrape. It must be chosen before prometheus_client is
    first imported. Not the solo or threads pool instead: prefork is what enforces the hard time
    limit that keeps a task within the broker's visibility timeout (shared.celery_app)."""
    import atexit
    import shutil
    import tempfile

    directory = tempfile.mkdtemp(prefix=f"openacct-{name}-metrics-")
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = directory
    owner = os.getpid()
    # Children inherit the hook and leave by os._exit; only the main process removes the directory.
    atexit.register(lambda: os.getpid() == owner and shutil.rmtree(directory, ignore_errors=True))


def relay(
    once: Annotated[bool, typer.Option(help="Ship what is spooled now, then exit.")] = False,
    status: Annotated[bool, typer.Option(help="Print the spool's backlog as JSON and exit.")] = False,
    metrics_port: MetricsPort = None,
) -> None:
    """Ship spooled events to the broker; one relay per spool host."""
    from shared import logs
    from shared.relay import Relay, applied_tasks

    settings = get_settings()
    if status:
        from shared import spool

        count, oldest = spool.backlog(settings.spool_path)
        emit_json({"spool": str(settings.spool_path), "backlog": count, "oldest_seconds": round(oldest, 3)})
        return
    from shared import signing
    from shared.celery_app import freeze_startup_objects

    signing.required("relay")
    logs.setup("relay", "info")
    the_relay = Relay(None, settings.spool_path, settings.relay_batch_size,
                      applied=applied_tasks if settings.relay_confirms else None,
                      reship_after=settings.broker_visibility_timeout + 60)
    if metrics_port is not None:
        from shared import metrics

        metrics.serve(metrics_port)
    freeze_startup_objects()
    if once:
        while the_relay.ship_once():
            pass
        deadline = time.monotonic() + 60
        while the_relay.confirm() and time.monotonic() < deadline:
            time.sleep(0.5)
        the_relay.settle()
        if the_relay.unapplied:
            raise InvalidInput(f"shipped {the_relay.shipped} events; {the_relay.unapplied} batches are not applied "
                               "yet (are the workers running?): they stay in the spool and ship again")
        done(f"shipped {the_relay.shipped} events, every one applied")
        return
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    the_relay.run(stop)


@deadletter_app.command("list")
def deadletter_list(
    everything: Annotated[bool, typer.Option("--all", help="Include replayed ones.")] = False,
    limit: Annotated[int, typer.Option(min=1, max=100_000)] = 100,
    as_json: JsonFlag = False,
) -> None:
    """Parked events, newest first."""
    with session_scope() as s:
        query = select(ParkedEvent).order_by(ParkedEvent.id.desc()).limit(limit)
        if not everything:
            query = query.where(ParkedEvent.replayed_at.is_(None))
        rows = [{"id": p.id, "parked_at": p.parked_at, "kind": p.kind, "event_id": p.event_id,
                 "reason": p.reason, "replayed_at": p.replayed_at} for p in s.scalars(query)]
    emit_rows(rows, ["id", "parked_at", "kind", "event_id", "reason", "replayed_at"], as_json=as_json)


def _parked(s: Session, parked_id: int) -> ParkedEvent:
    found = s.get(ParkedEvent, parked_id)
    if found is None:
        raise NotFound(f"no parked event #{parked_id}")
    return found


@deadletter_app.command("show")
def deadletter_show(parked_id: int, as_json: JsonFlag = False) -> None:
    """One parked event: its reason and its payload as received."""
    with session_scope() as s:
        p = _parked(s, parked_id)
        text = p.payload.decode("utf-8", "backslashreplace")
        record = {"id": p.id, "parked_at": p.parked_at, "kind": p.kind, "event_id": p.event_id,
                  "source": p.source, "reason": p.reason, "replayed_at": p.replayed_at,
                  "payload_bytes": len(p.payload), "payload": text[:100_000]}
    emit_record(record, as_json=as_json, title=f"parked event #{parked_id}")


@deadletter_app.command("replay")
def deadletter_replay(
    ids: Annotated[list[int] | None, typer.Argument(help="Parked event numbers.")] = None,
    everything: Annotated[bool, typer.Option("--all", help="Every parked event not yet replayed.")] = False,
) -> None:
    """Apply parked events again, once their cause is fixed. Each that fails is parked anew."""
    from services.charger.batch import charge_events
    from services.refunder.batch import refund_events

    if bool(ids) == everything:
        raise typer.BadParameter("name parked event numbers, or --all")
    with session_scope() as s:
        query = select(ParkedEvent).where(ParkedEvent.replayed_at.is_(None)).order_by(ParkedEvent.id)
        targets = [p.id for p in s.scalars(query) if _replayable(p) is None] if everything else list(ids or [])
    failed = 0
    for parked_id in targets:
        with session_scope() as s:
            p = _parked(s, parked_id)
            if p.replayed_at is not None:
                raise InvalidInput(f"parked event #{parked_id} was already replayed at {p.replayed_at.isoformat()}")
            if (why := _replayable(p)) is not None:
                raise InvalidInput(f"parked event #{parked_id} is not replayed: {why}")
            p.replayed_at = now()
            kind = p.kind
            s.flush()
            try:
                with s.begin_nested():
                    apply = refund_events if kind == "refund.requested" else charge_events
                    outcome = apply(s, [p.payload.decode("utf-8", "surrogateescape")], source="replay")
            except Exception as exc:  # the same isolation a worker gives a failing event
                park(s, [Parked(p.payload, f"could not be applied: {type(exc).__name__}: {exc}", p.event_id, p.kind, "replay")])
                outcome = None
        if outcome is None or outcome.parked:
            failed += 1
            typer.echo(f"#{parked_id}: parked again (see openacct deadletter list)", err=True)
        else:
            what = ("charged" if outcome.charged else "duplicate, already applied" if outcome.duplicates
                    else "refunded" if kind == "refund.requested" else "recorded")
            done(f"#{parked_id}: {what}")
    if failed:
        raise typer.Exit(1)


def _replayable(p: ParkedEvent) -> str | None:
    """Why a parked event must not be applied by a replay, which checks no signature; None if it may."""
    from shared.batches import REFUSED
    from shared.celery_app import ROUTES

    if p.kind == REFUSED:
        return "its message was refused for its signature; its sender must send it again, signed"
    if p.source in ROUTES.values() and p.kind in ROUTES and ROUTES[p.kind] != p.source:
        return (f"it reached the {p.source} signed by a key that may not send it to the {ROUTES[p.kind]} "
                "(a refund from a scheduler's host, say); an administrator sends it again")
    return None


@job_app.command("show")
def job_show(
    job_id: Annotated[str, typer.Argument(help="The scheduler's job id.")],
    system: Annotated[str | None, typer.Option(help="Only this system's job.")] = None,
    as_json: JsonFlag = False,
) -> None:
    """A job as recorded, with every transaction it caused and why (quantity, rate, policy)."""
    with session_scope() as s:
        query = select(Job, System.name).join(System, System.id == Job.system_id).where(Job.job_id == job_id)
        if system is not None:
            query = query.where(Job.system_id == sc.get_system(system).id)
        found = s.execute(query.order_by(Job.submit_time)).all()
        if not found:
            raise NotFound(f"no job {job_id!r}" + (f" on system {system!r}" if system else ""))
        jobs = []
        for job, system_name in found:
            user = s.get(User, job.user_id) if job.user_id else None
            account = s.get(Account, job.account_id) if job.account_id else None
            txns = s.execute(
                select(LedgerTransaction, SIGNED_AMOUNT, Service.name)
                .outerjoin(Service, Service.id == LedgerTransaction.service_id)
                .where(LedgerTransaction.job_id == job.id).order_by(LedgerTransaction.id)
            ).all()
            jobs.append({
                "system": system_name, "job_id": job.job_id, "array_job_id": job.array_job_id,
                "array_task_id": job.array_task_id, "het_offset": job.het_offset,
                "user": user.name if user else None, "account": account.name if account else None,
                "partition": job.partition, "qos": job.qos, "state": job.state, "exit_code": job.exit_code,
                "submit_time": job.submit_time, "start_time": job.start_time, "end_time": job.end_time,
                "cpus": job.cpus, "gpus": job.gpus, "node_count": job.node_count, "node_list": job.node_list,
                "memory_mb": job.memory_mb, "time_limit_minutes": job.time_limit_minutes,
                "charge_policy": job.charge_policy,
                "transactions": [{"id": t.id, "kind": t.kind, "amount": amount, "service": svc,
                                  "quantity": t.quantity, "rate": t.rate, "effective_at": t.effective_at,
                                  "details": t.details} for t, amount, svc in txns],
            })
    if as_json:
        emit_json(jobs if len(jobs) > 1 else jobs[0])
        return
    for record in jobs:
        emit_record(record, as_json=False, title=f"job {record['job_id']} on {record['system']}")
        emit_rows(record["transactions"], ["id", "kind", "amount", "service", "quantity", "rate", "effective_at"],
                  as_json=False, title="transactions")


@events_app.command("schema")
def events_schema(
    out: Annotated[Path, typer.Option(help="Directory to write one JSON Schema per event kind.")] = SCHEMA_DIR,
) -> None:
    """Write the JSON Schema of every event kind, for hooks written in other languages."""
    from shared.events import json_schemas

    out.mkdir(parents=True, exist_ok=True)
    for kind, schema in json_schemas().items():
        (out / f"{kind}.schema.json").write_text(json.dumps(schema, indent=2, sort_keys=True) + "\n")
    done(f"wrote {len(json_schemas())} schemas to {out}")


def flower(
    port: Annotated[int, typer.Option(min=1, max=65535, help="Port of the web page.")] = 5555,
    address: Annotated[str, typer.Option(help="Address to listen on (default: this host only).")] = "127.0.0.1",
) -> None:
    """Flower, on the workers' broker: the charger, refunder and reporter, their queues and tasks."""
    from shared.celery_app import QUEUES, get_app

    # Flower reads task names and queues from the app: make it know all three workers'.
    for name in QUEUES:
        __import__(f"services.{name}.tasks")
    code: object = 0
    try:
        # Not persistent, whatever FLOWER_* variables or a flowerconfig.py say: the exit below
        # skips the save that persistence would need.
        get_app().start(["flower", f"--port={port}", f"--address={address}", "--purge_offline_workers=60",
                         "--persistent=False"])
    except SystemExit as exc:
        code = exc.code
    # Flower's SIGTERM handler stops its loop, but its inspector threads can wait forever on the
    # broker's connection pool, and Python joins them before it exits: Flower logged "shutting
    # down" and ran on until systemd or compose killed it. Once its loop is over the process ends
    # here, logs flushed; a second SIGTERM meanwhile changes nothing.
    import logging
    import sys

    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    if isinstance(code, str):
        print(code, file=sys.stderr)
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code if isinstance(code, int) else (0 if code is None else 1))


# What a job cost is asked by users too: its command lives with theirs.
from openacct.cli.user import job_cost  # noqa: E402 - after job_app, which it joins

job_app.command("cost")(job_cost)
