"""Whether a server process we recorded is still that server, and stopping it.

A pid file outlives its process (a SIGKILL, a SIGTERM to the command that was to clean up, a
reboot) and the kernel hands the number to the next program. So a recorded pid counts only if
the process with that number started when we recorded it, runs the program we started, and
names our files on its command line; anything else is a stale record, never a process to signal.
"""

from __future__ import annotations

import signal
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass

import psutil

# psutil's create_time is rounded differently across reads on some kernels: a second of slack.
SAME_START = 1.0


@dataclass(frozen=True)
class ServerProcess:
    pid: int
    started: float  # the process's create time, as psutil reads it
    program: str  # the executable's name: postgres, redis-server
    marker: str  # a path its command line names: the PostgreSQL data directory, the Redis socket

    @classmethod
    def find(cls, pid: int, program: str, marker: str) -> ServerProcess | None:
        """The process ``pid`` if it is ``program`` running on ``marker``, else None."""
        try:
            process = psutil.Process(pid)
            found = cls(pid, process.create_time(), program, marker)
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            return None
        return found if found.running() else None

    @classmethod
    def from_record(cls, record: object) -> ServerProcess | None:
        """The process a state file recorded, or None for a record that is not one (hand-edited, torn)."""
        try:
            return cls(int(record["pid"]), float(record["started"]), str(record["program"]),  # type: ignore[index]
                       str(record["marker"]))  # type: ignore[index]
        except (KeyError, TypeError, ValueError):
            return None

    def record(self) -> dict[str, object]:
        return asdict(self)

    def running(self) -> bool:
        try:
            process = psutil.Process(self.pid)
            if process.status() == psutil.STATUS_ZOMBIE:
                return False
            return (abs(process.create_time() - self.started) <= SAME_START
                    and process.name() == self.program
                    and names(process.cmdline(), self.marker))
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            return False

    def stop(self, first: signal.Signals, timeout: float = 30.0) -> None:
        """Send ``first`` (the server's clean shutdown), wait up to ``timeout`` seconds, then
        SIGKILL. Only ever signals the process this record names. Done once it has exited: a
        zombie its parent (init, for a daemon) has yet to reap holds no socket and no file."""
        for sig, wait in ((first, timeout), (signal.SIGKILL, 10.0)):
            if not self.running():
                return
            try:
                psutil.Process(self.pid).send_signal(sig)
            except psutil.NoSuchProcess:
                return
            if wait_until(lambda: not self.running(), wait):
                return


def names(cmdline: list[str], path: str) -> bool:
    """Whether a command line names ``path`` as a whole argument (postgres -D PATH) or as the end
    of one (redis-server shows itself as "redis-server unixsocket:PATH"): never a path it merely
    starts with, such as another instance's ``PATH2``."""
    return any(arg == path or arg.endswith(":" + path) for arg in cmdline)


def wait_until(predicate: Callable[[], object], timeout: float, interval: float = 0.05) -> bool:
    deadline = time.monotonic() + timeout
    while True:
        if predicate():
            return True
        if time.monotonic() >= deadline:
            return False
        time.sleep(interval)
