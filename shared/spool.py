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
from pathlib import Path

TMP, NEW, REJECT = "tmp", "new", "reject"
# An event is a few hundred bytes; anything near this is not one.
MAX_EVENT_BYTES = 256 * 1024


def ensure(spool_dir: Path) -> None:
    for part in (TMP, NEW, REJECT):
        (spool_dir / part).mkdir(parents=True, exist_ok=True, mode=0o770)


def _durable_write(directory: Path, name: str, data: bytes, tmp_dir: Path) -> Path:
    tmp = tmp_dir / f"{name}.{os.getpid()}.tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o640)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view):]
        os.fsync(fd)
    finally:
        os.close(fd)
    final = directory / name
    os.rename(tmp, final)
    dir_fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)
    return final


def _safe(event_id: str) -> str:
    return "".join(c if c.isalnum() or c in "._-" else "_" for c in event_id)[:120]


def write(spool_dir: Path, event_id: str, data: bytes) -> Path:
    """Spool one event durably; returns its path in ``new/``."""
    try:
        return _durable_write(spool_dir / NEW, f"{time.time_ns():020d}-{_safe(event_id)}.json", data, spool_dir / TMP)
    except FileNotFoundError:
        ensure(spool_dir)
        return _durable_write(spool_dir / NEW, f"{time.time_ns():020d}-{_safe(event_id)}.json", data, spool_dir / TMP)


def reject(spool_dir: Path, raw: bytes, reason: str, source: str) -> Path:
    """Keep input that is not an event, exactly as received, beside a note of why."""
    ensure(spool_dir)
    stem = f"{time.time_ns():020d}-{os.getpid()}-{_safe(source)}"
    _durable_write(spool_dir / REJECT, f"{stem}.reason", f"{source}: {reason}\n".encode(), spool_dir / TMP)
    return _durable_write(spool_dir / REJECT, f"{stem}.raw", raw, spool_dir / TMP)


def pending(spool_dir: Path, limit: int) -> list[Path]:
    """Up to ``limit`` spooled events, oldest first."""
    try:
        names = sorted(e.name for e in os.scandir(spool_dir / NEW) if e.name.endswith(".json"))
    except FileNotFoundError:
        return []
    return [spool_dir / NEW / n for n in names[:limit]]


def backlog(spool_dir: Path) -> tuple[int, float]:
    """How many events wait, and the age in seconds of the oldest."""
    try:
        names = [e.name for e in os.scandir(spool_dir / NEW) if e.name.endswith(".json")]
    except FileNotFoundError:
        return 0, 0.0
    if not names:
        return 0, 0.0
    oldest_ns = int(min(names).split("-", 1)[0])
    return len(names), max(0.0, (time.time_ns() - oldest_ns) / 1e9)
