"""The local instance with real processes: the demo leaves its servers up, later commands reuse
them, ``openacct local stop`` leaves nothing running, and stale records are seen for what they
are. Every command runs as an administrator's would, with no database or broker URL set."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from decimal import Decimal
from pathlib import Path

import psutil
import psycopg
import pytest

from shared import local_instance
from shared.local_instance import redis
from tests.conftest import QUICKSTART

OPENACCT = str(Path(sys.executable).with_name("openacct"))


@pytest.fixture
def data_dir(tmp_path: Path) -> Iterator[Path]:
    directory = tmp_path / "data"
    yield directory
    local_instance.stop(directory, delete_data=True)


def environment(data_dir: Path) -> dict[str, str]:
    config = data_dir.parent / "openacct.toml"
    config.write_text("")
    unset = {k: v for k, v in os.environ.items() if not k.startswith("OPENACCT_")}
    return {**unset, "OPENACCT_DATA_DIR": str(data_dir), "OPENACCT_CONFIG": str(config)}


def openacct(data_dir: Path, *args: str, stdin: str | None = None, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    result = subprocess.run([OPENACCT, *args], input=stdin, capture_output=True, text=True, timeout=timeout,
                            env=environment(data_dir))
    assert result.returncode == 0, f"openacct {' '.join(args)}: {result.stdout}{result.stderr}"
    return result


def status(data_dir: Path) -> dict:
    result = subprocess.run([OPENACCT, "local", "status", "--json"], capture_output=True, text=True, timeout=60,
                            env=environment(data_dir))
    assert result.returncode in (0, 3), result.stderr
    return json.loads(result.stdout)


def state(data_dir: Path) -> dict:
    return json.loads((data_dir / local_instance.STATE_FILE).read_text())


def alive(pid: int) -> bool:
    """Running, not a zombie its parent has yet to reap (this machine's init reaps late)."""
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def servers_of(data_dir: Path, pgdata: str) -> list[psutil.Process]:
    """Every postgres or redis-server process that names the data directory or its PostgreSQL
    files on its command line."""
    found = []
    for process in psutil.process_iter(["name", "cmdline"]):
        cmdline = " ".join(process.info["cmdline"] or [])
        if (process.info["name"] in ("postgres", "redis-server") and alive(process.pid)
                and (str(data_dir.resolve()) in cmdline or pgdata in cmdline)):
            found.append(process)
    return found


def assert_nothing_left(data_dir: Path, pgdata: str, pids: list[int]) -> None:
    leftover = [p for p in pids if alive(p)] + [p.pid for p in servers_of(data_dir, pgdata)]
    assert not leftover, f"still running: {leftover}"


def test_the_demo_leaves_an_instance_the_next_commands_use_and_stop_ends_it(data_dir: Path) -> None:
    demo = openacct(data_dir, "demo", timeout=600)
    assert "next: openacct balance phys" in " ".join(demo.stdout.split())

    running = status(data_dir)
    postgres, broker = running["postgres"], running["redis"]
    assert postgres["answers"] and broker["answers"]
    started = state(data_dir)["postgres"]["process"]["started"]
    backends = [p.pid for p in psutil.Process(postgres["pid"]).children()]

    balance = json.loads(openacct(data_dir, "balance", "phys", "--json").stdout)
    assert Decimal(balance["allocated"]) == Decimal("5000") and Decimal(balance["charged"]) > 0  # the demo's
    assert "phys" in openacct(data_dir, "project", "show", "phys").stdout
    reused = state(data_dir)["postgres"]["process"]
    assert (reused["pid"], reused["started"]) == (postgres["pid"], started)

    # Reusing a running server costs one connection, not a server start (1.2-1.6 s before).
    took = subprocess.run([sys.executable, "-c", "import time\nfrom pathlib import Path\nfrom shared import "
                           f"local_instance\nt = time.monotonic()\nlocal_instance.database_url(Path({str(data_dir)!r}))"
                           "\nprint(time.monotonic() - t)"], capture_output=True, text=True, check=True, timeout=60)
    assert float(took.stdout) < 0.5
    assert status(data_dir)["postgres"]["pid"] == postgres["pid"]

    # The URLs status gives reach the demo's data and its broker from any other tool.
    with psycopg.connect(postgres["url"]) as conn:
        assert conn.execute("SELECT count(*) FROM projects").fetchone()[0] == 2
    assert redis.answers(Path(broker["url"].removeprefix("redis+socket://")))

    assert "stopped PostgreSQL" in openacct(data_dir, "local", "stop").stdout
    assert_nothing_left(data_dir, postgres["files"], [postgres["pid"], broker["pid"], *backends])
    after = subprocess.run([OPENACCT, "local", "status"], capture_output=True, text=True, env=environment(data_dir))
    assert after.returncode == 3 and "not running" in after.stdout


def test_a_record_of_a_dead_server_is_stale_and_replaced(data_dir: Path) -> None:
    openacct(data_dir, "db", "upgrade")
    first = state(data_dir)["postgres"]
    openacct(data_dir, "local", "stop")
    dead = subprocess.Popen(["true"])
    dead.wait()
    (data_dir / local_instance.STATE_FILE).write_text(json.dumps(
        {"postgres": {**first, "process": {**first["process"], "pid": dead.pid}}}))

    openacct(data_dir, "db", "upgrade")
    now = state(data_dir)["postgres"]
    assert now["process"]["pid"] not in (dead.pid, first["process"]["pid"]) and alive(now["process"]["pid"])
    assert status(data_dir)["postgres"]["pid"] == now["process"]["pid"]


def test_a_pid_another_program_now_has_is_stale_and_that_program_is_left_alone(data_dir: Path) -> None:
    openacct(data_dir, "db", "upgrade")
    first = state(data_dir)["postgres"]
    openacct(data_dir, "local", "stop")
    # The recorded pid and PostgreSQL's own lock file now name a program that is no postgres.
    other = subprocess.Popen(["sleep", "300"])
    try:
        record = {**first, "process": {**first["process"], "pid": other.pid,
                                       "started": psutil.Process(other.pid).create_time()}}
        (data_dir / local_instance.STATE_FILE).write_text(json.dumps({"postgres": record}))
        lock = Path(first["pgdata"]) / "postmaster.pid"
        lock.write_text(f"{other.pid}\n{first['pgdata']}\n{int(time.time())}\n5432\n{first['socket_dir']}\n\n"
                        "  0   0\nready   \n")

        openacct(data_dir, "db", "upgrade")
        now = state(data_dir)["postgres"]["process"]["pid"]
        assert now != other.pid and psutil.Process(now).name() == "postgres"
        openacct(data_dir, "local", "stop")
        assert other.poll() is None, "the program that took the pid was signalled"
        assert_nothing_left(data_dir, first["pgdata"], [now])
    finally:
        other.kill()
        other.wait()


def test_a_server_killed_outright_is_started_anew(data_dir: Path) -> None:
    openacct(data_dir, "db", "upgrade")
    first = state(data_dir)["postgres"]["process"]["pid"]
    os.kill(first, signal.SIGKILL)  # no clean shutdown: postmaster.pid and the socket's lock stay behind

    openacct(data_dir, "db", "upgrade")
    now = state(data_dir)["postgres"]["process"]["pid"]
    assert now != first and alive(now)


def test_the_demo_refuses_to_replace_a_center_it_did_not_make(data_dir: Path) -> None:
    openacct(data_dir, "db", "upgrade")
    openacct(data_dir, "shell", stdin=QUICKSTART.read_text())

    refused = subprocess.run([OPENACCT, "demo"], capture_output=True, text=True, timeout=120, env=environment(data_dir))
    assert refused.returncode == 1
    assert refused.stderr.startswith("error: the local instance's database openacct holds a center the demo did not make")
    assert "phys" in openacct(data_dir, "project", "list").stdout  # still there
