"""Find the local instance's servers, or start them; stop them; say what runs.

``local-instance.json`` in the data directory records each server started: its process (pid,
start time, program, a path its command line names) and where it listens. A command reads it
without a lock and uses a server whose process is still that server and that answers. Anything
else is stale: the command then takes ``local-instance.lock`` (a concurrent command waits on it),
looks again, and starts the server anew. A server running without a record (the file removed,
or written by an older OpenAcct) is found by its own pid file and taken over, never started twice.
"""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import psycopg

from shared.databases import ensure_database
from shared.errors import LocalInstanceError
from shared.local_instance import postgres, postgres_user, redis, state_file
from shared.local_instance.postgres import RunningPostgres
from shared.local_instance.processes import ServerProcess, wait_until

DATABASE_NAME = "openacct"
# Linux's limit on a unix socket's path: 108 bytes with the terminating NUL.
SOCKET_PATH_MAX = 107
# How long a server whose process runs may take to answer (starting, recovering) before it is
# taken for hung, stopped and started anew.
ANSWER_SECONDS = 10.0


def database_url(data_dir: Path, database: str = DATABASE_NAME) -> str:
    """A URL to ``database`` (created if missing) on the local instance's PostgreSQL, started if
    it is not running."""
    data_dir = data_dir.resolve()
    server = _recorded_postgres(data_dir)
    if server is not None:
        try:
            ensure_database(server.url("postgres"), database)  # one connection: it answers, and the database is there
            return server.url(database)
        except psycopg.OperationalError:
            pass
    with state_file.locked(data_dir):
        server = _recorded_postgres(data_dir)
        if server is None or not wait_until(lambda: postgres.answers(server), ANSWER_SECONDS, 0.5):
            server = _start_postgres(data_dir, mute=server)
    ensure_database(server.url("postgres"), database)
    return server.url(database)


def broker_url(data_dir: Path) -> str:
    """The URL of the local instance's Redis, started if it is not running."""
    data_dir = data_dir.resolve()
    recorded = _recorded_redis(data_dir)
    if recorded is not None and redis.answers(recorded[1]):
        return redis.url(recorded[1])
    with state_file.locked(data_dir):
        recorded = _recorded_redis(data_dir)
        if recorded is not None and wait_until(lambda: redis.answers(recorded[1]), ANSWER_SECONDS, 0.5):
            return redis.url(recorded[1])
        return redis.url(_start_redis(data_dir, mute=recorded))


def stop(data_dir: Path, delete_data: bool = False) -> list[str]:
    """Stop the local instance's servers, recorded or found by their own pid files; with
    ``delete_data``, delete their files too. Returns what was stopped, one line each."""
    data_dir = data_dir.resolve()
    if not data_dir.is_dir():
        return []
    stopped = []
    with state_file.locked(data_dir):
        state = state_file.read(data_dir)
        pgdata = Path((state.get("postgres") or {}).get("pgdata") or _pgdata_of(data_dir))
        for process in _postgres_processes(state, pgdata):
            postgres.stop(process)
            stopped.append(f"PostgreSQL (pid {process.pid})")
        redis_dir = data_dir / "redis"
        for process in _redis_processes(state, redis_dir):
            redis.stop(process)
            stopped.append(f"Redis (pid {process.pid})")
        for private in state.get("private_dirs", []):
            shutil.rmtree(private, ignore_errors=True)
        (data_dir / state_file.STATE_FILE).unlink(missing_ok=True)
        if delete_data:
            shutil.rmtree(pgdata, ignore_errors=True)
            shutil.rmtree(redis_dir, ignore_errors=True)
    return stopped


@contextmanager
def stopped_after(data_dir: Path, delete_data: bool = True) -> Iterator[Path]:
    """The local instance under ``data_dir`` for one block (a bench, a test run): whatever of it
    the block started is stopped at its end, and its files deleted unless asked to keep them."""
    try:
        yield data_dir
    finally:
        stop(data_dir, delete_data=delete_data)


def describe(data_dir: Path) -> dict[str, Any]:
    """What runs, recorded or not, without starting anything: each server's pid and URL, or None."""
    data_dir = data_dir.resolve()
    state = state_file.read(data_dir)
    pgdata = Path((state.get("postgres") or {}).get("pgdata") or _pgdata_of(data_dir))
    server = _recorded_postgres(data_dir) or postgres.running(pgdata)
    redis_dir = data_dir / "redis"
    broker = _recorded_redis(data_dir)
    if broker is None and (process := redis.running(redis_dir, redis_dir / "redis.sock")) is not None:
        broker = process, redis_dir / "redis.sock"
    return {
        "data_dir": str(data_dir),
        "postgres": None if server is None else {
            "pid": server.process.pid, "answers": postgres.answers(server), "url": server.url(DATABASE_NAME),
            "files": str(pgdata), "runs_as": postgres_user.USER if postgres_user.needed() else None,
            "psql": str(postgres.programs() / "psql")},
        "redis": None if broker is None else {
            "pid": broker[0].pid, "answers": redis.answers(broker[1]), "url": redis.url(broker[1]),
            "files": str(redis_dir)},
    }


def _recorded_postgres(data_dir: Path) -> RunningPostgres | None:
    record = state_file.read(data_dir).get("postgres") or {}
    process = ServerProcess.from_record(record.get("process"))
    if process is None or not process.running():
        return None
    return RunningPostgres(process, Path(record["socket_dir"]), int(record["port"]))


def _recorded_redis(data_dir: Path) -> tuple[ServerProcess, Path] | None:
    record = state_file.read(data_dir).get("redis") or {}
    process = ServerProcess.from_record(record.get("process"))
    if process is None or not process.running():
        return None
    return process, Path(record["socket"])


def _start_postgres(data_dir: Path, mute: RunningPostgres | None) -> RunningPostgres:
    if mute is not None:  # its process runs but it has not answered for ANSWER_SECONDS
        postgres.stop(mute.process)
    pgdata = _pgdata_of(data_dir)
    run_as = None
    if postgres_user.needed():
        user = postgres_user.account()
        postgres_user.check_reachable(postgres.programs().parent, user)
        run_as = user.pw_name
    server = postgres.running(pgdata)  # started outside our record: take it over if it answers
    if server is not None and not wait_until(lambda: postgres.answers(server), ANSWER_SECONDS, 0.5):
        postgres.stop(server.process)
        server = None
    if server is None:
        socket_dir = _socket_dir(data_dir, pgdata, postgres.SOCKET_NAME, run_as)
        server = postgres.start(pgdata, socket_dir, run_as)
    state_file.record(data_dir, "postgres", {"process": server.process.record(), "pgdata": str(pgdata),
                                             "socket_dir": str(server.socket_dir), "port": server.port})
    return server


def _start_redis(data_dir: Path, mute: tuple[ServerProcess, Path] | None) -> Path:
    if mute is not None:  # its process runs but it has not answered for ANSWER_SECONDS
        redis.stop(mute[0])
    directory = data_dir / "redis"
    record = state_file.read(data_dir).get("redis") or {}
    socket_path = Path(record.get("socket") or directory / "redis.sock")
    process = redis.running(directory, socket_path)
    if process is not None and not wait_until(lambda: redis.answers(socket_path), ANSWER_SECONDS, 0.5):
        redis.stop(process)
        process = None
    if process is None:
        socket_path = _socket_dir(data_dir, directory, "redis.sock", None) / "redis.sock"
        process = redis.start(directory, socket_path)
    state_file.record(data_dir, "redis", {"process": process.record(), "directory": str(directory),
                                          "socket": str(socket_path)})
    return socket_path


def _pgdata_of(data_dir: Path) -> Path:
    return postgres_user.files_of(data_dir) if postgres_user.needed() else data_dir / "postgres"


def _postgres_processes(state: dict[str, Any], pgdata: Path) -> list[ServerProcess]:
    found = [ServerProcess.from_record((state.get("postgres") or {}).get("process"))]
    if (server := postgres.running(pgdata)) is not None:
        found.append(server.process)
    return _unique_running(found)


def _redis_processes(state: dict[str, Any], directory: Path) -> list[ServerProcess]:
    record = state.get("redis") or {}
    found = [ServerProcess.from_record(record.get("process"))]
    for socket_path in {Path(record.get("socket") or directory / "redis.sock"), directory / "redis.sock"}:
        found.append(redis.running(directory, socket_path))
    return _unique_running(found)


def _unique_running(processes: list[ServerProcess | None]) -> list[ServerProcess]:
    return list({p.pid: p for p in processes if p is not None and p.running()}.values())


def _socket_dir(data_dir: Path, preferred: Path, name: str, owner: str | None) -> Path:
    """``preferred``, or where the socket's path is short enough: a private directory under the
    temporary directory, recorded to be removed at stop."""
    if len(str(preferred / name).encode()) <= SOCKET_PATH_MAX:
        return preferred
    private = Path(tempfile.mkdtemp(prefix="openacct-"))
    if len(str(private / name).encode()) > SOCKET_PATH_MAX:
        raise LocalInstanceError(f"no directory short enough for a unix socket: {preferred} and {private} are too long")
    if owner is not None:
        shutil.chown(private, owner, owner)
    state = state_file.read(data_dir)
    state_file.write(data_dir, {**state, "private_dirs": [*state.get("private_dirs", []), str(private)]})
    return private
