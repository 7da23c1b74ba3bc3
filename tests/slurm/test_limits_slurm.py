"""Limits mode on the live Slurm, with no PrologSlurmctld: `openacct slurm limits` sets each
account's GrpTRESMins (billing), and Slurm itself (AccountingStorageEnforce=...,limits,safe,
priority/multifactor without decay) keeps a job its account cannot pay from starting.

Core-hours cost 0.0123 here, so a billing minute (one CPU) costs 0.000205: a one-CPU job with a
two-minute limit needs 2 minutes, 0.00041.
"""

from __future__ import annotations

import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy import Engine

from shared import db
from tests.pipeline import OPENACCT, RedisServer, wait_for
from tests.slurm.harness import Slurm
from tests.slurm.lab import assert_charged_as_sacct_says, pipeline_env, start_pipeline, wait_until_recorded

POOR = "--account=poor"
LIMITS_MODE = {"AccountingStorageEnforce": "associations,limits,safe", "PriorityType": "priority/multifactor",
               "PriorityDecayHalfLife": "0", "PriorityUsageResetPeriod": "NONE",
               "PriorityCalcPeriod": "1"}  # minutes: running jobs' usage counted each minute


@pytest.fixture
def limits_mode(lab: Engine, slurm: Slurm, slurm_spool: Path) -> Iterator[dict[str, str]]:
    """slurm.conf in limits mode (restored after), a project "poor" (root a member) with nothing
    deposited, and the environment in which `openacct` runs in limits mode."""
    from openacct import shortcuts as oa

    assert slurm.options.get("PrologSlurmctld") is None  # Slurm alone enforces here
    saved = {option: slurm.options.get(option) for option in LIMITS_MODE}
    with db.session_scope():
        oa.create_project("poor", pi="root")
        oa.grant_service_access(f"{slurm.cluster}-core-hours", project="poor")
    slurm.add_account("poor", ["root"])
    slurm.options.update(LIMITS_MODE)
    slurm.restart_slurmctld()
    try:
        yield {**slurm.env, "OPENACCT_SLURM_LIMITS": "true"}
    finally:
        slurm.cancel_all()
        for account in ("poor", "lab"):  # no limit left behind for the session's other tests
            slurm.run("sacctmgr", "-i", "modify", "account", "where", f"name={account}", f"cluster={slurm.cluster}",
                      "set", "GrpTRESMins=billing=-1", check=False)
        slurm.options.update(saved)
        slurm.restart_slurmctld()


def openacct(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    result = subprocess.run([OPENACCT, *args], env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
    return result


def billing_minutes(slurm: Slurm, account: str) -> tuple[str, int]:
    """(limit, used) of the account's GrpTRESMins billing, as slurmctld has them."""
    out = slurm.run("scontrol", "show", "assoc_mgr", f"accounts={account}", "flags=assoc", "-o").stdout
    [line] = [x for x in out.splitlines() if f" Account={account} UserName= " in x]
    tres = dict(item.split("=", 1) for item in line.split("GrpTRESMins=", 1)[1].split()[0].split(","))
    limit, used = tres["billing"].rstrip(")").split("(")
    return limit, int(used)


def reason(slurm: Slurm, job: str) -> str:
    info = slurm.scontrol_job(job)
    assert info is not None
    return f"{info['JobState']} {info['Reason']}"


def test_a_job_its_account_cannot_pay_waits_for_slurms_limit_until_a_deposit(
    lab: Engine, slurm: Slurm, limits_mode: dict[str, str], redis: RedisServer, tmp_path: Path,
    slurm_spool: Path,
) -> None:
    out = openacct(limits_mode, "slurm", "limits").stdout
    assert "GrpTRESMins=billing=0" in out and billing_minutes(slurm, "poor") == ("0", 0)
    job = slurm.submit(POOR, "-t", "2", "--wrap", "sleep 1")
    wait_for(lambda: reason(slurm, job) == "PENDING AssocGrpBillingMinutes", 30, "Slurm's own limit reason")

    deposit = subprocess.run([OPENACCT, "deposit", "poor", "1", "--start", "2000-01-01"], env=limits_mode,
                             capture_output=True, text=True, timeout=120)
    assert deposit.returncode == 0, deposit.stderr
    assert "poor=4878" in deposit.stderr  # 1 / 0.000205 = 4878.05 minutes, rounded down
    assert billing_minutes(slurm, "poor") == ("4878", 0)
    processes = start_pipeline(pipeline_env(redis.url, slurm_spool), tmp_path)
    try:
        [record] = slurm.sacct_jobs([job], timeout=120)
        assert record["State"] == "COMPLETED"
        wait_until_recorded(lab, [record], slurm_spool)
    finally:
        for process in processes:
            process.stop()
    assert_charged_as_sacct_says(lab, [record])
    # Charged, and counted by Slurm: the limit is what is left, in Slurm's terms.
    openacct(limits_mode, "slurm", "limits")
    limit, used = billing_minutes(slurm, "poor")
    assert int(limit) - used in (4877, 4878)  # the charge took a fraction of a minute's money


def test_two_jobs_that_together_exceed_the_balance_never_both_run(
    lab: Engine, slurm: Slurm, limits_mode: dict[str, str]
) -> None:
    from openacct import shortcuts as oa

    with db.session_scope():
        oa.deposit("poor", "0.0006", start="2000-01-01")  # 2.9 minutes: one 2-minute job, not two
    openacct(limits_mode, "slurm", "limits")
    assert billing_minutes(slurm, "poor") == ("2", 0)
    first = slurm.submit(POOR, "-t", "2", "--wrap", "sleep 115")
    slurm.wait_for_state(first, "RUNNING")
    second = slurm.submit(POOR, "-t", "2", "--wrap", "sleep 1")
    wait_for(lambda: reason(slurm, second) == "PENDING AssocGrpBillingMinutes", 30, "the second job to wait")
    # Runs while the first job runs (whatever of its minutes Slurm has counted as used by then)
    # give its money to nobody else.
    for _ in range(3):
        openacct(limits_mode, "slurm", "limits")
        assert billing_minutes(slurm, "poor")[0] == "2"
        time.sleep(25)
    assert slurm.job_state(first) == "RUNNING" and reason(slurm, second) == "PENDING AssocGrpBillingMinutes"
