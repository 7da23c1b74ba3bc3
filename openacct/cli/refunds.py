"""``openacct refund`` and ``openacct incident``: refund requests, sent to the refunder's queue.

A request's id makes it idempotent. Without ``--request-id`` the id is derived from what is
asked (target, size, reason), so running the same command twice refunds once; ask again on
purpose with a new ``--request-id`` (or reason).

Nothing is sent that the refunder would refuse: each request is first checked against the ledger
by the refunder's own rule (``services.refunder.batch.to_refund``), and ``--wait`` first asks the
broker whether a refunder is there to answer.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import time
from decimal import Decimal
from typing import Annotated, Any

import typer
from sqlalchemy import or_, select

from openacct.cli.output import JsonFlag, done, emit_json, emit_rows
from shared import hostlist, inbox, ledger
from shared.config import get_settings
from shared.db import session_scope
from shared.errors import InvalidInput, NotFound, OpenAcctError
from shared.events import EventRejected, RefundRequested, parse_event
from shared.models import Job, LedgerTransaction, ParkedEvent, ProcessedEvent
from shared.money import parse_money
from shared.timestamps import parse_time

Reason = Annotated[str, typer.Option(help="Why: kept with every refund row.")]
Wait = Annotated[bool, typer.Option(help="Wait for the refunder and print what it did.")]
WAIT_SECONDS = 60.0
REFUNDER_PING_SECONDS = 2.0  # a worker answers within milliseconds; the broker's round trip is the rest


def refund(
    target: Annotated[str, typer.Argument(metavar="JOB|txn:ID", help="A job id (on --system), or txn:ID for one charge.")],
    reason: Reason,
    amount: Annotated[str | None, typer.Option(help="Refund this much (spread over a job's charges).")] = None,
    fraction: Annotated[str | None, typer.Option(help="Refund this fraction of each charge, such as 0.5.")] = None,
    system: Annotated[str | None, typer.Option(help="The job's system (default: the configured default_system).")] = None,
    submit_time: Annotated[str | None, typer.Option(help="The job's submit time, when its id was reused.")] = None,
    request_id: Annotated[str | None, typer.Option(help="Idempotency: one request id refunds once.")] = None,
    requester: Annotated[str | None, typer.Option(help="Who asks (default: your login name).")] = None,
    wait: Wait = False,
    as_json: JsonFlag = False,
) -> None:
    """Refund a job's charges, or one charge: in full, an amount, or a fraction."""
    fields: dict[str, Any] = {"reason": reason}
    if target.startswith("txn:"):
        if not target[4:].isdigit():
            raise InvalidInput(f"bad transaction {target!r}: want txn: and its number, such as txn:981")
        fields["transaction_id"] = int(target[4:])
    else:
        fields.update(system=system or _default_system(), job_id=target)
        if submit_time:
            fields["submit_time"] = parse_time(submit_time, "submit time").isoformat()
    if amount is not None:
        fields["amount"] = str(parse_money(amount, "amount"))
    if fraction is not None:
        fields["fraction"] = fraction
    request = _request(fields, request_id, requester)
    fresh = _to_send([request])
    published_at = _send(fresh, wait) if fresh else ledger.now()
    if not wait:
        done(f"refund request {request.event_id} "
             + ("sent to the refunder" if fresh else "was applied before: nothing sent"))
        return
    _report([request], published_at, as_json)


def incident(
    nodes: Annotated[str, typer.Argument(help="Slurm host list of the broken nodes, such as c[01-04],gpu7.")],
    from_: Annotated[str, typer.Option("--from", help="Start of the incident.")],
    to: Annotated[str, typer.Option(help="End of the incident.")],
    reason: Reason,
    system: Annotated[str | None, typer.Option(help="The nodes' system (default: the configured default_system).")] = None,
    dry_run: Annotated[bool, typer.Option(help="List the jobs it would refund, and refund nothing.")] = False,
    requester: Annotated[str | None, typer.Option(help="Who asks (default: your login name).")] = None,
    wait: Wait = False,
    as_json: JsonFlag = False,
) -> None:
    """Refund in full every charged job that ran on these nodes during the incident."""
    broken = set(hostlist.expand(nodes))
    start, end = parse_time(from_, "--from"), parse_time(to, "--to")
    if end <= start:
        raise InvalidInput(f"--to {end.isoformat()} is not after --from {start.isoformat()}")
    system = system or _default_system()
    jobs = _jobs_on(system, broken, start, end)
    incident_id = _digest({"nodes": sorted(broken), "from": start.isoformat(), "to": end.isoformat(),
                           "system": system, "reason": reason})
    rows = [{"job": j.job_id, "submit_time": j.submit_time, "nodes": j.node_list, "start": j.start_time,
             "end": j.end_time, "refundable": left} for j, left in jobs]
    if dry_run or not jobs:
        emit_rows(rows, ["job", "submit_time", "nodes", "start", "end", "refundable"], as_json=as_json,
                  title=f"{len(rows)} charged jobs ran on {nodes} between {start.isoformat()} and {end.isoformat()}")
        return
    requests = [_request({"system": system, "job_id": j.job_id, "submit_time": j.submit_time.isoformat(),
                          "reason": reason}, f"incident-{incident_id}/{j.id}", requester) for j, _ in jobs]
    fresh = _to_send(requests)
    published_at = _send(fresh, wait) if fresh else ledger.now()
    if not wait:
        done(f"{len(fresh)} refund requests sent to the refunder (incident {incident_id})")
        return
    _report(requests, published_at, as_json)


def _default_system() -> str:
    name = get_settings().default_system
    if name is None:
        raise InvalidInput("name the job's --system (no default_system is configured)")
    return name


def _digest(what: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(what, sort_keys=True).encode()).hexdigest()[:20]


def _request(fields: dict[str, Any], request_id: str | None, requester: str | None) -> RefundRequested:
    import getpass

    event = {"schema_version": 1, "kind": "refund.requested", "source": "cli", **fields,
             "requester": requester or getpass.getuser()}
    event["event_id"] = f"refund:{request_id or _digest(fields)}"
    try:
        request = parse_event(json.dumps(event).encode())
    except EventRejected as exc:
        raise InvalidInput(str(exc)) from None
    assert isinstance(request, RefundRequested)
    return request


def _to_send(requests: list[RefundRequested]) -> list[RefundRequested]:
    """The requests not applied before (the refunder would only count those again), each checked
    as the refunder will check it: one that names nothing refundable (no such job, system or
    charge, nothing left, more than is left) stops the command before anything is sent."""
    from services.refunder.batch import to_refund

    with session_scope() as s:
        applied = inbox.applied(s, [r.event_id for r in requests])
        fresh = [r for r in requests if r.event_id not in applied]
        for request in fresh:
            to_refund(s, request)
    return fresh


def _send(requests: list[RefundRequested], wait: bool) -> dt.datetime:
    """Publish straight to the refunder's queue: an administrator's command, not a hook, so a
    broker that is away is an error to retry, not something to spool. To wait for an answer, a
    refunder must be there to give it: asked first, so that nothing waits on no one."""
    from kombu.exceptions import OperationalError as BrokerUnreachable
    from kombu.utils.url import sanitize_url

    from shared import signing
    from shared.celery_app import TASKS, consumers, get_app

    broker = sanitize_url(get_app().conf.broker_url)  # without its password
    sent_at = ledger.now()
    body = [r.model_dump_json(exclude_none=True) for r in requests]
    try:
        if wait and not consumers(REFUNDER_PING_SECONDS).get("refunder"):
            raise OpenAcctError(f"no refunder is running (none answered on {broker} within "
                                f"{REFUNDER_PING_SECONDS:g} s): start `openacct worker refunder`")
        get_app().send_task(TASKS["refunder"], args=[signing.seal(TASKS["refunder"], body)],
                            queue="refunder", routing_key="refunder")
    except BrokerUnreachable as exc:
        raise OpenAcctError(f"cannot reach the broker at {broker}: {exc}") from None
    return sent_at


def _jobs_on(system: str, broken: set[str], start: dt.datetime, end: dt.datetime) -> list[tuple[Job, Decimal]]:
    """Charged jobs of ``system`` that overlapped [start, end) on a broken node, with what is
    left to refund of each (jobs refunded in full already are left out)."""
    from shared.rating.directory import system_named

    with session_scope() as s:
        named = system_named(s, system)
        if named is None:
            raise NotFound(f"no system or alias named {system!r}")
        candidates = s.scalars(select(Job).where(
            Job.system_id == named.id, Job.start_time < end, Job.end_time > start, Job.node_list.is_not(None),
        ).order_by(Job.start_time, Job.id))
        found = []
        for job in candidates:
            try:
                nodes = hostlist.expand(job.node_list or "")
            except InvalidInput as exc:  # one job's odd record must not stop the incident
                typer.echo(f"job {job.job_id} skipped: its node list {job.node_list!r} is unreadable ({exc})", err=True)
                continue
            if broken.isdisjoint(nodes):
                continue
            charges = s.scalars(select(LedgerTransaction).where(
                LedgerTransaction.job_id == job.id, LedgerTransaction.kind == "charge"))
            left = sum((ledger.refundable(s, c) for c in charges), Decimal(0))
            if left > 0:
                found.append((job, left))
        s.expunge_all()
        return found


def _report(requests: list[RefundRequested], sent_at: dt.datetime, as_json: bool) -> None:
    """Wait until the refunder has applied or parked every request; print its refunds."""
    ids = [r.event_id for r in requests]
    deadline = time.monotonic() + WAIT_SECONDS
    while True:
        with session_scope() as s:
            applied = set(s.scalars(select(ProcessedEvent.event_id).where(ProcessedEvent.event_id.in_(ids))))
            refused = dict(s.execute(select(ParkedEvent.event_id, ParkedEvent.reason).where(
                ParkedEvent.event_id.in_(ids), ParkedEvent.parked_at >= sent_at)).all())
            if len(applied) + len(refused) >= len(ids) or time.monotonic() > deadline:
                # each refund's key is "<request id>/<charge id>"
                refunds = list(s.scalars(select(LedgerTransaction).where(
                    LedgerTransaction.kind == "refund",
                    or_(*(LedgerTransaction.idempotency_key.startswith(f"{i}/", autoescape=True) for i in ids)),
                ).order_by(LedgerTransaction.id)))
                break
        time.sleep(0.2)
    rows = [{"request": r.event_id, "outcome": "applied" if r.event_id in applied else
             f"refused: {refused[r.event_id]}" if r.event_id in refused else "no answer yet"} for r in requests]
    rows_txn = [{"transaction": t.id, "refunds": t.refers_to_id, "amount": t.amount, "key": t.idempotency_key}
                for t in refunds]
    if as_json:
        emit_json({"requests": rows, "refunds": rows_txn})
    else:
        emit_rows(rows, ["request", "outcome"], as_json=False)
        emit_rows(rows_txn, ["transaction", "refunds", "amount"], as_json=False, title="refunds")
    if len(applied) < len(ids):
        raise typer.Exit(1)



def rerate(
    service: Annotated[str, typer.Option(help="The service whose charges to price again, by name or SYSTEM/NAME.")],
    from_: Annotated[str, typer.Option("--from", help="Charges effective from this time…")],
    to: Annotated[str, typer.Option(help="…up to (not including) this time.")],
    project: Annotated[list[str] | None, typer.Option(help="Only this project's charges (repeatable).")] = None,
    discount: Annotated[str, typer.Option(help="Charge this fraction less, such as 0.2.")] = "0",
    dry_run: Annotated[bool, typer.Option(help="Show the differences; write nothing.")] = False,
    as_json: JsonFlag = False,
) -> None:
    """Price charges again at the rate in effect then, or with a discount.

    The differences become adjustments referring to each charge; running it again changes nothing.
    A difference is signed as every movement of money is: what it does to the project's balance,
    money given back (a discount) positive."""
    from openacct import shortcuts as sc
    from services.refunder.rerate import rerate as rerate_charges

    start, end = parse_time(from_, "--from"), parse_time(to, "--to")
    try:
        fraction = Decimal(discount)
    except ArithmeticError:
        raise InvalidInput(f"bad discount {discount!r}: want a fraction such as 0.2") from None
    with session_scope() as s:
        results = rerate_charges(s, sc.get_service(service), start, end, projects=project or None,
                                 discount=fraction, dry_run=dry_run, actor="openacct rerate")
    emit_rows([{"project": r.project, "examined": r.examined, "changed": r.changed,
                "refunded_skipped": r.refunded_skipped, "difference": -r.difference} for r in results],
              ["project", "examined", "changed", "refunded_skipped", "difference"], as_json=as_json,
              title=f"{'would re-rate' if dry_run else 're-rated'} {service} from {start.isoformat()} to {end.isoformat()}")
