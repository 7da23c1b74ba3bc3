"""Real Slurm jobs charged through the real pipeline: jobcomp/script -> `openacct hook
slurm-jobcomp` -> spool -> `openacct relay` -> Redis -> `openacct worker charger` -> ledger.

Each job's charge is worked out from Slurm's own record of it (``tests.slurm.lab``).
"""

from __future__ import annotations

import time
from pathlib import Path

from sqlalchemy import Engine, func, select
from sqlalchemy.orm import Session

from shared import spool
from shared.models import LedgerTransaction
from tests.pipeline import RedisServer, wait_for
from tests.slurm.harness import Slurm
from tests.slurm.lab import (
    LAB,
    assert_charged_as_sacct_says,
    charged,
    expected_charge,
    pipeline_env,
    start_pipeline,
    wait_until_recorded,
)


def test_every_kind_of_job_is_charged_what_slurm_recorded(
    lab: Engine, slurm: Slurm, slurm_spool: Path, redis: RedisServer, tmp_path: Path
) -> None:
    processes = start_pipeline(pipeline_env(redis.url, slurm_spool), tmp_path)
    try:
        # The timeout job first: a one-minute limit is the least Slurm takes; the rest run beside it.
        jobs = {"timeout": slurm.submit(LAB, "-t", "1", "--wrap", "sleep 300")}
        jobs["completed"] = slurm.submit(LAB, "--wrap", "sleep 2")
        jobs["failed"] = slurm.submit(LAB, "--wrap", "sleep 1; exit 3")
        jobs["pending"] = slurm.submit(LAB, "--hold", "--wrap", "sleep 1")
        jobs["running"] = slurm.submit(LAB, "--wrap", "sleep 120")
        jobs["array"] = slurm.submit(LAB, "--array=0-2", "--wrap", "sleep 1")
        jobs["cpus"] = slurm.submit(LAB, "-c", "4", "--wrap", "sleep 2")
        jobs["labuser"] = slurm.submit("--wrap", "sleep 1", user="labuser")  # slurmdbd's default account
        interactive = slurm.srun(LAB, "-n1", "sh", "-c", 'echo "$SLURM_JOB_ID"; sleep 2')
        slurm.scancel(jobs["pending"])
        slurm.wait_for_state(jobs["running"], "RUNNING")
        time.sleep(2)
        slurm.scancel(jobs["running"])
        out, err = interactive.communicate(timeout=60)
        assert interactive.returncode == 0, err
        jobs["srun"] = out.strip()

        records = slurm.sacct_jobs(jobs.values(), timeout=150)
        wait_until_recorded(lab, records, slurm_spool)
    finally:
        for process in processes:
            process.stop()

    kind = {r["JobID"]: k for k, job in jobs.items() for r in records if r["JobID"].split("_")[0] == job}
    state = {kind[r["JobID"]]: r["State"].split()[0] for r in records}
    assert state == {"timeout": "TIMEOUT", "completed": "COMPLETED", "failed": "FAILED",
                     "pending": "CANCELLED", "running": "CANCELLED", "array": "COMPLETED",
                     "cpus": "COMPLETED", "labuser": "COMPLETED", "srun": "COMPLETED"}
    by_kind = {kind[r["JobID"]]: r for r in records}
    assert sum(kind[r["JobID"]] == "array" for r in records) == 3
    assert by_kind["failed"]["ExitCode"] == "3:0"
    assert by_kind["pending"]["ElapsedRaw"] == "0"
    assert by_kind["cpus"]["AllocCPUS"] == "4"  # four CPUs of the node's declared 16, on 2 real cores
    assert int(by_kind["cpus"]["Start"]) < int(by_kind["timeout"]["End"])  # side by side
    assert by_kind["labuser"]["User"] == "labuser" and by_kind["labuser"]["Account"] == "lab"
    assert int(by_kind["timeout"]["ElapsedRaw"]) >= 60

    assert_charged_as_sacct_says(lab, records)
    assert charged(lab, [by_kind["pending"]])[by_kind["pending"]["JobID"]] == []  # recorded, not charged
    with Session(lab) as s:
        total = s.scalar(select(func.sum(LedgerTransaction.amount)).where(LedgerTransaction.kind == "charge"))
    assert total == sum(e[1] for e in map(expected_charge, records) if e is not None)


def test_slurm_keeps_working_with_the_pipeline_down_and_its_jobs_are_charged_once_it_is_back(
    lab: Engine, slurm: Slurm, slurm_spool: Path, tmp_path: Path
) -> None:
    since = time.time()
    redis = RedisServer(tmp_path / "redis")  # not started; nor are the relay and the charger
    jobs = [slurm.submit(LAB, "--wrap", "sleep 1"), slurm.submit(LAB, "-c", "4", "--wrap", "sleep 2"),
            slurm.submit("--wrap", "sleep 1", user="labuser"), slurm.submit(LAB, "--wrap", "sleep 1; exit 2")]
    records = slurm.sacct_jobs(jobs)
    assert [r["State"] for r in records] == ["COMPLETED", "COMPLETED", "COMPLETED", "FAILED"]
    wait_for(lambda: {r.job_id for r in slurm.hook_runs() if r.start >= since} >= set(jobs), 30,
             "the jobcomp hook to run for every job")
    runs = [r for r in slurm.hook_runs() if r.start >= since]
    assert [r.status for r in runs] == [0] * len(jobs)
    assert max(r.seconds for r in runs) < 2
    assert slurm.node()["State"] == "IDLE"  # not DRAIN, not DOWN
    assert slurm.run("sinfo", "-h", "-n", slurm.node_name, "-o", "%T").stdout.strip() == "idle"
    assert spool.backlog(slurm_spool)[0] == len(jobs)  # kept for the pipeline

    redis.start()
    processes = start_pipeline(pipeline_env(redis.url, slurm_spool), tmp_path)
    try:
        wait_until_recorded(lab, records, slurm_spool)
        time.sleep(1)  # room for a repeat to arrive and be dropped
    finally:
        for process in processes:
            process.stop()
        redis.stop()
    assert_charged_as_sacct_says(lab, records)  # one charge per job, none twice
