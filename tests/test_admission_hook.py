"""`openacct hook slurm-prologctld` with admission control, as a process, when no decision comes:
it never hangs past ``admission_timeout`` and the job starts or not as ``admission_on_error``
says. squeue and scontrol are small scripts here (the live tier in tests/slurm/ uses Slurm's
own); the admission service is the real one, or a socket that never answers.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import threading
import time
from pathlib import Path

import pytest
from sqlalchemy import Engine, create_engine

from services.admission.server import AdmissionServer
from shared import db
from shared.config import Settings
from tests.pipeline import free_port
from tests.test_hooks import OPENACCT, _environb, env_of, spooled

TIMEOUT = 1.0
# Process start, spooling and the verdict's line after the deadline: far less than this.
SLACK = 1.5
SUBMIT = 1796395409


def fake_slurm(directory: Path, squeue: str) -> Path:
    """squeue running ``squeue`` (shell), scontrol recording its arguments."""
    directory.mkdir()
    for name, body in (("squeue", squeue), ("scontrol", f'echo "$@" >> {directory}/scontrol.args')):
        path = directory / name
        path.write_text(f"#!/bin/sh\n{body}\n")
        path.chmod(0o755)
    return directory


def run_prolog(tmp_path: Path, socket_path: Path, bin_dir: Path, on_error: str) -> tuple[int, str, float]:
    (tmp_path / "openacct.toml").write_text("")  # every setting comes from the environment here
    env = {**env_of("prologctld", "with-slurmdbd", SLURM_JOB_ID="2"), "PATH": "/usr/bin:/bin",
           "OPENACCT_CONFIG": str(tmp_path / "openacct.toml"), "OPENACCT_SPOOL_DIR": str(tmp_path / "spool"),
           "OPENACCT_DEFAULT_SYSTEM": "lab", "OPENACCT_ADMISSION_SOCKET": str(socket_path),
           "OPENACCT_ADMISSION_TIMEOUT": str(TIMEOUT), "OPENACCT_ADMISSION_ON_ERROR": on_error,
           "OPENACCT_SLURM_BIN_DIR": str(bin_dir)}
    began = time.monotonic()
    done = subprocess.run([OPENACCT, "hook", "slurm-prologctld"], env=env, capture_output=True, text=True,
                          timeout=30)
    return done.returncode, done.stderr, time.monotonic() - began


@pytest.fixture
def silent_socket(tmp_path: Path):  # type: ignore[no-untyped-def]
    """A unix socket that accepts connections and never answers."""
    path = tmp_path / "silent.sock"
    server = socket.socket(socket.AF_UNIX)
    server.bind(str(path))
    server.listen(8)
    accepted: list[socket.socket] = []
    stop = threading.Event()

    def accept() -> None:
        server.settimeout(0.1)
        while not stop.is_set():
            try:
                accepted.append(server.accept()[0])
            except TimeoutError:
                continue

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    yield path
    stop.set()
    thread.join()
    for conn in accepted:
        conn.close()
    server.close()


SQUEUE_OK = f'echo "1:00:00|{SUBMIT}|normal|N/A"'


@pytest.mark.parametrize(("on_error", "code"), [("open", 0), ("closed", 1)])
def test_a_service_that_never_answers_costs_the_job_at_most_the_timeout(
    tmp_path: Path, silent_socket: Path, on_error: str, code: int
) -> None:
    returncode, stderr, seconds = run_prolog(tmp_path, silent_socket, fake_slurm(tmp_path / "bin", SQUEUE_OK),
                                             on_error)
    assert returncode == code, stderr
    assert TIMEOUT * 0.9 <= seconds < TIMEOUT + SLACK
    assert "the admission service did not answer in time" in stderr
    assert f"admission_on_error = {on_error}" in stderr


def test_a_squeue_that_hangs_is_killed_at_the_deadline(tmp_path: Path, silent_socket: Path) -> None:
    bin_dir = fake_slurm(tmp_path / "bin", f"echo $$ > {tmp_path}/squeue.pid\nexec sleep 60")
    returncode, stderr, seconds = run_prolog(tmp_path, silent_socket, bin_dir, "closed")
    assert returncode == 1 and seconds < TIMEOUT + SLACK, stderr
    assert "squeue did not answer in time" in stderr
    pid = int((tmp_path / "squeue.pid").read_text())
    with pytest.raises(ProcessLookupError):  # killed and reaped, not left behind
        os.kill(pid, 0)


@pytest.mark.parametrize(("on_error", "code"), [("open", 0), ("closed", 1)])
def test_with_the_database_unreachable_the_service_says_so_and_the_prolog_fails_as_configured(
    tmp_path: Path, engine: Engine, on_error: str, code: int
) -> None:
    unreachable = create_engine(f"postgresql+psycopg://nobody@127.0.0.1:{free_port()}/none?connect_timeout=2")
    db.bind(unreachable)  # the service's sessions, as if PostgreSQL were down
    path = tmp_path / "admission.sock"
    server = AdmissionServer(path, Settings())
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        returncode, stderr, seconds = run_prolog(tmp_path, path, fake_slurm(tmp_path / "bin", SQUEUE_OK), on_error)
    finally:
        server.shutdown()
        server.server_close()
        db.bind(engine)
        unreachable.dispose()
    assert returncode == code, stderr
    assert seconds < TIMEOUT + SLACK
    assert "no admission decision (database error: OperationalError)" in stderr


def test_a_call_that_ignores_the_deadline_is_ended_by_the_alarm_and_the_start_still_recorded(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from shared.slurm import admission
    from shared.slurm import hook as run

    (tmp_path / "openacct.toml").write_text("")
    for name, value in {"CONFIG": str(tmp_path / "openacct.toml"), "SPOOL_DIR": str(tmp_path / "spool"),
                        "DEFAULT_SYSTEM": "lab", "ADMISSION_SOCKET": str(tmp_path / "none.sock"),
                        "ADMISSION_TIMEOUT": "0.3", "ADMISSION_ON_ERROR": "open"}.items():
        monkeypatch.setenv(f"OPENACCT_{name}", value)
    monkeypatch.setattr(admission, "_from_squeue", lambda *_: time.sleep(30))  # deaf to any deadline
    began = time.monotonic()
    try:
        code = run.run("slurm-prologctld", _environb(env_of("prologctld", "with-slurmdbd", SLURM_JOB_ID="2")))
    finally:
        signal.signal(signal.SIGALRM, signal.SIG_DFL)  # the hook's is for its own short life only
    assert code == 0 and time.monotonic() - began < 2  # the alarm at 0.3 + 0.5 s
    [started] = spooled(tmp_path / "spool")
    assert (started["kind"], started["job_id"]) == ("job.started", "2")
