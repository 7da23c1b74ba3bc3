"""Recording jobs: one upsert by the job's natural key, for the charger and the Python API alike.

Schedulers reuse job ids, so a job is known by its system, job id, array task, het-job offset and
submit time. Events about one job arrive in any order and more than once: a later event fills in
what an earlier one did not say, and an event without an end (a start, a requeued record) never
reopens or rewrites a job that has ended: it only fills in what is still unknown.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from itertools import repeat
from typing import Any

from sqlalchemy.orm import Session

from shared import bulk
from shared.models import Job

JOB_KEY = ("system_id", "job_id", "array_task_id", "het_offset", "submit_time")  # job_key spells it out
JOB_COLUMNS = JOB_KEY + (
    "array_job_id", "start_time", "end_time", "user_id", "account_id", "partition", "qos", "state",
    "exit_code", "node_count", "node_list", "cpus", "gpus", "memory_mb", "time_limit_minutes",
    "charge_policy",
)

# On a job that has ended, an update without an end only fills in what is still unknown.
_MERGE = ", ".join(
    f"{c} = CASE WHEN excluded.end_time IS NULL AND jobs.end_time IS NOT NULL "
    f"THEN COALESCE(jobs.{c}, excluded.{c}) ELSE COALESCE(excluded.{c}, jobs.{c}) END"
    for c in JOB_COLUMNS if c not in JOB_KEY
)


def job_key(values: Mapping[str, Any]) -> tuple[Any, ...]:
    # JOB_KEY spelled out: the charger takes a few keys per event
    get = values.get
    return (get("system_id"), get("job_id"), get("array_task_id"), get("het_offset"), get("submit_time"))


def _order(job: Mapping[str, Any]) -> tuple[Any, ...]:
    """The order every writer upserts jobs in: by natural key, NULLs first."""
    s, j, a, h, t = job_key(job)
    return ((s is not None, s), (j is not None, j), (a is not None, a), (h is not None, h), (t is not None, t))


def upsert_jobs(session: Session, jobs: Sequence[dict[str, Any]]) -> dict[tuple[Any, ...], int]:
    """Insert or merge ``jobs`` (one per natural key); returns each key's job id."""
    if not jobs:
        return {}
    # In one order for every writer, so that two upserting the same jobs cannot deadlock.
    ordered = sorted(jobs, key=_order)
    # dict.get mapped over the rows: a column without a Python call per value
    written = bulk.insert_columns(session, Job.__table__, {c: list(map(dict.get, ordered, repeat(c))) for c in JOB_COLUMNS},
                                  on_conflict=f"({', '.join(JOB_KEY)}) DO UPDATE SET {_MERGE}",
                                  returning=("id", *JOB_KEY))
    return {tuple(row[1:]): row[0] for row in written}
