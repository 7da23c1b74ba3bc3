"""`openacct slurm reconcile` against a real Slurm: jobcomp records that died with slurmctld
(SIGKILL while they were queued behind a slow hook) are found in sacct, published by the
reporter's scheduled task and charged once by the real charger; a second run finds every job
charged. And `openacct slurm sync` against the real sacctmgr.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy import Engine, func, select
from sqlalchemy.orm import Session

from shared import db
from shared.models import LedgerTransaction
from tests.pipeline import OPENACCT, Process, RedisServer, free_port, wait_for
from tests.slurm.harness import Slurm
from tests.slurm.lab import (
    LAB,
    assert_charged_as_sacct_says,
    charged,
    expected_charge,
    pipeline_env,
)

SEND_RECONCILE = """import sys
from shared import signing
from shared.celery_app import get_app
get_app().send_task("reporter.reconcile", queue="reporter", routing_key="reporter", kwargs={
    "message": signing.seal("reporter.reconcile", {"settle": 0, "lookback": int(sys.argv[1])})})
"""
HOOK_DELAY = 8  # seconds the slow jobcomp hook sleeps first, so that records queue up behind it


@contextlib.contextmanager
def slow_jobcomp(slurm: Slurm, directory: Path) -> Iterator[None]:
    """jobcomp/script pointed at a wrapper that sleeps before running the harness's hook; the
    usual hook again afterwards, on a slurmctld started afresh (whatever state it was left in)."""
    usual = slurm.options["JobCompLoc"]
    slow = directory / "slow-jobcomp"
    slow.write_text(f"#!/bin/sh\nsleep {HOOK_DELAY}\nexec {usual}\n")
    slow.chmod(0o755)
    slurm.options["JobCompLoc"] = str(slow)
    slurm.restart_slurmctld()
    try:
        yield
    finally:
        slurm.options["JobCompLoc"] = usual
        if "slurmctld" in slurm.processes:
            slurm.kill_slurmctld(signal.SIGTERM)
        slurm.start_slurmctld()


def relay_once(env: dict[str, str]) -> None:
    """Ship what is spooled and wait until the charger has applied it."""
    result = subprocess.run([OPENACCT, "relay", "--once"], env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr


def reconcile(env: dict[str, str], since: dt.datetime, cluster: str, *extra: str) -> tuple[int, dict]:
    result = subprocess.run([OPENACCT, "slurm", "reconcile", "--since", since.isoformat(), "--cluster", cluster,
                             "--json", *extra], env=env, capture_output=True, text=True, timeout=120)
    assert "Traceback" not in result.stderr, result.stderr
    return result.returncode, json.loads(result.stdout)


def charges(engine: Engine) -> int:
    with Session(engine) as s:
        return s.scalar(select(func.count()).where(LedgerTransaction.kind == "charge"))


def test_jobs_whose_jobcomp_records_died_with_slurmctld_are_charged_once_from_sacct(
    lab: Engine, slurm: Slurm, slurm_spool: Path, redis: RedisServer, tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    env = {**pipeline_env(redis.url, slurm_spool), "PATH": slurm.env["PATH"], "SLURM_CONF": slurm.env["SLURM_CONF"]}
    since = dt.datetime.now(dt.UTC).replace(microsecond=0) - dt.timedelta(seconds=1)
    with slow_jobcomp(slurm, tmp_path):
        jobs = [slurm.submit(LAB, "--wrap", "true"), slurm.submit(LAB, "-c", "2", "--wrap", "sleep 1"),
                slurm.submit(LAB, "--array=0-2", "--wrap", "true"), slurm.submit(LAB, "--wrap", "exit 3"),
                slurm.submit("--wrap", "true", user="labuser")]
        records = slurm.sacct_jobs(jobs)
        time.sleep(6)  # room for slurmctld to save its job state: recovery must not run them again
        hooked_before_kill = {r.job_id for r in slurm.hook_runs() if r.start >= since.timestamp()}
        assert len(hooked_before_kill) < len(records) - 2, "the slow hook kept up: nothing was queued"
        slurm.kill_slurmctld(signal.SIGKILL)
    assert slurm.job_state(jobs[0]) == "COMPLETED"  # slurmctld is back

    charger = Process(["worker", "charger", "-c", "1"], env, tmp_path / "charger.log").start()
    reporter = Process(["worker", "reporter", "-c", "1"], env, tmp_path / "reporter.log").start()
    try:
        time.sleep(2)  # any record slurmctld logs again after recovery arrives now
        relay_once(env)
        recorded = charged(lab, records)
        lost = sorted(job for job, found in recorded.items() if found is None)
        assert len(lost) >= 2, recorded  # the queued records were lost for good

        dry_code, dry = reconcile(env, since, slurm.cluster, "--dry-run")
        assert dry_code == 1 and sorted(j["job"] for j in dry["jobs"] if j["status"] == "missing") == lost
        assert dry["counts"]["matches"] == len(records) - len(lost)

        # The reporter's scheduled run, as beat sends it (but over this test's jobs only, at once).
        lookback = int(time.time() - since.timestamp()) + 1
        send = subprocess.run([sys.executable, "-c", SEND_RECONCILE, str(lookback)], env=env, capture_output=True,
                              text=True, timeout=60)
        assert send.returncode == 0, send.stderr
        wait_for(lambda: None not in charged(lab, records).values(), 60, "the reporter's reconcile to charge them")
        log = (tmp_path / "reporter.log").read_text(errors="replace")
        assert f"matches={len(records) - len(lost)} published={len(lost)} missing=0 differs=0" in log, log
        with capsys.disabled():
            print(f"\nreconcile: {len(records)} jobs, jobcomp ran for {len(hooked_before_kill)} before the "
                  f"SIGKILL, {len(lost)} lost ({', '.join(lost)}), published by the reporter and charged once")

        again_code, again = reconcile(env, since, slurm.cluster)
        assert again_code == 0 and again["jobs"] == [] and again["counts"]["matches"] == len(records), again
    finally:
        reporter.stop()
        charger.stop()
    assert_charged_as_sacct_says(lab, records)  # each job once, as sacct says; ledger verify is clean
    assert charges(lab) == sum(expected_charge(r) is not None for r in records)


def test_reconcile_says_so_in_one_line_when_slurmdbd_cannot_be_reached(slurm: Slurm, tmp_path: Path) -> None:
    conf = tmp_path / "slurm.conf"  # the same cluster, with slurmdbd where nothing listens
    port = slurm.options["AccountingStoragePort"]
    conf.write_text(slurm.conf.read_text().replace(f"AccountingStoragePort={port}", f"AccountingStoragePort={free_port()}"))
    result = subprocess.run([OPENACCT, "slurm", "reconcile", "--since", "2026-01-01"],
                            env={**slurm.env, "SLURM_CONF": str(conf)}, capture_output=True, text=True, timeout=60)
    assert result.returncode == 3, result.stderr
    assert result.stderr.startswith("error: sacct failed (exit 1): ") and "Connection refused" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


def test_sync_makes_the_projects_accounts_with_their_members_and_then_plans_nothing(lab: Engine, slurm: Slurm) -> None:
    from openacct import shortcuts as oa

    with db.session_scope():
        oa.create_project("geo", pi="root", description="Geology")
        oa.add_user_to_project("labuser", "geo")

    def sync(*extra: str) -> subprocess.CompletedProcess[str]:
        result = subprocess.run([OPENACCT, "slurm", "sync", "--cluster", slurm.cluster, *extra], env=slurm.env,
                                capture_output=True, text=True, timeout=120)
        assert result.returncode == 0, result.stderr
        return result

    def associations() -> set[str]:
        return set(slurm.run("sacctmgr", "-nP", "show", "associations", f"cluster={slurm.cluster}",
                             "format=account,user").stdout.split())

    assert "3 sacctmgr commands run" in sync().stdout  # the account, and root and labuser in it
    assert {"geo|", "geo|root", "geo|labuser", "lab|root", "lab|labuser"} <= associations()
    assert "0 sacctmgr commands to run" in sync("--dry-run").stdout

    with db.session_scope():
        oa.remove_user_from_project("labuser", "geo")
    assert "1 sacctmgr commands run" in sync().stdout
    assert "geo|labuser" not in associations() and "geo|root" in associations()
    assert "0 sacctmgr commands to run" in sync("--dry-run").stdout
