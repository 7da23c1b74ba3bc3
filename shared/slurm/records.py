"""Slurm's records of jobs turned into OpenAcct job events (as Slurm 22.05 writes them).

jobcomp/script tells everything about a finished job, and so does jobcomp/elasticsearch, whose
records are read here as the jobcomp/script environment of the same job: both give one event, with
one id, whichever way a job was reported. PrologSlurmctld and EpilogSlurmctld tell no
time at all: the prolog's clock is taken as the start (Slurm counts the prolog in the job's
elapsed time) and the epilog's as the end; ``ctld_state`` carries the start from one to the other.
"""

from __future__ import annotations

from shared.job_event import BadInput, job_event
from shared.slurm import values as v

# Annotations only: collections.abc costs a hook run the import of collections.
TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Callable, Mapping

    # (system, job id, array task) -> the start recorded by the prolog, in epoch seconds.
    StartLookup = Callable[[str, str, int | None], int | None]


def jobcomp_event(env: Mapping[str, str], now: int, default_system: str | None,
                  source: str = "slurm-jobcomp", gpus: int | None = None) -> dict[str, object]:
    """``gpus``: when the record tells them (jobcomp/script does not; admission control then does)."""
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
    if gpus is not None:
        job["gpus"] = gpus
    return job_event("job.completed", source, now, job)


class WrongSystem(BadInput):
    """A record that names another cluster than the system it was sent for."""


# jobcomp/elasticsearch field -> the jobcomp/script variable that carries the same value.
_ELASTICSEARCH_AS_JOBCOMP = {
    "jobid": "JOBID", "username": "USERNAME", "account": "ACCOUNT", "partition": "PARTITION",
    "qos": "QOS", "state": "JOBSTATE", "exit_code": "EXITCODE", "total_nodes": "NODECNT",
    "nodes": "NODES", "total_cpus": "PROCS", "job_name": "JOBNAME", "array_job_id": "ARRAYJOBID",
    "array_task_id": "ARRAYTASKID",
}
_ELASTICSEARCH_TIMES = {"@submit": "SUBMIT", "@start": "START", "@end": "END"}


def elasticsearch_event(record: Mapping[str, object], system: str, now: int) -> dict[str, object]:
    """One document that Slurm's jobcomp/elasticsearch plugin POSTs, as the event of the job.

    The plugin writes times with ``gmtime_r`` (jobcomp_elasticsearch.c, ``_make_time_str``):
    UTC without a zone, and "Unknown" for Slurm's 0. It names the cluster only when slurmdbd
    gave the job an association: then it must be ``system``, the one the URL names.
    """
    cluster = record.get("cluster")
    if cluster is not None and cluster != system:
        raise WrongSystem(f"the record is of cluster {cluster!r}, sent to the URL of system {system!r}")
    env = {variable: _scalar(record, field) for field, variable in _ELASTICSEARCH_AS_JOBCOMP.items()
           if record.get(field) is not None}
    env.update({variable: _epoch_of_utc(record, field) for field, variable in _ELASTICSEARCH_TIMES.items()})
    if env["SUBMIT"] == "0":
        env["SUBMIT"] = env["START"]  # no job details: jobcomp/script gives the start (jobcomp_script.c)
    limit = record.get("time_limit")  # seconds; absent when the job has none
    env["LIMIT"] = str(limit // 60) if type(limit) is int and limit >= 0 else "UNLIMITED"
    tres = record.get("tres_alloc")
    if tres is not None and not isinstance(tres, str):
        raise BadInput(f"tres_alloc is {tres!r}, not a TRES string")
    return jobcomp_event(env, now, system, "slurm-elasticsearch", gpus=v.gpus(tres))


def _scalar(record: Mapping[str, object], field: str) -> str:
    value = record[field]
    if type(value) is int or isinstance(value, str):
        return str(value)
    raise BadInput(f"{field} is {value!r}, not a number or a string")


def _epoch_of_utc(record: Mapping[str, object], field: str) -> str:
    """Epoch seconds of the plugin's ``YYYY-MM-DDTHH:MM:SS`` (UTC); "0" for Unknown or absent.
    Worked out here: calendar and time.strptime would cost every hook run ~10 ms of imports."""
    value = record.get(field, "Unknown")
    if value == "Unknown":
        return "0"
    parts = (value[0:4], value[5:7], value[8:10], value[11:13], value[14:16], value[17:19]) \
        if isinstance(value, str) and len(value) == 19 else ()
    if not parts or value[4] + value[7] + value[10] + value[13] + value[16] != "--T::" \
            or not all(p.isascii() and p.isdigit() for p in parts):
        raise BadInput(f"{field} is {value!r}, not a time such as 2026-12-06T07:54:46")
    year, month, day, hour, minute, second = map(int, parts)
    leap = year % 4 == 0 and (year % 100 != 0 or year % 400 == 0)
    days_in_month = (31, 29 if leap else 28, 31, 30, 31, 30, 31, 31, 30, 31, 30, 31)
    if not (1970 <= year and 1 <= month <= 12 and 1 <= day <= days_in_month[month - 1]
            and hour < 24 and minute < 60 and second < 60):
        raise BadInput(f"{field} is {value!r}, not a time such as 2026-12-06T07:54:46")
    return str(_days_since_epoch(year, month, day) * 86_400 + hour * 3600 + minute * 60 + second)


def _days_since_epoch(year: int, month: int, day: int) -> int:
    """Days from 1970-01-01 to a date of the proleptic Gregorian calendar (H. Hinnant's
    days_from_civil)."""
    year -= month <= 2
    era = year // 400
    year_of_era = year - era * 400
    day_of_year = (153 * (month + (-3 if month > 2 else 9)) + 2) // 5 + day - 1
    day_of_era = year_of_era * 365 + year_of_era // 4 - year_of_era // 100 + day_of_year
    return era * 146_097 + day_of_era - 719_468


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
