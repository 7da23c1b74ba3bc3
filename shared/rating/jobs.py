"""A job event made into the job's row and what the job is charged: the charger's rule, and
what reconcile asks of a record ("what would the charger charge for this?").

Every run that started is charged for its elapsed time (CPUs, GPUs and, where a system defines
them, nodes, each x the exact hours x the partition's and QoS's multipliers), under the policy
of the state it ended in: ``free_states`` are not charged (NODE_FAIL by default),
``refund_states`` are charged and then refunded in part. A run that Slurm requeued (by the user
or an administrator: jobcomp's PENDING record of it, sacct's REQUEUED) ends in state REQUEUED and
is charged like any other unless the site lists REQUEUED in ``free_states``; a run that
admission control refused never ran and is not charged.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Collection, Iterable
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from shared import bulk
from shared.events import LONGEST_JOB, JobCompleted, JobStarted
from shared.jobs import JOB_KEY, job_key
from shared.models import REFUSED_RUN, Job
from shared.rating.directory import Directory, SystemInfo, Unresolved
from shared.rating.price import hours, rounded

# A record of a job that has not ended: nothing to charge yet.
NOT_FINISHED = {"RUNNING", "SUSPENDED"}
# jobcomp's record of a run that Slurm requeued is PENDING (sacct says REQUEUED), from the run's
# start to the requeue; the next run has a record of its own, under a new submit time.
REQUEUED = {"PENDING", "REQUEUED"}
# What admission control writes on the run it refused: its requeue record charges nothing.
REFUSED = REFUSED_RUN
CHARGED = "charged for elapsed time"
RESOURCE_COUNT = {"cpu": "cpus", "gpu": "gpus", "node": "node_count"}


@dataclass
class Plan:
    event: JobStarted | JobCompleted
    job: dict[str, Any]
    charges: list[dict[str, Any]] = field(default_factory=list)
    # A record of a run that has not ended must not take the event id its end will need: it is
    # recorded, not claimed.
    final: bool = True


def plan(session: Session, directory: Directory, event: JobStarted | JobCompleted, free_states: set[str],
         gpus_at_start: int | None = None, refused: Collection[tuple[Any, ...]] = ()) -> Plan:
    """The job's row and charges for ``event``; ``Unresolved`` (with the reason to park it
    under) where it cannot be priced. ``gpus_at_start``: the job's GPUs as recorded when it
    started, where the event does not say; ``refused``: the runs admission control refused
    (``refused_runs``), by their jobs' keys."""
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
    result = Plan(event, job)
    if isinstance(event, JobStarted):
        job["state"] = "RUNNING"
        return result
    state = "REQUEUED" if event.state in REQUEUED else event.state
    job.update(end_time=event.end_time, state=state, exit_code=event.exit_code)
    start = event.start_time or _recorded_start(session, job)
    if start is None:
        raise Unresolved(f"no start time for job {event.job_id}: the event has none and no "
                         "job.started was recorded for it (submitted at "
                         f"{job['submit_time'].isoformat()})")
    if event.end_time < start:
        raise Unresolved(f"end_time {event.end_time.isoformat()} of job {event.job_id} is before the "
                         f"start_time {start.isoformat()} its job.started recorded")
    if event.end_time - start > LONGEST_JOB:
        raise Unresolved(f"job {event.job_id} ran longer than {LONGEST_JOB.days} days (from the start_time "
                         f"{start.isoformat()} its job.started recorded)")
    job["start_time"] = start
    elapsed = int((event.end_time - start).total_seconds())
    if state in NOT_FINISHED:
        policy = f"state {state} is not the end of a run"
        result.final = False
        job["end_time"] = None  # not ended: and a finished job's row is not reopened by it
    elif refused and job_key(job) in refused:  # requeued by Slurm (or cancelled) before it ran
        policy = REFUSED
    elif state in free_states:
        policy = f"state {state} is not charged"
    elif elapsed <= 0:
        policy = "never ran"
    else:
        policy = CHARGED
    job["charge_policy"] = policy
    if policy != CHARGED:
        return result

    multiplier, partition_multiplier, qos_multiplier = system.charging(event.partition, event.qos)
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
        quantity = hours(count, elapsed)
        result.charges.append({
            "key": f"{event.event_id}/{resource}", "account_id": account.id,
            "service_id": service_id, "quantity": rounded(quantity), "exact_quantity": quantity,
            "multiplier": multiplier,
            "details": {
                "event_id": event.event_id, "resource": resource, "count": count,
                "elapsed_seconds": elapsed, "state": state, "policy": policy,
                "partition_multiplier": partition_multiplier,
                "qos_multiplier": qos_multiplier,
                "service": service_name,
            },
        })
    return result


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


def _this_job(job: dict[str, Any]) -> tuple[Any, ...]:
    """The job's row by its whole natural key: a scheduler reuses job ids."""
    return (Job.system_id == job["system_id"], Job.job_id == job["job_id"],
            Job.array_task_id.is_not_distinct_from(job["array_task_id"]),
            Job.het_offset.is_not_distinct_from(job["het_offset"]), Job.submit_time == job["submit_time"])


def _recorded_start(session: Session, job: dict[str, Any]) -> dt.datetime | None:
    """The start a job.started recorded for this very job (never another's with the same id)."""
    return session.scalar(select(Job.start_time).where(*_this_job(job), Job.end_time.is_(None)))


def refused_runs(session: Session, directory: Directory,
                 events: Iterable[JobStarted | JobCompleted]) -> set[tuple[Any, ...]]:
    """The keys of the jobs of ``events`` whose run admission control refused: one query on the
    charger's every batch, which reads the refused runs' own index (migration 0017), so its cost
    does not grow with the jobs table."""
    ends = [e for e in events if isinstance(e, JobCompleted) and e.system in directory.systems]
    if not ends:
        return set()
    return set(bulk.select_where_any(
        session, Job.__table__, JOB_KEY, "job_id", {e.job_id for e in ends},
        also={"system_id": {directory.systems[e.system].id for e in ends}}, condition=f"charge_policy = '{REFUSED}'"))


__all__ = ["CHARGED", "NOT_FINISHED", "REFUSED", "REQUEUED", "Plan", "plan", "refused_runs"]
