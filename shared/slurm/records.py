"""Slurm hook environments turned into OpenAcct job events (variables as Slurm 22.05 sets them).

jobcomp/script tells everything about a finished job. PrologSlurmctld and EpilogSlurmctld tell no
time at all: the prolog's clock is taken as the start (Slurm counts the prolog in the job's
elapsed time) and the epilog's as the end; ``ctld_state`` carries the start from one to the other.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

from shared.job_event import BadInput, job_event
from shared.slurm import values as v

# (system, job id, array task) -> the start recorded by the prolog, in epoch seconds.
StartLookup = Callable[[str, str, int | None], int | None]


def jobcomp_event(env: Mapping[str, str], now: int, default_system: str | None,
                  source: str = "slurm-jobcomp") -> dict[str, object]:
    job_id = v.job_id(env, "JOBID")  # read first: without it, nothing else is worth a reason
    array_job_id, array_task_id = v.array_task(env, "ARRAYJOBID", "ARRAYTASKID")
    end = v.epoch(env, "END")
    if end is None:
        raise BadInput("END is 0: the job has not ended")
    status = v.exit_status(env.get("EXITCODE"))
    job = {
        "system": v.system(env, "CLUSTER", default_system),
        "job_id": job_id,
        "array_job_id": array_job_id,
        "array_task_id": array_task_id,
        "name": v.label(env, "JOBNAME"),
        "user": v.required(env, "USERNAME"),
        "account": v.optional(env, "ACCOUNT"),
        "partition": v.optional(env, "PARTITION"),
        "qos": v.optional(env, "QOS"),
        "submit_time": v.epoch(env, "SUBMIT"),
        "start_time": v.epoch(env, "START"),
        "end_time": end,
        # "CANCELLED by 0" is a CANCELLED job.
        "state": v.required(env, "JOBSTATE").split()[0].upper(),
        "exit_code": None if status is None else status[0],
        "node_count": v.number(env, "NODECNT"),
        "node_list": v.optional(env, "NODES"),
        "cpus": v.number(env, "PROCS"),
        "time_limit_minutes": v.time_limit_minutes(env.get("LIMIT")),
    }
    return job_event("job.completed", source, now, job)


def _ctld_job(env: Mapping[str, str], default_system: str | None) -> dict[str, object]:
    """What PrologSlurmctld and EpilogSlurmctld both say about the job."""
    job_id = v.job_id(env, "SLURM_JOB_ID", "SLURM_JOBID")
    array_job_id, array_task_id = v.array_task(env, "SLURM_ARRAY_JOB_ID", "SLURM_ARRAY_TASK_ID")
    return {
        "system": v.system(env, "SLURM_CLUSTER_NAME", default_system),
        "job_id": job_id,
        "array_job_id": array_job_id,
        "array_task_id": array_task_id,
        "name": v.label(env, "SLURM_JOB_NAME"),
        "user": v.required(env, "SLURM_JOB_USER"),
        "account": v.optional(env, "SLURM_JOB_ACCOUNT"),
        "partition": v.optional(env, "SLURM_JOB_PARTITION"),
        "qos": None,  # not given to the ctld hooks
        "node_count": v.number(env, "SLURM_JOB_NUM_NODES"),
        "node_list": v.optional(env, "SLURM_JOB_NODELIST"),
        "cpus": v.cpus_per_node(env, "SLURM_JOB_CPUS_PER_NODE"),
    }


def prologctld_event(env: Mapping[str, str], now: int, default_system: str | None,
                     submit_time: int | None = None) -> dict[str, object]:
    """``submit_time`` when the admission check learnt it (from squeue): then the job is known
    by the same key as its jobcomp record."""
    job = {**_ctld_job(env, default_system), "submit_time": submit_time, "start_time": now}
    return job_event("job.started", "slurm-prologctld", now, job)


def epilogctld_event(env: Mapping[str, str], now: int, default_system: str | None,
                     recorded_start: StartLookup) -> dict[str, object]:
    job = _ctld_job(env, default_system)
    start = recorded_start(job["system"], job["job_id"], job["array_task_id"])  # type: ignore[arg-type]
    if start is None:
        raise BadInput(f"no start time for job {job['job_id']}: configure PrologSlurmctld with "
                       "OpenAcct's hook, or use jobcomp/script")
    code, signal = _epilog_exit_status(env)
    # The ctld hooks are not told the job's state; cancelled and timed-out jobs exit 0:0 and so
    # read as COMPLETED here (jobcomp/script knows better).
    job.update(start_time=start, end_time=now, state="COMPLETED" if code == signal == 0 else "FAILED",
               exit_code=code)
    return job_event("job.completed", "slurm-epilogctld", now, job)


def _epilog_exit_status(env: Mapping[str, str]) -> tuple[int, int]:
    status = v.exit_status(env.get("SLURM_JOB_EXIT_CODE2"))
    if status is not None:
        return status
    raw = v.exit_status(env.get("SLURM_JOB_EXIT_CODE"))  # a wait status: 768 is exit 3
    if raw is None:
        raise BadInput("SLURM_JOB_EXIT_CODE2 and SLURM_JOB_EXIT_CODE are missing or unreadable")
    return raw[0] >> 8 & 0xFF, raw[0] & 0x7F
