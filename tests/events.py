"""Job events as hooks write them, for tests and benchmarks."""

from __future__ import annotations

import datetime as dt
import json
from typing import Any

from shared.event_id import job_event_id

UTC = dt.UTC


def job_completed(
    job_id: str | int,
    *,
    user: str = "tux",
    account: str | None = "phys",
    system: str = "cluster",
    cpus: int = 4,
    seconds: int = 3600,
    state: str = "COMPLETED",
    end: dt.datetime | None = None,
    **extra: Any,
) -> dict[str, Any]:
    end = (end or dt.datetime.now(UTC) - dt.timedelta(minutes=5)).replace(microsecond=0)
    start = end - dt.timedelta(seconds=seconds)
    submit = start - dt.timedelta(minutes=1)
    event = {
        "schema_version": 1, "kind": "job.completed", "source": "test", "system": system,
        "job_id": str(job_id), "user": user, "account": account, "partition": "batch",
        "submit_time": submit.isoformat(), "start_time": start.isoformat(), "end_time": end.isoformat(),
        "state": state, "exit_code": 0, "cpus": cpus, "node_count": 1, "node_list": "c01",
    }
    event.update(extra)
    event["event_id"] = job_event_id("job.completed", system, str(job_id), event.get("array_task_id"),
                                     event.get("het_offset"), int(submit.timestamp()))
    return event


def raw(event: dict[str, Any]) -> bytes:
    return json.dumps(event).encode()
