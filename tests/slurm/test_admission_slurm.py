"""Admission control on the live Slurm: PrologSlurmctld -> `openacct hook slurm-prologctld` ->
squeue for the job's limit -> `openacct admission serve` -> a hold in the ledger; the charge at
the job's end (jobcomp -> relay -> charger) settles it.

Core-hours cost 0.0123 here: a one-CPU job with a two-minute limit may cost 0.000410 at most.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from decimal import Decimal
from pathlib import Path

import pytest
from sqlalchemy import Engine, select
from sqlalchemy.orm import Session

from shared import db
from shared.models import LedgerTransaction, OpenHold
from tests.pipeline import Process, RedisServer, wait_for
from tests.slurm.harness import Slurm
from tests.slurm.lab import (
    assert_charged_as_sacct_says,
    pipeline_env,
    start_pipeline,
    wait_until_recorded,
)

MOST = Decimal("0.000410")  # 1 CPU x 2 min x 0.0123
POOR = "--account=poor"


@pytest.fixture
def admission(lab: Engine, slurm: Slurm, slurm_spool: Path, tmp_path: Path) -> Iterator[Path]:
    """The decision service on a socket of this test's, PrologSlurmctld hooked to ask it, and a
    project "poor" (root a member) with nothing deposited."""
    from openacct import shortcuts as oa

    with db.session_scope():
        oa.create_project("poor", pi="root")
        oa.grant_service_access(f"{slurm.cluster}-core-hours", project="poor")
    slurm.add_account("poor", ["root"])
    socket_path = tmp_path / "admission.sock"
    server = Process(["admission", "serve"], {**os.environ, "OPENACCT_ADMISSION_SOCKET": str(socket_path)},
                     tmp_path / "admission.log").start()
    wait_for(socket_path.exists, 30, "the admission service's socket")
    slurm.set_hook_env(OPENACCT_ADMISSION_SOCKET=str(socket_path), OPENACCT_ADMISSION_ON_ERROR="open",
                       SLURM_CONF=str(slurm.conf))
    slurm.hook("PrologSlurmctld", "slurm-prologctld")
    slurm.restart_slurmctld()
    try:
        yield socket_path
    finally:
        server.stop()
        slurm.cancel_all()
        slurm.options["PrologSlurmctld"] = None
        slurm.hooks.pop("PrologSlurmctld", None)
        slurm.set_hook_env(OPENACCT_ADMISSION_SOCKET=None, OPENACCT_ADMISSION_ON_ERROR=None, SLURM_CONF=None)
        slurm.restart_slurmctld()


def prolog_runs(slurm: Slurm, job: str) -> list[int]:
    return [r.status for r in slurm.hook_runs("slurm-prologctld") if r.job_id == job]


def holds(engine: Engine, kind: str = "hold") -> list[LedgerTransaction]:
    with Session(engine) as s:
        return list(s.scalars(select(LedgerTransaction).where(LedgerTransaction.kind == kind)
                              .order_by(LedgerTransaction.id)))


def balance(account: str):  # type: ignore[no-untyped-def]
    from openacct import shortcuts as oa

    with db.session_scope():
        return oa.balance(account)


def test_a_job_its_account_cannot_pay_does_not_start_until_money_comes(
    lab: Engine, slurm: Slurm, admission: Path, redis: RedisServer, tmp_path: Path, slurm_spool: Path
) -> None:
    job = slurm.submit(POOR, "-t", "2", "--wrap", "sleep 1")
    wait_for(lambda: prolog_runs(slurm, job), 30, "the prolog to refuse the job")
    assert prolog_runs(slurm, job)[0] == 1
    time.sleep(1)
    info = slurm.scontrol_job(job)
    assert info is not None and info["JobState"] == "PENDING", info
    assert info["Reason"] == "BeginTime"  # Slurm requeued it, to try again a little later
    assert "account poor cannot cover this job: it may cost up to 0.00041 (2 min limit)" in info["AdminComment"]
    assert holds(lab) == [] and balance("poor").held == 0

    from openacct import shortcuts as oa

    with db.session_scope():
        oa.deposit("poor", "1", start="2000-01-01")
    slurm.run("scontrol", "release", job, check=False)  # if Slurm held it; else its requeue delay ends
    slurm.run("scontrol", "update", f"JobId={job}", "StartTime=now", check=False)
    processes = start_pipeline(pipeline_env(redis.url, slurm_spool), tmp_path)
    try:
        [record] = slurm.sacct_jobs([job], timeout=200)
        assert record["State"] == "COMPLETED"
        wait_until_recorded(lab, [record], slurm_spool)
        wait_for(lambda: balance("poor").held == 0, 30, "the charge to settle the hold")
    finally:
        for process in processes:
            process.stop()
    [hold] = holds(lab)
    [release] = holds(lab, "release")
    assert hold.amount == MOST and release.refers_to_id == hold.id
    assert_charged_as_sacct_says(lab, [record])
    with Session(lab) as s:
        assert s.scalars(select(OpenHold)).all() == []


def test_two_jobs_that_together_exceed_the_balance_the_second_waits(
    lab: Engine, slurm: Slurm, admission: Path
) -> None:
    from openacct import shortcuts as oa

    with db.session_scope():
        oa.deposit("poor", "0.0006", start="2000-01-01", credit_limit="0.0001")  # one job's 0.00041, not two
    first = slurm.submit(POOR, "-t", "2", "--wrap", "sleep 30")
    slurm.wait_for_state(first, "RUNNING")
    second = slurm.submit(POOR, "-t", "2", "--wrap", "sleep 1")
    wait_for(lambda: prolog_runs(slurm, second), 30, "the prolog to refuse the second job")
    assert prolog_runs(slurm, first) == [0] and prolog_runs(slurm, second)[0] == 1
    slurm.wait_for_state(second, "PENDING", timeout=10)  # requeued once the prolog said no
    assert slurm.job_state(first) == "RUNNING"
    b = balance("poor")
    assert (b.held, b.available) == (MOST, Decimal("0.00019"))
    assert b.available >= -b.credit_limit
    assert [h.amount for h in holds(lab)] == [MOST]


def test_a_requeued_job_holds_again_for_its_next_run_in_place_of_the_first(
    lab: Engine, slurm: Slurm, admission: Path, redis: RedisServer, tmp_path: Path, slurm_spool: Path
) -> None:
    from openacct import shortcuts as oa

    with db.session_scope():
        oa.deposit("poor", "1", start="2000-01-01")
    script = 'if [ "${SLURM_RESTART_COUNT:-0}" = 0 ]; then sleep 120; else sleep 1; fi'
    job = slurm.submit(POOR, "-t", "2", "--requeue", "--wrap", script)
    processes = start_pipeline(pipeline_env(redis.url, slurm_spool), tmp_path)
    try:
        slurm.wait_for_state(job, "RUNNING")
        assert balance("poor").held == MOST
        slurm.run("scontrol", "requeue", job)

        def runs_again() -> bool:  # past the requeue's delay at once, once Slurm lets it be updated
            slurm.run("scontrol", "update", f"JobId={job}", "StartTime=now", check=False)
            return slurm.job_state(job) in ("RUNNING", "COMPLETED")

        wait_for(runs_again, 60, "the requeued job to run again", interval=1)
        [record] = slurm.sacct_jobs([job], timeout=120)
        assert record["State"] == "COMPLETED"
        wait_until_recorded(lab, [record], slurm_spool)
        wait_for(lambda: balance("poor").held == 0 and len(holds(lab, "release")) == 2, 30,
                 "the next run and its charge to release both holds")
        # Both runs, as sacct says: the one requeued after running for a while, and the last.
        runs = slurm._sacct([job], duplicates=True)
        assert sorted(r["State"].split()[0] for r in runs) == ["COMPLETED", "REQUEUED"]
        wait_until_recorded(lab, runs, slurm_spool)
    finally:
        for process in processes:
            process.stop()
    first, second = holds(lab)
    assert first.amount == second.amount == MOST
    assert sorted(r.refers_to_id for r in holds(lab, "release")) == [first.id, second.id]
    assert prolog_runs(slurm, job) == [0, 0]
    assert_charged_as_sacct_says(lab, runs)
    with Session(lab) as s:
        assert s.scalars(select(OpenHold)).all() == []


def test_the_prolog_fails_open_or_closed_as_configured_when_the_service_is_down(
    lab: Engine, slurm: Slurm, admission: Path
) -> None:
    admission.unlink()  # as good as the service being down: nothing listens there
    slurm.set_hook_env(OPENACCT_ADMISSION_ON_ERROR="closed")
    closed = slurm.submit("--account=lab", "-t", "2", "--wrap", "sleep 1")
    wait_for(lambda: prolog_runs(slurm, closed), 30, "the prolog to run")
    assert prolog_runs(slurm, closed)[0] == 1
    slurm.wait_for_state(closed, "PENDING", timeout=10)
    slurm.set_hook_env(OPENACCT_ADMISSION_ON_ERROR="open")
    opened = slurm.submit("--account=lab", "-t", "2", "--wrap", "sleep 1")
    [record] = slurm.sacct_jobs([opened], timeout=60)
    assert record["State"] == "COMPLETED" and prolog_runs(slurm, opened) == [0]
    assert all(r.seconds < 4 for r in slurm.hook_runs("slurm-prologctld"))  # never hangs
    stderr = (slurm.directory / "hooks" / "slurm-prologctld.stderr").read_text()
    assert "cannot reach the admission service" in stderr
