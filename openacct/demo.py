"""``openacct demo``: the whole pipeline on this machine, with nothing installed system-wide.

It starts the embedded servers (or uses the configured ones), a relay and a charger worker,
loads the quick-start center with deposits, runs a synthetic day of Slurm jobs through the real
``openacct hook slurm-jobcomp`` command, waits until every event is charged or parked, and
prints the balances. With no database configured it builds the center in the local instance's
database, which every later command uses and which keeps running after the demo (``openacct
local stop`` stops it): ``openacct balance phys`` then shows the demo's balance. With a database
configured it never touches that database's data: it (re)creates one named ``openacct_demo``
beside it.
"""

from __future__ import annotations

import datetime as dt
import os
import random
import shutil
import subprocess
import sys
import time
from pathlib import Path

import psycopg
from psycopg import sql
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from sqlalchemy import func, make_url, select

from shared import config, db, local_instance
from shared.databases import drop_database, ensure_database
from shared.errors import OpenAcctError

DEMO_DATABASE = "openacct_demo"
# Written on the database the demo builds: the mark that it may build it again.
MADE_BY_DEMO = "made by openacct demo"
QUICKSTART = Path(__file__).resolve().parents[1] / "examples" / "quickstart.py"
JOBS = 400
# (state, weight): a day on a busy cluster, with a few jobs OpenAcct must refuse to charge.
STATES = [("COMPLETED", 76), ("FAILED", 9), ("TIMEOUT", 5), ("CANCELLED", 5), ("NODE_FAIL", 3),
          ("OUT_OF_MEMORY", 2)]
console = Console(highlight=False)


def _demo_database_url(settings: config.Settings) -> str:
    """The local instance's database, which later commands use; or, with a database configured,
    ``openacct_demo`` beside it. Either is made anew."""
    if settings.database_url:
        server = make_url(settings.database_url).set(drivername="postgresql")
        name = DEMO_DATABASE
    else:
        server = make_url(local_instance.database_url(settings.data_dir, "postgres"))
        name = local_instance.DATABASE_NAME
    admin = server.render_as_string(hide_password=False)
    url = server.set(database=name).render_as_string(hide_password=False)
    if name != DEMO_DATABASE and _holds_a_center_of_its_own(admin, url, name):
        raise OpenAcctError(f"the local instance's database {name} holds a center the demo did not make, and the "
                            "demo would replace it: `openacct local stop --delete-data` starts afresh (deleting it), "
                            "or set OPENACCT_DATABASE_URL to build the demo beside another database")
    drop_database(admin, name)
    ensure_database(admin, name)
    with psycopg.connect(admin, autocommit=True) as conn:
        conn.execute(sql.SQL("COMMENT ON DATABASE {} IS {}").format(sql.Identifier(name), sql.Literal(MADE_BY_DEMO)))
    return url


def _holds_a_center_of_its_own(admin: str, url: str, name: str) -> bool:
    """Whether ``name`` has projects that a run of the demo did not put there."""
    with psycopg.connect(admin) as conn:
        row = conn.execute("SELECT shobj_description(oid, 'pg_database') FROM pg_database WHERE datname = %s",
                           (name,)).fetchone()
    if row is None or row[0] == MADE_BY_DEMO:
        return False
    with psycopg.connect(url) as conn:
        if conn.execute("SELECT to_regclass('projects')").fetchone()[0] is None:
            return False
        return conn.execute("SELECT EXISTS (SELECT 1 FROM projects)").fetchone()[0]


def _openacct() -> str:
    beside = Path(sys.executable).with_name("openacct")
    return str(beside) if beside.exists() else (shutil.which("openacct") or "openacct")


def _day_of_jobs(now: int) -> list[dict[str, str]]:
    rng = random.Random(2026)
    people = [("bob", "phys"), ("tux", "phys"), ("sue", "chem"), ("tux", "chem")]
    jobs = []
    for n in range(JOBS):
        user, account = rng.choice(people)
        state = rng.choices([s for s, _ in STATES], [w for _, w in STATES])[0]
        cpus = rng.choice([1, 2, 4, 8, 16, 32, 64, 128])
        seconds = rng.randint(60, 12 * 3600)
        end = now - rng.randint(60, 20 * 3600)
        start = end - seconds if state != "CANCELLED" or rng.random() < 0.5 else end  # some never ran
        jobs.append(_jobcomp_env(1000 + n, user, account, cpus, start, end, state))
    # What a real day also brings: a user OpenAcct has never heard of, an account that does not exist.
    jobs.append(_jobcomp_env(9001, "mallory", "phys", 4, now - 7200, now - 3600, "COMPLETED"))
    jobs.append(_jobcomp_env(9002, "tux", "astro", 4, now - 7200, now - 3600, "COMPLETED"))
    return jobs


def _jobcomp_env(job_id: int, user: str, account: str, cpus: int, start: int, end: int, state: str) -> dict[str, str]:
    ran = end > start
    return {"JOBID": str(job_id), "ARRAYJOBID": "0", "ARRAYTASKID": "4294967294", "USERNAME": user,
            "ACCOUNT": account, "PARTITION": "batch", "QOS": "normal", "CLUSTER": "cluster",
            "JOBNAME": f"job{job_id}", "JOBSTATE": state, "EXITCODE": "1:0" if state == "FAILED" else "0:0",
            "SUBMIT": str(start - 120), "START": str(start), "END": str(end),
            "NODECNT": "1" if ran else "0", "PROCS": str(cpus if ran else 0), "NODES": "c01" if ran else "",
            "LIMIT": "12:00:00", "BATCH": "yes", "UID": "1000", "GID": "1000"}


def run() -> None:
    started = time.monotonic()
    settings = config.get_settings()
    demo_dir = settings.data_dir / "demo"
    shutil.rmtree(demo_dir, ignore_errors=True)
    demo_dir.mkdir(parents=True)
    url = _demo_database_url(settings)
    broker = settings.broker_url or local_instance.broker_url(settings.data_dir)
    env = {**os.environ, "OPENACCT_DATABASE_URL": url, "OPENACCT_BROKER_URL": broker,
           "OPENACCT_SPOOL_DIR": str(demo_dir / "spool"), "OPENACCT_RELAY_BATCH_SIZE": "200"}
    if settings.signing_key_file is None:  # the demo's own key signs and checks its messages
        from shared import signing

        env["OPENACCT_SIGNING_KEY_FILE"] = str(demo_dir / "signing-keys.json")
        signing.generate(Path(env["OPENACCT_SIGNING_KEY_FILE"]), "admin")
        signing.keyring.cache_clear()
    os.environ.update(env)
    config.get_settings.cache_clear()
    db.database_url.cache_clear()
    db.engine.cache_clear()

    from openacct import shortcuts as sc
    from openacct.cli import run as cli
    from shared.migrate import upgrade
    from shared.models import LedgerTransaction, ParkedEvent, ProcessedEvent

    where = "the configured server" if settings.database_url else "the local instance"
    console.print(f"[bold]1.[/] schema at revision {upgrade(db.engine())} in database {make_url(url).database} on "
                  f"{where}; broker {broker.split('://')[0]}")
    namespace = {name: getattr(sc, name) for name in sc.__all__}
    with db.session_scope():
        exec(compile(QUICKSTART.read_text(), str(QUICKSTART), "exec"), namespace)
        year_start = dt.datetime(dt.datetime.now(dt.UTC).year, 1, 1, tzinfo=dt.UTC)
        sc.deposit("phys", "5000", start=year_start, key="demo-phys")
        sc.deposit("chem", "3000", start=year_start, key="demo-chem")
    console.print("[bold]2.[/] quick-start center loaded; phys funded with 5000, chem with 3000")

    logs = demo_dir / "logs"
    logs.mkdir()
    openacct = _openacct()
    processes = [
        subprocess.Popen([openacct, "worker", "charger", "-c", "2", "--loglevel", "warning"], env=env,
                         stdout=open(logs / "charger.log", "wb"), stderr=subprocess.STDOUT),
        subprocess.Popen([openacct, "relay"], env=env, stdout=open(logs / "relay.log", "wb"),
                         stderr=subprocess.STDOUT),
    ]
    console.print(f"[bold]3.[/] charger worker and relay started (logs in {logs})")
    try:
        jobs = _day_of_jobs(int(time.time()))
        hook_env = {"PATH": "/usr/bin:/bin", "OPENACCT_SPOOL_DIR": env["OPENACCT_SPOOL_DIR"],
                    "OPENACCT_CONFIG": os.devnull}
        pushed = time.monotonic()
        with _progress() as progress:
            task = progress.add_task("jobs through openacct hook slurm-jobcomp", total=len(jobs))
            for job in jobs:
                subprocess.run([openacct, "hook", "slurm-jobcomp"], env={**hook_env, **job}, check=True,
                               stdout=subprocess.DEVNULL)
                progress.advance(task)
            task = progress.add_task("events charged or parked", total=len(jobs))
            deadline = time.monotonic() + 120
            while time.monotonic() < deadline:
                with db.session_scope() as s:
                    done = (s.scalar(select(func.count()).select_from(ProcessedEvent))
                            + s.scalar(select(func.count()).select_from(ParkedEvent)))
                progress.update(task, completed=done)
                if done >= len(jobs):
                    break
                time.sleep(0.2)
        took = time.monotonic() - pushed
    finally:
        for process in processes:
            process.terminate()
        for process in processes:
            process.wait(30)

    with db.session_scope() as s:
        charged = s.scalar(select(func.count(func.distinct(LedgerTransaction.job_id)))
                           .where(LedgerTransaction.kind == "charge"))
        recorded = s.scalar(select(func.count()).select_from(ProcessedEvent))
        parked = s.execute(select(ParkedEvent.reason)).scalars().all()
    console.print(f"[bold]4.[/] {len(jobs)} jobs: {charged} charged, {recorded - charged} recorded without "
                  f"charge (node failures, never ran), {len(parked)} parked, in {took:.1f} s from first hook "
                  "to last charge")
    for reason in parked:
        console.print(f"   parked: {reason}")
    console.print("[bold]5.[/] balances ([italic]openacct balance[/]):")
    cli(["balance"])
    status = cli(["ledger", "verify"])
    console.print(f"demo finished in {time.monotonic() - started:.1f} s")
    _say_what_next(settings, url)
    if status:
        raise SystemExit(status)


def _say_what_next(settings: config.Settings, url: str) -> None:
    """The line that reaches the demo's data from the next command."""
    if settings.database_url:
        shown = make_url(url).render_as_string(hide_password=True)
        console.print(f"its center is in the database {DEMO_DATABASE}, beside yours; point the CLI at it with\n"
                      f"  export OPENACCT_DATABASE_URL='{shown}'{'  (your password for ***)' if '***' in shown else ''}",
                      soft_wrap=True)  # unbroken, to copy
    else:
        console.print("the local instance keeps running with the demo's center: [italic]openacct local status[/] "
                      "shows it, [italic]openacct local stop[/] stops it", soft_wrap=True)
    console.print("next: [bold]openacct balance phys[/]  (then openacct project show phys, openacct transactions "
                  "--project phys, openacct deadletter list)", soft_wrap=True)


def _progress() -> Progress:
    return Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                    console=console)
