"""Slurm's ways of writing values in hook environments, read into plain Python values.

What charging depends on (job id, user, system, times, CPUs, nodes, state) is read strictly: a
value that cannot be read makes the input a reject, kept for a person to fix. Descriptive values
(job name, time limit, exit code) are read leniently, so a job with an odd name is still charged:
a user must not be able to dodge charges by naming a job in Latin-1.
"""

from __future__ import annotations

from shared.job_event import BadInput

# Annotations only: collections.abc costs a hook run the import of collections.
TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Mapping

# Slurm's NO_VAL (0xfffffffe) as ARRAYTASKID: the job is not an array task.
NO_VAL = 4294967294
# Slurm shows a job without a time limit as UNLIMITED, or as 365 days when the backfill
# scheduler started it (seen on 22.05); neither is a limit the job asked for.
NO_LIMIT_WORDS = ("UNLIMITED", "INFINITE", "Partition_Limit", "NONE", "")
NO_LIMIT_MINUTES = 365 * 24 * 60
NAME_CHARS = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789._@+-")
NAME_MAX = 256


def text(env: Mapping[str, str], key: str) -> str | None:
    """A variable's value, None when unset; refused when it was not UTF-8 (decoded with
    surrogateescape, so its bad bytes are lone surrogates that UTF-8 cannot encode)."""
    value = env.get(key)
    if value is None:
        return None
    try:
        value.encode()
    except UnicodeEncodeError as exc:
        raise BadInput(f"{key} is not UTF-8 (bad byte at offset {exc.start})") from None
    return value.strip()


def required(env: Mapping[str, str], key: str) -> str:
    value = text(env, key)
    if not value:
        raise BadInput(f"{key} is missing" if value is None else f"{key} is empty")
    return value


def optional(env: Mapping[str, str], key: str) -> str | None:
    """Empty and Slurm's "(null)" both mean: not given."""
    value = text(env, key)
    return None if value in (None, "", "(null)") else value


def label(env: Mapping[str, str], key: str) -> str | None:
    """Free text such as a job name: bad bytes become U+FFFD, long text is cut."""
    value = env.get(key)
    if not value:
        return None
    # Bad bytes arrive as lone surrogates (from surrogateescape, or \udcxx in JSON): not UTF-8 text.
    return "".join("\ufffd" if "\ud800" <= c <= "\udfff" else c for c in value[:NAME_MAX])


def _natural(value: str, key: str) -> int:
    if not (value.isascii() and value.isdigit()):
        raise BadInput(f"{key} is {value!r}, not a whole number")
    return int(value)


def number(env: Mapping[str, str], key: str) -> int:
    return _natural(required(env, key), key)


def job_id(env: Mapping[str, str], *keys: str) -> str:
    """Slurm's job ids are numbers; the first of ``keys`` that is set is used."""
    key = next((k for k in keys if env.get(k)), keys[0])
    return str(_natural(required(env, key), key))


def epoch(env: Mapping[str, str], key: str) -> int | None:
    """Epoch seconds; 0 (Slurm's "never") gives None."""
    return _natural(required(env, key), key) or None


def system(env: Mapping[str, str], key: str, default: str | None) -> str:
    name = optional(env, key) or default
    if not name:
        raise BadInput("no cluster name: set default_system in the config")
    if not (name[0].isalnum() and len(name) <= 64 and NAME_CHARS.issuperset(name)):
        raise BadInput(f"cluster name {name!r} is not a system name (letters, digits and ._@+-)")
    return name


def array_task(env: Mapping[str, str], job_key: str, task_key: str) -> tuple[str | None, int | None]:
    """(array job id, task id), or (None, None) for a job that is not an array task."""
    array_job, task = optional(env, job_key), optional(env, task_key)
    if array_job is None or task is None:
        return None, None
    array_job_id, task_id = _natural(array_job, job_key), _natural(task, task_key)
    if array_job_id == 0 or task_id == NO_VAL:
        return None, None
    return str(array_job_id), task_id


def cpus_per_node(env: Mapping[str, str], key: str) -> int:
    """The CPUs of a job from Slurm's compressed per-node list: "2(x3),1" is 2+2+2+1."""
    total = 0
    for part in required(env, key).split(","):
        count, _, repeat = part.partition("(x")
        if repeat and not repeat.endswith(")"):
            raise BadInput(f"{key} is {env[key]!r}, not a CPU count per node such as 2(x3),1")
        total += _natural(count, key) * (_natural(repeat[:-1], key) if repeat else 1)
    return total


def exit_status(value: str | None) -> tuple[int, int] | None:
    """(exit code, signal) from Slurm's "3:0"; None when absent or unreadable."""
    code, _, signal = (value or "").partition(":")
    if not (code.isascii() and code.isdigit() and (not signal or (signal.isascii() and signal.isdigit()))):
        return None
    return int(code), int(signal or 0)


def time_limit_minutes(value: str | None) -> int | None:
    """Minutes from Slurm's [D-]HH:MM:SS, MM:SS, MM or D-HH[:MM]; None for no limit or an
    unreadable one (the limit is information, not what a job is charged for)."""
    value = (value or "").strip()
    if value in NO_LIMIT_WORDS:
        return None
    days, dash, clock = value.rpartition("-")
    parts = clock.split(":")
    if not all(p.isascii() and p.isdigit() for p in [*parts, *([days] if dash else [])]) or len(parts) > 3:
        return None
    numbers = [int(p) for p in parts]
    if dash:  # D-HH, D-HH:MM, D-HH:MM:SS
        hours, minutes, seconds = (numbers + [0, 0])[:3]
        hours += int(days) * 24
    elif len(numbers) == 3:  # HH:MM:SS
        hours, minutes, seconds = numbers
    else:  # MM, MM:SS
        hours, minutes, seconds = 0, numbers[0], numbers[1] if len(numbers) == 2 else 0
    total = hours * 60 + minutes + seconds // 60
    return None if total >= NO_LIMIT_MINUTES else total


def gpus(tres: str | None) -> int | None:
    """GPUs in a TRES string such as ``cpu=4,node=1,billing=4,gres/gpu=2``; None when it names
    none. Slurm writes a typed request both as its type (``gres/gpu:a100=2``) and as the total
    (``gres/gpu=2``): the total is taken, and typed counts are summed only when it is missing."""
    counts = {}
    for part in (tres or "").split(","):
        name, _, count = part.partition("=")
        if name == "gres/gpu" or name.startswith("gres/gpu:"):
            if not (count.isascii() and count.isdigit()):
                raise BadInput(f"{name}={count!r} in TRES {tres!r} is not a GPU count")
            counts[name] = int(count)
    if "gres/gpu" in counts:
        return counts["gres/gpu"]
    return sum(counts.values()) if counts else None
