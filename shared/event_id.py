"""Deterministic event ids. Standard library only: the scheduler hooks import this.

The same job and kind always give the same id, whichever hook fired and however often, so the
charger's inbox sees a repeated hook as the same event. A job is known by its system, job id,
array task and het-job offset, and submit time (schedulers reuse job ids; the submit time tells
two jobs with one id apart). Hooks that never see the submit time (Slurm's PrologSlurmctld and
EpilogSlurmctld) use the job's start time instead, marked so it cannot collide with a submit time.
"""

from __future__ import annotations

try:  # the C module alone: hashlib would load OpenSSL, milliseconds on every hook run
    from _sha256 import sha256  # Python 3.11
except ImportError:  # pragma: no cover - other Pythons
    try:
        from _sha2 import sha256  # type: ignore[no-redef]  # Python 3.12+
    except ImportError:
        from hashlib import sha256

ID_LENGTH = 32


def job_event_id(
    kind: str,
    system: str,
    job_id: str,
    array_task_id: int | None,
    het_offset: int | None,
    submit_epoch: int | None,
    start_epoch: int | None = None,
) -> str:
    if submit_epoch is not None:
        when = str(submit_epoch)
    elif start_epoch is not None:
        when = f"start:{start_epoch}"
    else:
        raise ValueError("a job event needs its submit time or its start time")
    parts = (
        kind,
        system,
        job_id,
        "" if array_task_id is None else str(array_task_id),
        "" if het_offset is None else str(het_offset),
        when,
    )
    digest = sha256("\x1f".join(parts).encode()).hexdigest()[:ID_LENGTH]
    return f"{kind}:{digest}"
