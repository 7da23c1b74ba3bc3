"""A job's start time, kept by PrologSlurmctld for EpilogSlurmctld: Slurm tells neither hook.

One small file per running job, ``<spool>/state/<system>-<job id>[_<array task>]``, holding the
start in epoch seconds, written as durably as a spooled event so that a controller crash while
jobs run does not lose their starts. The names are safe as paths: the system name and ids were
checked by ``slurm_values`` before they get here.
"""

from __future__ import annotations

import os

from shared import spool
from shared.job_event import BadInput

STATE = "state"


def _path(spool_dir: spool.PathLike, system: str, job_id: str, array_task_id: int | None) -> str:
    name = f"{system}-{job_id}" + ("" if array_task_id is None else f"_{array_task_id}")
    return os.path.join(spool_dir, STATE, name)


def record_start(spool_dir: spool.PathLike, system: str, job_id: str, array_task_id: int | None, start: int) -> None:
    path, data = _path(spool_dir, system, job_id, array_task_id), f"{start}\n".encode()
    tmp = os.path.join(spool_dir, spool.TMP)
    try:
        spool.durable_write(os.path.dirname(path), os.path.basename(path), data, tmp)
    except FileNotFoundError:  # the first job on a new spool
        spool.ensure(spool_dir)
        os.makedirs(os.path.dirname(path), mode=0o770, exist_ok=True)
        spool.durable_write(os.path.dirname(path), os.path.basename(path), data, tmp)


def recorded_start(spool_dir: spool.PathLike, system: str, job_id: str, array_task_id: int | None) -> int | None:
    path = _path(spool_dir, system, job_id, array_task_id)
    try:
        with open(path, "rb") as f:
            content = f.read().strip()
    except FileNotFoundError:
        return None
    if not content.isdigit():
        raise BadInput(f"the start time kept in {path} is unreadable: {content[:40]!r}")
    return int(content)


def forget(spool_dir: spool.PathLike, system: str, job_id: str, array_task_id: int | None) -> None:
    try:
        os.unlink(_path(spool_dir, system, job_id, array_task_id))
    except FileNotFoundError:
        pass
