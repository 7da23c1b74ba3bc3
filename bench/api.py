"""API benchmark: latency of GET /api/v1/projects for a user of 10 projects over a large ledger.

Reuses the center and the 10-million-row ledger of bench/statements.py (1,000 projects, 5 million
charges and their entries; generated once per database and kept), adds a user ``bench-user`` as a
member of 10 of its projects (kept too), gives it a read token (``openacct token create``, revoked
at the end), starts a real ``openacct api serve`` on a free port and times N sequential requests
on one keep-alive connection, after a warm-up. Beside it, in the same run and interleaved so that
each series sees the same load:
- GET /api/v1/me on the same connection: authentication and one user row, the floor of the stack;
- the naive design a reader might pick: each project's balance summed from the journal per
  request (the caller's projects, then ``SELECT sum(amount) ... FROM ledger_entries`` per
  project), timed directly against the database, with no HTTP, authentication or JSON at all.
Every response is checked (200, the same size) and the last one read: the 10 projects and each
balance equal to what the journal sums to.

    .venv/bin/python bench/api.py [--requests 500] [--naive 50] [--warmup 50]

Uses OPENACCT_DATABASE_URL's server (database openacct_bench_statements) or an embedded PostgreSQL.
"""

from __future__ import annotations

import argparse
import http.client
import json
import math
import os
import subprocess
import sys
import tempfile
import time
import urllib.request
from decimal import Decimal
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from bench.statements import database, generate  # noqa: E402

OPENACCT = Path(sys.executable).with_name("openacct")
USER = "bench-user"
MEMBER_OF = 10
BUCKETS = ("allocated", "charged", "refunded", "held")
PROJECTS = ("SELECT p.id, p.name FROM projects p WHERE p.pi_id = %(user)s OR EXISTS (SELECT 1 FROM "
            "project_members m WHERE m.project_id = p.id AND m.user_id = %(user)s) ORDER BY p.name")
# The textbook balance: the journal summed, over the allocations in force (and what none covers).
JOURNAL = ("SELECT " + ", ".join(f"coalesce(sum(e.amount) FILTER (WHERE e.bucket = '{b}'), 0)" for b in BUCKETS)
           + " FROM ledger_entries e LEFT JOIN allocations a ON a.id = e.allocation_id"
           " WHERE e.account_id IN (SELECT id FROM accounts WHERE project_id = %s)"
           " AND (e.allocation_id IS NULL OR (a.starts_at <= now() AND (a.ends_at IS NULL OR a.ends_at > now())))")


def percentile(samples: list[float], p: float) -> float:
    ordered = sorted(samples)
    return ordered[max(0, math.ceil(p / 100 * len(ordered)) - 1)]


def running_totals(url: str) -> None:
    """A ledger generated before migration 0011 has no running totals (the trigger that adds them
    up did not exist): add them up once, as the trigger would have. Needs a superuser login."""
    import psycopg

    with psycopg.connect(url, autocommit=True) as conn:
        if conn.execute("SELECT EXISTS (SELECT 1 FROM account_balances)").fetchone()[0]:
            return
        began = time.monotonic()
        conn.execute(
            "INSERT INTO account_balances (account_id, allocation_id, allocated, charged, refunded, held) "
            "SELECT account_id, allocation_id, " + ", ".join(
                f"coalesce(sum(amount) FILTER (WHERE bucket = '{b}'), 0)" for b in BUCKETS)
            + " FROM ledger_entries GROUP BY account_id, allocation_id ORDER BY account_id, allocation_id")
        conn.execute("ANALYZE account_balances")
        print(f"  added up the running totals the ledger's trigger had not ({time.monotonic() - began:.0f} s)")


def member_of(projects: int) -> list[str]:
    """``bench-user`` a member of 10 projects spread over the center, made once and kept."""
    from openacct import shortcuts as sc
    from shared.db import session_scope
    from shared.models import User

    chosen = [f"p{1 + k * (projects // MEMBER_OF)}" for k in range(MEMBER_OF)]
    with session_scope() as s:
        user = s.query(User).filter_by(name=USER).one_or_none() or sc.create_user(USER, full_name="bench/api.py")
        for name in chosen:
            if not sc.is_member(sc.get_project(name), user):
                sc.add_user_to_project(user, name, actor="bench/api.py")
    return chosen


def new_token() -> str:
    made = subprocess.run([str(OPENACCT), "token", "create", USER, "--label", "bench/api.py"],
                          capture_output=True, text=True, check=True)
    return made.stdout.strip().splitlines()[-1]


def revoke(token: str) -> None:
    from openacct.api import tokens
    from shared.db import session_scope

    with session_scope() as s:
        row = tokens.find(s, token)
        if row is not None:
            tokens.revoke(s, row.id)


def free_port() -> int:
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def serve(port: int, log: Path) -> subprocess.Popen[bytes]:
    with log.open("wb") as out:
        server = subprocess.Popen([str(OPENACCT), "api", "serve", "--listen", f"127.0.0.1:{port}",
                                   "--log-level", "warning"], stdout=out, stderr=subprocess.STDOUT,
                                  stdin=subprocess.DEVNULL)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise SystemExit(f"openacct api serve exited: {log.read_text()[-2000:]}")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/api/v1/openapi.json", timeout=2) as answer:
                if answer.status == 200:
                    return server
        except OSError:
            time.sleep(0.2)
    stop(server)
    raise SystemExit(f"openacct api serve did not answer in 60 s: {log.read_text()[-2000:]}")


def stop(server: subprocess.Popen[bytes]) -> None:
    server.terminate()
    try:
        server.wait(10)
    except subprocess.TimeoutExpired:
        server.kill()
        server.wait()


class Client:
    """Sequential requests on one keep-alive connection; each timed until its body is read."""

    def __init__(self, port: int, token: str) -> None:
        self.conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
        self.headers = {"Authorization": f"Bearer {token}", "Accept": "application/json"}
        self.sizes: dict[str, set[int]] = {}
        self.last: dict[str, bytes] = {}

    def get(self, path: str) -> float:
        began = time.perf_counter()
        self.conn.request("GET", path, headers=self.headers)
        answer = self.conn.getresponse()
        body = answer.read()
        ms = (time.perf_counter() - began) * 1000
        if answer.status != 200:
            raise SystemExit(f"GET {path}: {answer.status} {body[:500]!r}: the timings would mean nothing")
        self.sizes.setdefault(path, set()).add(len(body))
        self.last[path] = body
        return ms


def naive(conn: object, user_id: int) -> tuple[float, dict[str, tuple[Decimal, ...]]]:
    began = time.perf_counter()
    found = {name: conn.execute(JOURNAL, (pid,)).fetchone()  # type: ignore[attr-defined]
             for pid, name in conn.execute(PROJECTS, {"user": user_id}).fetchall()}  # type: ignore[attr-defined]
    return (time.perf_counter() - began) * 1000, found


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=500, help="timed requests of each kind (default 500)")
    parser.add_argument("--naive", type=int, default=50, help="timed journal-summing requests (default 50)")
    parser.add_argument("--warmup", type=int, default=50, help="untimed requests first (default 50)")
    parser.add_argument("--projects", type=int, default=1000, help="as bench/statements.py")
    parser.add_argument("--charges", type=int, default=5_000_000, help="as bench/statements.py")
    args = parser.parse_args()

    import psycopg

    from shared import local_instance

    kept = os.environ.get("OPENACCT_BENCH_DIR")  # as bench/statements.py: a ledger kept for the next run
    with tempfile.TemporaryDirectory() as name, local_instance.stopped_after(Path(kept or name),
                                                                             delete_data=not kept) as bench_dir:
        url = database(bench_dir)
        generate(url, args.projects, args.charges)  # upgrades the schema to head first
        running_totals(url)
        chosen = member_of(args.projects)
        token = new_token()
        port = free_port()
        server = serve(port, Path(name) / "api.log")
        times: dict[str, list[float]] = {"projects": [], "me": [], "naive": []}
        try:
            client = Client(port, token)
            with psycopg.connect(url, autocommit=True) as conn:
                user_id = conn.execute("SELECT id FROM users WHERE name = %s", (USER,)).fetchone()[0]
                for _ in range(args.warmup):
                    client.get("/api/v1/projects")
                    client.get("/api/v1/me")
                for _ in range(max(1, args.warmup // 10)):
                    naive(conn, user_id)
                every = max(1, args.requests // max(1, args.naive))
                for i in range(args.requests):  # interleaved: a burst of load hits every series alike
                    times["projects"].append(client.get("/api/v1/projects"))
                    times["me"].append(client.get("/api/v1/me"))
                    if i % every == 0 and len(times["naive"]) < args.naive:
                        ms, journal = naive(conn, user_id)
                        times["naive"].append(ms)
            client.conn.close()
        finally:
            stop(server)
            revoke(token)

    answered = json.loads(client.last["/api/v1/projects"])
    assert sorted(p["name"] for p in answered) == sorted(chosen), answered
    assert sorted(journal) == sorted(chosen), journal
    for p in answered:
        summed = dict(zip(BUCKETS, journal[p["name"]], strict=True))
        assert all(Decimal(p[b]) == summed[b] for b in BUCKETS), (p, summed)
        assert Decimal(p["charged"]) > 0 and Decimal(p["available"]) == (
            summed["allocated"] - summed["charged"] + summed["refunded"] - summed["held"]), p
        assert p["expires_at"] is not None, p
    assert len(client.sizes["/api/v1/projects"]) == 1, client.sizes  # every response alike
    size = client.sizes["/api/v1/projects"].pop()

    def line(label: str, ms: list[float]) -> str:
        return (f"  {label:52} p50 {percentile(ms, 50):6.1f} ms   p99 {percentile(ms, 99):6.1f} ms   "
                f"mean {sum(ms) / len(ms):6.1f} ms   ({len(ms)})")

    p50 = percentile(times["projects"], 50)
    print(f"GET /api/v1/projects, {USER} a member of {MEMBER_OF} of {args.projects} projects, ledger of "
          f"{2 * args.charges + args.projects} rows, one keep-alive connection, {os.cpu_count()} cores, "
          f"load average {os.getloadavg()[0]:.2f}")
    print(line("GET /api/v1/projects", times["projects"]) + f"   {size} bytes, {len(answered)} projects, "
          "balances equal to the journal's")
    print(line("GET /api/v1/me (auth and one row: the stack's floor)", times["me"])
          + f"   projects = {p50 / percentile(times['me'], 50):.1f}x")
    print(line("balances summed from the journal, DB only (naive)", times["naive"])
          + f"   = {percentile(times['naive'], 50) / p50:.1f}x projects")
    return 0


if __name__ == "__main__":
    sys.exit(main())
