"""The center the live Slurm tests charge for, and how they tell what each job should cost.

Each job's charge is worked out from Slurm's own record of it (sacct: AllocCPUS and
ElapsedRaw), as the README prices use: core-seconds x the rate / 3600, rounded half up to 6
places once (the quantity the ledger shows is core-hours rounded to 6 places).
"""

from __future__ import annotations

import datetime as dt
import os
import subprocess
from collections.abc import Iterable
from decimal import ROUND_HALF_UP, Decimal
from pathlib import Path

from sqlalchemy import Engine, select
from sqlalchemy.orm import Session

from shared import spool
from shared.models import Account, Job, LedgerTransaction, ParkedEvent, User
from tests.pipeline import OPENACCT, Process, wait_for

RATE = Decimal("0.0123")
SIX_PLACES = Decimal("0.000001")
LAB = "--account=lab"


def pipeline_env(broker_url: str, spool_dir: Path) -> dict[str, str]:
    return {**os.environ, "OPENACCT_BROKER_URL": broker_url, "OPENACCT_SPOOL_DIR": str(spool_dir),
            "OPENACCT_BROKER_VISIBILITY_TIMEOUT": "10"}


def start_pipeline(env: dict[str, str], logs: Path) -> list[Process]:
    return [Process(["worker", "charger", "-c", "1"], env, logs / "worker.log").start(),
            Process(["relay"], env, logs / "relay.log").start()]


def expected_charge(record: dict[str, str]) -> tuple[Decimal, Decimal] | None:
    """(quantity, amount) from sacct's record; None where the job used nothing (never ran)."""
    core_seconds = int(record["AllocCPUS"]) * int(record["ElapsedRaw"])
    if core_seconds == 0:
        return None
    quantity = (Decimal(core_seconds) / 3600).quantize(SIX_PLACES, ROUND_HALF_UP)  # as shown
    return quantity, (core_seconds * RATE / 3600).quantize(SIX_PLACES, ROUND_HALF_UP)  # priced exactly


def ledger_job(s: Session, record: dict[str, str]) -> Job | None:
    submitted = dt.datetime.fromtimestamp(int(record["Submit"]), dt.UTC)
    return s.scalar(select(Job).where(Job.job_id == record["JobIDRaw"], Job.submit_time == submitted))


def charged(engine: Engine, records: Iterable[dict[str, str]]) -> dict[str, list[tuple[Decimal, Decimal]] | None]:
    """Per sacct record (by JobID): the (quantity, amount) of each charge the ledger holds for
    that job, or None when the ledger has not recorded the job at all."""
    found: dict[str, list[tuple[Decimal, Decimal]] | None] = {}
    with Session(engine) as s:
        for record in records:
            job = ledger_job(s, record)
            found[record["JobID"]] = None if job is None else [
                (t.quantity, t.amount) for t in s.scalars(select(LedgerTransaction).where(
                    LedgerTransaction.job_id == job.id, LedgerTransaction.kind == "charge"))]
    return found


def wait_until_recorded(engine: Engine, records: list[dict[str, str]], spool_dir: Path, timeout: float = 60) -> None:
    def done() -> bool:
        return None not in charged(engine, records).values() and spool.backlog(spool_dir)[0] == 0

    try:
        wait_for(done, timeout, "the ledger to record every job", interval=0.25)
    except AssertionError:
        with Session(engine) as s:
            parked = s.scalars(select(ParkedEvent.reason)).all()
        raise AssertionError(f"not every job was recorded; parked: {parked}") from None


def assert_charged_as_sacct_says(engine: Engine, records: list[dict[str, str]]) -> None:
    want = {r["JobID"]: [] if expected_charge(r) is None else [expected_charge(r)] for r in records}
    assert charged(engine, records) == want
    with Session(engine) as s:  # and to whom
        for record in records:
            job = ledger_job(s, record)
            assert job is not None and job.state == record["State"].split()[0]
            assert s.scalar(select(User.name).where(User.id == job.user_id)) == record["User"]
            assert s.scalar(select(Account.name).where(Account.id == job.account_id)) == record["Account"]
    verify = subprocess.run([OPENACCT, "ledger", "verify"], capture_output=True, text=True, timeout=60)
    assert verify.returncode == 0, verify.stdout + verify.stderr
