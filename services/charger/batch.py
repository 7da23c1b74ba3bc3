"""A batch of job events, applied with set-based SQL in one database transaction.

For each event: validate it, map its names, record its job, claim it in the inbox and charge
it through the ledger. An event that cannot be applied is parked with its reason; every other
event of the batch still goes through. Claiming (``INSERT … ON CONFLICT DO NOTHING RETURNING``)
happens in the same transaction as the charges, so a redelivered or repeated event is charged
once.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass, field
from decimal import ROUND_HALF_UP, Decimal
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from services.batches import Outcome, sort_out
from services.charger.directory import Directory, SystemInfo, Unresolved
from shared import bulk, ledger
from shared.config import get_settings
from shared.deadletter import Parked, park
from shared.events import LONGEST_JOB, JobCompleted, JobStarted
from shared.jobs import job_key, upsert_jobs
from shared.models import Job, LedgerTransaction, ProcessedEvent

HOUR = Decimal(3600)
QUANTITY = Decimal("0.000001")
# States that are not the end of a run: nothing to charge.
NOT_FINISHED = {"PENDING", "RUNNING", "REQUEUED", "SUSPENDED"}
# jobcomp's record of a run that Slurm requeued (the next run has its own record).
REQUEUED = {"PENDING", "REQUEUED"}
RESOURCE_COUNT = {"cpu": "cpus", "gpu": "gpus", "node": "node_count"}


@dataclass
class Plan:
    event: JobStarted | JobCompleted
    job: dict[str, Any]
    charges: list[dict[str, Any]] = field(default_factory=list)
    # A record of a run that has not ended (PENDING after a requeue, say) must not take the
    # event id its real completion will need: it is recorded, not claimed.
    final: bool = True


def charge_events(session: Session, items: list[Any], *, source: str = "") -> Outcome:
    outcome = Outcome()
    candidates, parked = sort_out(items, (JobStarted, JobCompleted), "charger", source)

    ids = {e.event_id for e, _ in candidates}
    seen = set(session.scalars(select(ProcessedEvent.event_id).where(bulk.any_of(ProcessedEvent.event_id, ids))))
    fresh = [(e, raw) for e, raw in candidates if e.event_id not in seen]
    outcome.duplicates += len(candidates) - len(fresh)
    directory = Directory.load(session, (e for e, _ in fresh))
    gpus_at_start = _gpus_at_start(session, directory, [e for e, _ in fresh])
    settings = get_settings()
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
            plans.append(_plan(session, directory, event, set(settings.free_states),
                               gpus_at_start.get(_gpu_key(directory, event))))
            planned.add(event.event_id)
        except Unresolved as exc:
            parked.append(Parked(raw, str(exc), event.event_id, event.kind, source))

    job_ids = _record_jobs(session, plans)
    final = [p for p in plans if p.final]
    claimed = _claim(session, final)
    outcome.duplicates += len(final) - len(claimed)
    outcome.recorded += len(plans) - len(final)
    requests = []
    ended: list[int] = []
    for plan in final:
        if plan.event.event_id not in claimed:
            continue
        job_id = job_ids[job_key(plan.job)]
        if isinstance(plan.event, JobCompleted):
            ended.append(job_id)
        outcome.recorded += 1
        if plan.charges:
            outcome.charged += 1
        for c in plan.charges:
            requests.append(ledger.ChargeRequest(
                key=c["key"], account_id=c["account_id"], service_id=c["service_id"],
                quantity=c["quantity"], effective_at=plan.event.end_time,  # type: ignore[union-attr]
                multiplier=c["multiplier"], user_id=plan.job["user_id"], job_id=job_id,
                details=c["details"], actor="charger",
                request_hash=ledger.charge_request_hash(
                    c["account_id"], c["service_id"], c["quantity"], c["multiplier"],
                    plan.job["user_id"], job_id, plan.event.end_time),  # type: ignore[union-attr]
            ))
    requeued = [(job_ids[job_key(p.job)], p.event.end_time) for p in plans  # type: ignore[union-attr]
                if not p.final and isinstance(p.event, JobCompleted) and p.event.state in REQUEUED]
    result = ledger.charge_many(session, requests, settles=ended + [job_id for job_id, _ in requeued])
    if result.refused:
        # The inbox claimed these events, so refusing now would lose them: abort the batch and
        # let the caller apply its events one by one.
        raise RuntimeError(f"ledger refused charges: {result.refused}")
    outcome.transactions = len(result.transactions)
    ledger.settle_holds(session, ended, actor="charger")  # admission's holds give way to the charges
    ledger.release_requeued_holds(session, requeued, actor="charger")
    _refund_by_state(session, [r for r in requests if r.details["state"] in settings.refund_states],
                     result, settings.refund_states)
    outcome.parked = park(session, parked)
    return outcome


def _refund_by_state(session: Session, requests: list[ledger.ChargeRequest], result: ledger.ChargeResult,
                     fractions: dict[str, float]) -> None:
    """The site's automatic refunds (``refund_states``): a charge, then a refund of part of it
    pointing at it, in the same transaction, so a statement shows both."""
    for request in requests:
        state = request.details["state"]
        fraction = Decimal(str(fractions[state]))
        txn = session.get_one(LedgerTransaction, result.transactions[request.key])
        amount = (txn.amount * fraction).quantize(QUANTITY, rounding=ROUND_HALF_UP)
        if amount > 0:
            # effective with its charge: both land in the same statement, on the same allocation
            ledger.refund(session, txn, amount, key=f"{request.key}/refund-{state.lower()}",
                          reason=f"automatic refund of {float(fraction) * 100:g}% for jobs ending {state}",
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
            .where(bulk.any_of(Job.job_id, {k[1] for k in keys}), Job.gpus > 0)):
        for key in ((system_id, job_id, task, "submit", submit), (system_id, job_id, task, "start", start)):
            if key in keys:
                found[key] = gpus
    return found


def _plan(session: Session, directory: Directory, event: JobStarted | JobCompleted, free_states: set[str],
          gpus_at_start: int | None = None) -> Plan:
    """``gpus_at_start``: the job's GPUs as recorded when it started, where the event does not say."""
    system = directory.system(event.system)
    user_id = directory.user(system, event.user)
    account = directory.account(system, event.account)
    directory.check_member(account, user_id, event.user)
    directory.check_open(account, event.end_time if isinstance(event, JobCompleted) else (event.start_time or event.submit_time))  # type: ignore[arg-type]
    job = {
        "system_id": system.id, "job_id": event.job_id, "array_job_id": event.array_job_id,
        "array_task_id": event.array_task_id, "het_offset": event.het_offset,
        "submit_time": event.submit_time or _submit_time_for(session, system, event),
        "start_time": event.start_time, "user_id": user_id, "account_id": account.id,
        "partition": event.partition, "qos": event.qos, "node_count": event.node_count,
        "node_list": event.node_list, "cpus": event.cpus, "gpus": event.gpus,
        "memory_mb": event.memory_mb, "time_limit_minutes": event.time_limit_minutes,
    }
    plan = Plan(event, job)
    if isinstance(event, JobStarted):
        job["state"] = "RUNNING"
        return plan
    job.update(end_time=event.end_time, state=event.state, exit_code=event.exit_code)
    start = event.start_time or _recorded_start(session, system, event)
    if start is None:
        raise Unresolved(f"no start time for job {event.job_id}: the event has none and no "
                         "job.started was recorded for it")
    if event.end_time < start:
        raise Unresolved(f"end_time {event.end_time.isoformat()} of job {event.job_id} is before the "
                         f"start_time {start.isoformat()} its job.started recorded")
    if event.end_time - start > LONGEST_JOB:
        raise Unresolved(f"job {event.job_id} ran longer than {LONGEST_JOB.days} days (from the start_time "
                         f"{start.isoformat()} its job.started recorded)")
    job["start_time"] = start
    elapsed = int((event.end_time - start).total_seconds())
    if event.state in free_states:
        policy = f"state {event.state} is not charged"
    elif event.state in NOT_FINISHED:
        policy = f"state {event.state} is not the end of a run"
        plan.final = False
        job["end_time"] = None  # not ended: and a finished job's row is not reopened by it
    elif elapsed <= 0:
        policy = "never ran"
    else:
        policy = "charged for elapsed time"
    job["charge_policy"] = policy
    if policy != "charged for elapsed time":
        return plan

    hours = Decimal(elapsed) / HOUR
    partition_m = system.multipliers.get(("partition", event.partition or ""), Decimal(1))
    qos_m = system.multipliers.get(("qos", event.qos or ""), Decimal(1))
    for resource, attribute in RESOURCE_COUNT.items():
        count = getattr(event, attribute)
        if resource == "gpu" and count is None:
            count = gpus_at_start
        count = count or 0
        if resource == "node" and "node" not in system.services:
            continue  # node-hours are charged only where a center defines them
        if count <= 0:
            continue
        service_id, service_name = directory.service(system, resource, account)
        quantity = (count * hours).quantize(QUANTITY, rounding=ROUND_HALF_UP)
        plan.charges.append({
            "key": f"{event.event_id}/{resource}", "account_id": account.id,
            "service_id": service_id, "quantity": quantity, "multiplier": partition_m * qos_m,
            "details": {
                "event_id": event.event_id, "resource": resource, "count": count,
                "elapsed_seconds": elapsed, "state": event.state, "policy": policy,
                "partition_multiplier": str(partition_m), "qos_multiplier": str(qos_m),
                "service": service_name,
            },
        })
    return plan


def _same_job(system: SystemInfo, event: JobStarted | JobCompleted) -> tuple[Any, ...]:
    """Rows of this job whatever its submit time: what events without one are matched on."""
    return (Job.system_id == system.id, Job.job_id == event.job_id,
            Job.array_task_id.is_not_distinct_from(event.array_task_id),
            Job.het_offset.is_not_distinct_from(event.het_offset))


def _submit_time_for(session: Session, system: SystemInfo, event: JobStarted | JobCompleted) -> dt.datetime:
    """Hooks that never see the submit time (Slurm's ctld hooks): the job recorded by its start,
    or the start time itself standing in for the submit time in the job's key."""
    found = session.scalar(
        select(Job.submit_time).where(*_same_job(system, event), Job.start_time == event.start_time)
        .order_by(Job.submit_time.desc()).limit(1)
    )
    assert event.start_time is not None  # the contract requires submit_time or start_time
    return found or event.start_time


def _recorded_start(session: Session, system: SystemInfo, event: JobCompleted) -> dt.datetime | None:
    return session.scalar(
        select(Job.start_time).where(*_same_job(system, event), Job.end_time.is_(None), Job.start_time.is_not(None))
        .order_by(Job.submit_time.desc()).limit(1)
    )


def _record_jobs(session: Session, plans: list[Plan]) -> dict[tuple[Any, ...], int]:
    """One row per job of the batch; a completion in the batch wins over a start."""
    rows: dict[tuple[Any, ...], dict[str, Any]] = {}
    for plan in plans:
        key = job_key(plan.job)
        if key in rows and isinstance(plan.event, JobStarted):
            continue
        rows[key] = plan.job
    return upsert_jobs(session, list(rows.values()))


def _claim(session: Session, plans: list[Plan]) -> set[str]:
    if not plans:
        return set()
    return {row[0] for row in bulk.insert_rows(
        session, ProcessedEvent.__table__,
        # in one order for every batch, so that two claiming the same events cannot deadlock
        sorted(({"event_id": p.event.event_id, "kind": p.event.kind} for p in plans), key=lambda r: r["event_id"]),
        on_conflict="(event_id) DO NOTHING", returning=("event_id",),
    )}
