"""A batch of job events, applied with set-based SQL in one database transaction.

For each event: validate it, map its names, record its job, claim it in the inbox and charge
it through the ledger. An event that cannot be applied is parked with its reason; every other
event of the batch still goes through. Claiming (``INSERT … ON CONFLICT DO NOTHING RETURNING``)
happens in the same transaction as the charges, so a redelivered or repeated event is charged
once.
"""

from __future__ import annotations

from decimal import Decimal
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from shared import bulk, inbox, ledger
from shared.batches import Outcome, sort_out
from shared.config import get_settings
from shared.deadletter import Parked, park
from shared.events import JobCompleted, JobStarted
from shared.jobs import job_key, upsert_jobs
from shared.models import Job, LedgerTransaction
from shared.rating.directory import Directory, Unresolved
from shared.rating.jobs import Plan, plan, refused_runs


def charge_events(session: Session, items: list[Any], *, source: str = "") -> Outcome:
    outcome = Outcome()
    candidates, parked = sort_out(items, (JobStarted, JobCompleted), "charger", source)

    seen = inbox.applied(session, {e.event_id for e, _ in candidates})
    fresh = [(e, raw) for e, raw in candidates if e.event_id not in seen]
    outcome.duplicates += len(candidates) - len(fresh)
    directory = Directory.load(session, (e for e, _ in fresh))
    gpus_at_start = _gpus_at_start(session, directory, [e for e, _ in fresh])
    refused = refused_runs(session, directory, (e for e, _ in fresh))
    settings = get_settings()
    free_states = set(settings.free_states)
    plans: list[Plan] = []
    planned: set[str] = set()
    for event, raw in fresh:
        if event.event_id in planned:
            # The first event of an id that can be applied wins, in a batch as across batches (the
            # inbox): a later one reusing the id cannot change the charge, and one parked before
            # it cannot shadow it.
            outcome.duplicates += 1
            continue
        try:
            plans.append(plan(session, directory, event, free_states,
                              gpus_at_start.get(_gpu_key(directory, event)) if gpus_at_start else None, refused))
            planned.add(event.event_id)
        except Unresolved as exc:
            parked.append(Parked(raw, str(exc), event.event_id, event.kind, source))

    job_ids = _record_jobs(session, plans)
    final = [p for p in plans if p.final]
    claimed = inbox.claim(session, ((p.event.event_id, p.event.kind) for p in final))
    outcome.duplicates += len(final) - len(claimed)
    outcome.recorded += len(plans) - len(final)
    requests = []
    ended: list[int] = []
    for done in final:
        event = done.event
        if event.event_id not in claimed:
            continue
        job_id = job_ids[job_key(done.job)]
        if isinstance(event, JobCompleted):
            ended.append(job_id)  # a run requeued too: the next run holds under its own row
        outcome.recorded += 1
        if not done.charges:
            continue
        outcome.charged += 1
        user_id, end_time = done.job["user_id"], event.end_time  # type: ignore[union-attr]
        for c in done.charges:
            requests.append(ledger.ChargeRequest(
                key=c["key"], account_id=c["account_id"], service_id=c["service_id"],
                quantity=c["quantity"], exact_quantity=c["exact_quantity"], effective_at=end_time,
                multiplier=c["multiplier"], user_id=user_id, job_id=job_id, details=c["details"], actor="charger",
                request_hash=ledger.charge_request_hash(
                    c["account_id"], c["service_id"], c["quantity"], c["multiplier"], user_id, job_id, end_time),
            ))
    result = ledger.charge_many(session, requests, settles=ended)
    if result.refused:
        # The inbox claimed these events, so refusing now would lose them: abort the batch and
        # let the caller apply its events one by one.
        raise RuntimeError(f"ledger refused charges: {result.refused}")
    outcome.transactions = len(result.transactions)
    ledger.settle_holds(session, ended, actor="charger")  # admission's holds give way to the charges
    _refund_by_state(session, [r for r in requests if r.details["state"] in settings.refund_states],
                     result, settings.refund_states)
    outcome.parked = park(session, parked)
    return outcome


def _refund_by_state(session: Session, requests: list[ledger.ChargeRequest], result: ledger.ChargeResult,
                     fractions: dict[str, Decimal]) -> None:
    """The site's automatic refunds (``refund_states``): a charge, then a refund of part of it
    pointing at it, in the same transaction, so a statement shows both."""
    for request in requests:
        state = request.details["state"]
        txn = session.get_one(LedgerTransaction, result.transactions[request.key])
        # effective with its charge: both land in the same statement, on the same allocation
        ledger.refund_share(session, txn, fractions[state], key=f"{request.key}/refund-{state.lower()}",
                            reason=f"automatic refund of {(fractions[state] * 100).normalize():f}% for jobs ending {state}",
                            actor="charger", effective_at=txn.effective_at)


def _gpu_key(directory: Directory, event: JobStarted | JobCompleted) -> tuple[Any, ...] | None:
    """The job's row as the event names it: by submit time, or (the ctld hooks) by start."""
    system = directory.systems.get(event.system)
    if system is None:
        return None
    if event.submit_time is not None:
        return system.id, event.job_id, event.array_task_id, "submit", event.submit_time
    return system.id, event.job_id, event.array_task_id, "start", event.start_time


def _gpus_at_start(session: Session, directory: Directory,
                   events: list[JobStarted | JobCompleted]) -> dict[tuple[Any, ...], int]:
    """GPUs recorded at the start of the ended jobs whose event does not say (Slurm's end
    hooks do not; the admission prolog learnt them from squeue), on systems that charge GPUs."""
    keys = {key for e in events if isinstance(e, JobCompleted) and e.gpus is None
            and (key := _gpu_key(directory, e)) is not None and "gpu" in directory.systems[e.system].services}
    if not keys:
        return {}
    found: dict[tuple[Any, ...], int] = {}
    for system_id, job_id, task, submit, start, gpus in session.execute(
            select(Job.system_id, Job.job_id, Job.array_task_id, Job.submit_time, Job.start_time, Job.gpus)
            .where(bulk.any_of(Job.system_id, {k[0] for k in keys}), bulk.any_of(Job.job_id, {k[1] for k in keys}),
                   Job.gpus > 0)):
        for key in ((system_id, job_id, task, "submit", submit), (system_id, job_id, task, "start", start)):
            if key in keys:
                found[key] = gpus
    return found


def _record_jobs(session: Session, plans: list[Plan]) -> dict[tuple[Any, ...], int]:
    """One row per job of the batch; a completion in the batch wins over a start."""
    rows: dict[tuple[Any, ...], dict[str, Any]] = {}
    for each in plans:
        key = job_key(each.job)
        if key in rows and isinstance(each.event, JobStarted):
            continue
        rows[key] = each.job
    return upsert_jobs(session, list(rows.values()))
