"""Statements benchmark: every project's monthly statement over a large ledger.

Generates (once per database; kept for reruns) a center of 1,000 projects, each with an account
and an allocation, and a ledger of 5 million charges and their 5 million entries spread over
ten months; then times one statement run for all projects for October, summary and itemized,
beside the same statements drawn up one project at a time (the baseline, timed on a sample of
projects and reported per project).

    .venv/bin/python bench/statements.py [--projects 1000] [--charges 5000000] [--sample 20]

Uses OPENACCT_DATABASE_URL's server (database openacct_bench_statements) or an embedded PostgreSQL.
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

TARGET_SECONDS = 10.0
DATABASE = "openacct_bench_statements"
CHUNK = 1_000_000


def database(tmp: Path) -> str:
    from sqlalchemy import make_url

    from shared import local_instance
    from shared.databases import ensure_database

    given = os.environ.get("OPENACCT_DATABASE_URL")
    server = make_url(given or local_instance.database_url(tmp, "postgres")).set(drivername="postgresql")
    ensure_database(server.render_as_string(hide_password=False), DATABASE)
    return server.set(database=DATABASE).render_as_string(hide_password=False)


def generate(url: str, projects: int, charges: int) -> None:
    import psycopg

    from shared import config, db
    from shared.migrate import upgrade

    os.environ["OPENACCT_DATABASE_URL"] = url
    config.get_settings.cache_clear()
    db.database_url.cache_clear()
    db.engine.cache_clear()
    upgrade(db.engine())
    with psycopg.connect(url, autocommit=True) as conn:
        have = conn.execute("SELECT count(*) FROM ledger_transactions").fetchone()[0]
        if have >= charges + projects:
            print(f"  reusing the ledger already generated in {DATABASE} ({have} transactions)")
            return
        conn.execute("SET session_replication_role = replica")  # past the ledger's TRUNCATE guard
        conn.execute("TRUNCATE systems, services, service_rates, users, projects, accounts, allocations, "
                     "ledger_transactions, ledger_entries, account_balances, jobs RESTART IDENTITY CASCADE")
        conn.execute("RESET session_replication_role")
        started = time.monotonic()
        conn.execute("INSERT INTO systems (name) VALUES ('cluster')")
        conn.execute("INSERT INTO services (system_id, name, units) VALUES (1, 'core-hours', 'core-hours')")
        conn.execute("INSERT INTO service_rates (service_id, rate, effective_from) VALUES (1, 0.05, '2000-01-01Z')")
        conn.execute("INSERT INTO users (name) SELECT 'pi' || g FROM generate_series(1, %s::int) g", (projects,))
        conn.execute("INSERT INTO projects (name, pi_id) SELECT 'p' || g, g FROM generate_series(1, %s::int) g", (projects,))
        conn.execute("INSERT INTO accounts (name, project_id, is_default) SELECT 'p' || g, g, true "
                     "FROM generate_series(1, %s::int) g", (projects,))
        conn.execute("INSERT INTO allocations (account_id, amount, starts_at, ends_at) "
                     "SELECT g, 1000000, '2026-01-01Z', '2027-01-01Z' FROM generate_series(1, %s::int) g", (projects,))
        # A transaction's entries are written in the database transaction that wrote it, as the
        # ledger writes them: the database refuses entries added later (migration 0018).
        with conn.transaction():
            conn.execute("INSERT INTO ledger_transactions (kind, idempotency_key, request_hash, amount, account_id, "
                         "effective_at, details) SELECT 'deposit', 'deposit/' || g, '', 1000000, g, '2026-01-01Z', "
                         "jsonb_build_object('allocation_id', g) FROM generate_series(1, %s::int) g", (projects,))
            conn.execute("INSERT INTO ledger_entries (transaction_id, account_id, allocation_id, bucket, amount, "
                         "effective_at) SELECT id, account_id, account_id, 'allocated', amount, effective_at "
                         "FROM ledger_transactions WHERE kind = 'deposit'")
        seconds = 300 * 86400  # January to the end of October
        for first in range(1, charges + 1, CHUNK):
            last = min(charges, first + CHUNK - 1)
            with conn.transaction():
                conn.execute(
                    "INSERT INTO ledger_transactions (kind, idempotency_key, request_hash, amount, account_id, "
                    "service_id, quantity, rate, effective_at, details, actor) "
                    "SELECT 'charge', 'bench/' || g, '', (1 + g %% 97) * 0.05, 1 + g %% %s, 1, 1 + g %% 97, 0.05, "
                    "'2026-01-01Z'::timestamptz + (g::bigint * %s / %s) * interval '1 second', '{}', 'bench' "
                    "FROM generate_series(%s::bigint, %s::bigint) g",
                    (projects, seconds, charges, first, last),
                )
                conn.execute(
                    "INSERT INTO ledger_entries (transaction_id, account_id, allocation_id, bucket, amount, effective_at) "
                    "SELECT id, account_id, account_id, 'charged', amount, effective_at FROM ledger_transactions "
                    "WHERE kind = 'charge' AND id > (SELECT coalesce(max(transaction_id), 0) FROM ledger_entries)")
            print(f"  {last} of {charges} charges written ({time.monotonic() - started:.0f} s)", flush=True)
        conn.execute("ANALYZE")
        rows = conn.execute("SELECT (SELECT count(*) FROM ledger_transactions) + "
                            "(SELECT count(*) FROM ledger_entries)").fetchone()[0]
        print(f"  generated {rows} ledger rows in {time.monotonic() - started:.0f} s")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--projects", type=int, default=1000)
    parser.add_argument("--charges", type=int, default=5_000_000)
    parser.add_argument("--sample", type=int, default=20)
    args = parser.parse_args()

    from services.reporter.statements import month, statements
    from shared import local_instance
    from shared.db import session_scope

    kept = os.environ.get("OPENACCT_BENCH_DIR")  # a ledger generated once, for the next run to reuse
    with tempfile.TemporaryDirectory() as name, local_instance.stopped_after(Path(kept or name),
                                                                             delete_data=not kept) as bench_dir:
        url = database(bench_dir)
        generate(url, args.projects, args.charges)
        start, end = month("2026-10")
        timings = {}
        for itemized in (False, True):
            began = time.monotonic()
            with session_scope() as s:
                found = statements(s, start, end, itemized=itemized)
            timings[itemized] = time.monotonic() - began
            assert len(found) == args.projects and all(st.balanced for st in found)
        lines = sum(len(st.lines) for st in found)
        sample = [f"p{n}" for n in range(1, args.projects + 1, max(1, args.projects // args.sample))][:args.sample]
        began = time.monotonic()
        for project in sample:
            with session_scope() as s:
                statements(s, start, end, [project], itemized=True)
        one_at_a_time = (time.monotonic() - began) / len(sample)
    per_project = timings[True] / args.projects
    print(f"statements for October, {args.projects} projects, {os.cpu_count()} cores")
    print(f"  summary, all projects at once     {timings[False]:6.2f} s")
    print(f"  itemized, all projects at once    {timings[True]:6.2f} s  ({lines} lines)   "
          f"target <= {TARGET_SECONDS:.0f} s {'PASS' if timings[True] <= TARGET_SECONDS else 'FAIL'}")
    print(f"  one project at a time (baseline)  {one_at_a_time * 1000:6.0f} ms per project, "
          f"{per_project * 1000:.1f} ms per project at once: {one_at_a_time / per_project:.0f}x")


if __name__ == "__main__":
    main()
