"""The benchmarks' own ledger stays a ledger the database accepts.

bench/statements.py (and bench/api.py, which reuses its ledger) writes ten million ledger rows with
set-based SQL, not through the ledger, and no CI run times it: when the database's rules of money
tighten (migration 0018 refused entries written after their transaction), only this test says
that the benchmark broke. It runs the generator, small, on a database of its own.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from sqlalchemy import Engine, text

ROOT = Path(__file__).resolve().parents[1]


def test_the_statements_benchmarks_ledger_is_written_whole(scratch_engine: Engine) -> None:
    url = scratch_engine.url.set(drivername="postgresql").render_as_string(hide_password=False)
    run = subprocess.run(
        [sys.executable, "-c", "import sys; from bench.statements import generate; generate(sys.argv[1], 3, 250)", url],
        cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)}, capture_output=True, text=True, timeout=300,
    )
    assert run.returncode == 0, run.stderr
    with scratch_engine.connect() as conn:
        kinds = dict(conn.execute(text("SELECT kind, count(*) FROM ledger_transactions GROUP BY kind")).all())
        entries = conn.execute(text("SELECT count(*) FROM ledger_entries")).scalar_one()
        misshapen = conn.execute(text("SELECT count(*) FROM ledger_misshapen")).scalar_one()
        charged = conn.execute(text("SELECT sum(charged) FROM account_balances")).scalar_one()
        written = conn.execute(text("SELECT sum(amount) FROM ledger_transactions WHERE kind = 'charge'")).scalar_one()
    assert kinds == {"deposit": 3, "charge": 250}
    assert entries == 253
    assert misshapen == 0
    assert charged == written  # the running totals agree with the journal
