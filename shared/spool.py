"""The local spool between the scheduler hooks and the relay. Standard library only.

A hook writes each event to ``tmp/``, fsyncs it and renames it into ``new/`` (an atomic step on
one filesystem), then fsyncs the directory: once the hook has exited 0 the event survives a
crash or a power cut. The relay reads ``new/`` oldest first and deletes an entry only after the
broker has confirmed it. Input that is not an event goes to ``reject/`` with its reason.

Names are ``<ns since epoch>-<event id>.json``: they sort by the time they were spooled.
"""

from __future__ import annotations

import os
import time

# Paths are plain strings: pathlib costs a hook several milliseconds to import.
PathLike = str | os.PathLike[str]

TMP, NEW, REJECT = "tmp", "new", "reject"
# An event is a few hundred bytes; anything near this is not one.
MAX_EVENT_BYTES = 256 * 1024


def ensure(spool_dir: PathLike) -> None:
    """Create the spool, readable and writable by its owner and group only (the hooks' user and
    the relay): whoever can write to it can put events in it."""
    for part in (TMP, NEW, REJECT):
        path = os.path.join(spool_dir, part)
        if not os.path.isdir(path):
            os.makedirs(path, mode=0o770, exist_ok=True)
            os.chmod(path, 0o770)  # makedirs' mode is cut by the umask


def durable_write(directory: str, name: str, data: bytes, tmp_dir: str) -> str:
    """Write ``data`` as ``directory/name`` so that it is whole or absent after a crash."""
    tmp = os.path.join(tmp_dir, f"{name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o640)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view):]
        os.fsync(fd)
    finally:
        os.close(fd)
    final = os.path.join(directory, name)
    os.rename(tmp, final)
    dir_fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)
    return final


def _safe(event_id: str) -> str:
    return "".join(c if c.isalnum() or c in "._-" else "_" for c in event_id)[:120]


def write(spool_dir: PathLike, event_id: str, data: bytes) -> str:
    """Spool one event durably; returns its path in ``new/``."""
    spool_dir = os.fspath(spool_dir)
    name = f"{time.time_ns():020d}-{_safe(event_id)}.json"
    new, tmp = os.path.join(spool_dir, NEW), os.path.join(spool_dir, TMP)
    try:
        return durable_write(new, name, data, tmp)
    except FileNotFoundError:
        ensure(spool_dir)
        return durable_write(new, name, data, tmp)


def reject(spool_dir: PathLike, raw: bytes, reason: str, source: str) -> str:
    """Keep input that is not an event, exactly as received, beside a note of why."""
    spool_dir = os.fspath(spool_dir)
    ensure(spool_dir)
    stem = f"{time.time_ns():020d}-{os.getpid()}-{_safe(source)}"
    rejected, tmp = os.path.join(spool_dir, REJECT), os.path.join(spool_dir, TMP)
    durable_write(rejected, f"{stem}.reason", f"{source}: {reason}\n".encode(), tmp)
    return durable_write(rejected, f"{stem}.raw", raw, tmp)


def set_aside(spool_dir: PathLike, path: str, reason: str, source: str) -> str:
    """Move a spool entry the relay cannot ship into ``reject/``, whole, beside why."""
    spool_dir = os.fspath(spool_dir)
    stem = os.path.basename(path).removesuffix(".json")
    rejected = os.path.join(spool_dir, REJECT)
    durable_write(rejected, f"{stem}.reason", f"{source}: {reason}\n".encode(), os.path.join(spool_dir, TMP))
    final = os.path.join(rejected, f"{stem}.raw")
    os.rename(path, final)
    return final


def pending(spool_dir: PathLike, limit: int) -> list[str]:
    """Up to ``limit`` spooled events, oldest first."""
    new = os.path.join(spool_dir, NEW)
    try:
        names = sorted(e.name for e in os.scandir(new) if e.name.endswith(".json"))
    except FileNotFoundError:
        return []
    return [os.path.join(new, n) for n in names[:limit]]


def backlog(spool_dir: PathLike) -> tuple[int, float]:
    """How many events wait, and the age in seconds of the oldest."""
    try:
        names = [e.name for e in os.scandir(os.path.join(spool_dir, NEW)) if e.name.endswith(".json")]
    except FileNotFoundError:
        return 0, 0.0
    if not names:
        return 0, 0.0
    oldest_ns = int(min(names).split("-", 1)[0])
    return len(names), max(0.0, (time.time_ns() - oldest_ns) / 1e9)
