"""``openacct demo``: a small center, funded and charged, on a database of its own.

The demo never touches the configured database's data: it (re)creates a database named
``openacct_demo`` beside it, or on the embedded PostgreSQL when none is configured.
"""

from __future__ import annotations

import datetime as dt
import os
import time
from pathlib import Path

import psycopg
from psycopg import sql
from rich.console import Console
from sqlalchemy import make_url

from shared import config, db
from shared.embedded import ensure_database

DEMO_DATABASE = "openacct_demo"
QUICKSTART = Path(__file__).resolve().parents[1] / "examples" / "quickstart.py"
console = Console(highlight=False)


def _demo_database_url() -> str:
    settings = config.get_settings()
    if settings.database_url:
        server = make_url(settings.database_url).set(drivername="postgresql")
    else:
        from shared.embedded import postgres_url

        server = make_url(postgres_url(settings.data_dir, "postgres"))
    admin = server.render_as_string(hide_password=False)
    with psycopg.connect(admin, autocommit=True) as conn:
        conn.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(DEMO_DATABASE)))
    ensure_database(admin, DEMO_DATABASE)
    return server.set(database=DEMO_DATABASE).render_as_string(hide_password=False)


def run() -> None:
    started = time.monotonic()
    os.environ["OPENACCT_DATABASE_URL"] = _demo_database_url()
    config.get_settings.cache_clear()
    db.database_url.cache_clear()
    db.engine.cache_clear()

    from openacct import shortcuts as sc
    from openacct.cli import run as cli
    from shared.migrate import upgrade

    console.print(f"[bold]1.[/] schema: revision {upgrade(db.engine())} on database {DEMO_DATABASE}")
    namespace = {name: getattr(sc, name) for name in sc.__all__}
    with db.session_scope():
        exec(compile(QUICKSTART.read_text(), str(QUICKSTART), "exec"), namespace)
    console.print("[bold]2.[/] quick-start center loaded: system cluster, core-hours at 0.05, "
                  "projects phys (bob, tux) and chem (sue, tux)")

    now = dt.datetime.now(dt.UTC)
    year = dict(start=dt.datetime(now.year, 1, 1, tzinfo=dt.UTC),
                end=dt.datetime(now.year + 1, 1, 1, tzinfo=dt.UTC))
    with db.session_scope():
        sc.deposit("phys", "1000", **year, key="demo-deposit-phys")
        sc.deposit("chem", "500", **year, credit_limit="50", key="demo-deposit-chem")
        jobs = [("1001", "tux", "phys", 16, 3.5, "COMPLETED"), ("1002", "bob", "phys", 64, 12.0, "COMPLETED"),
                ("1003", "sue", "chem", 8, 0.75, "FAILED"), ("1004", "tux", "chem", 128, 20.25, "TIMEOUT")]
        charges = {}
        for job_id, user, account, cpus, hours, state in jobs:
            end = now - dt.timedelta(hours=1)
            start = end - dt.timedelta(hours=hours)
            job = sc.record_job("cluster", job_id, submit_time=start - dt.timedelta(minutes=5),
                                user=user, account=account, start_time=start, end_time=end,
                                cpus=cpus, state=state, partition="batch")
            core_hours = f"{cpus * hours:.2f}"
            charges[job_id] = sc.charge(account, "cluster-core-hours", core_hours, user=user,
                                        job=job, effective_at=end, key=f"demo-job-{job_id}")
        sc.refund(charges["1003"], reason="node failure on c03", key="demo-refund-1003")
        sc.transfer("phys", "chem", "100", key="demo-transfer", description="help chem through the year")
    console.print("[bold]3.[/] deposits of 1000 (phys) and 500 (chem); four jobs charged; "
                  "job 1003 refunded; 100 moved from phys to chem")

    console.print("[bold]4.[/] balances ([italic]openacct balance[/]):")
    cli(["balance"])
    console.print("[bold]5.[/] ledger ([italic]openacct transactions[/]):")
    cli(["transactions"])
    status = cli(["ledger", "verify"])
    console.print(f"demo finished in {time.monotonic() - started:.1f} s")
    if status:
        raise SystemExit(status)
