"""A job's start time, kept by PrologSlurmctld for EpilogSlurmctld: Slurm tells neither hook.

One small file per running job, ``<spool>/state/<system>-<job id>[_<array task>]``, holding the
start in epoch seconds, written as durably as a spooled event so that a controller crash while
jobs run does not lose their starts. The names are safe as paths: the system name and ids were
checked by ``slurm_values`` before they get here.
"""

from __future__ import annotations

from pathlib import Path

from openacct.hooks.job_event import BadInput
from shared import spool
from shared.spool import _durable_write  # the spool's own fsync-rename-fsync step, not a second copy of it

STATE = "state"


def _name(system: str, job_id: str, array_task_id: int | None) -> str:
    return f"{system}-{job_id}" + ("" if array_task_id is None else f"_{array_task_id}")


def record_start(spool_dir: Path, system: str, job_id: str, array_task_id: int | None, start: int) -> None:
    name, data = _name(system, job_id, array_task_id), f"{start}\n".encode()
    try:
        _durable_write(spool_dir / STATE, name, data, spool_dir / spool.TMP)
    except FileNotFoundError:  # the first job on a new spool
        spool.ensure(spool_dir)
        (spool_dir / STATE).mkdir(exist_ok=True, mode=0o770)
        _durable_write(spool_dir / STATE, name, data, spool_dir / spool.TMP)


def recorded_start(spool_dir: Path, system: str, job_id: str, array_task_id: int | None) -> int | None:
    path = spool_dir / STATE / _name(system, job_id, array_task_id)
    try:
        content = path.read_bytes().strip()
    except FileNotFoundError:
        return None
    if not content.isdigit():
        raise BadInput(f"the start time kept in {path} is unreadable: {content[:40]!r}")
    return int(content)


def forget(spool_dir: Path, system: str, job_id: str, array_task_id: int | None) -> None:
    (spool_dir / STATE / _name(system, job_id, array_task_id)).unlink(missing_ok=True)
