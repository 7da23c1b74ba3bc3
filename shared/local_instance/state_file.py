"""The local instance's state file and lock, in the data directory.

``local-instance.json`` holds what runs: one record per server. Commands read it without a lock,
so it is replaced whole, never written in place. ``local-instance.lock`` is held while a server
is started or stopped: a second command that finds no server waits on it, then finds the first
one's, instead of starting another.
"""

from __future__ import annotations

import fcntl
import json
import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

STATE_FILE = "local-instance.json"
LOCK_FILE = "local-instance.lock"


def read(data_dir: Path) -> dict[str, Any]:
    try:
        state = json.loads((data_dir / STATE_FILE).read_text())
    except (OSError, ValueError):
        return {}
    return state if isinstance(state, dict) else {}


def record(data_dir: Path, server: str, entry: dict[str, Any]) -> None:
    write(data_dir, {**read(data_dir), server: entry})


def write(data_dir: Path, state: dict[str, Any]) -> None:
    """Write whole or not at all: a command reading it meanwhile, without the lock, sees the old or the new."""
    fd, name = tempfile.mkstemp(dir=data_dir, prefix=f".{STATE_FILE}.")
    with os.fdopen(fd, "w") as f:
        json.dump(state, f, indent=1)
    os.replace(name, data_dir / STATE_FILE)


@contextmanager
def locked(data_dir: Path) -> Iterator[None]:
    data_dir.mkdir(parents=True, exist_ok=True)
    with open(data_dir / LOCK_FILE, "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)
