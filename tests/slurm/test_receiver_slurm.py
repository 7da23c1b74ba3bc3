"""Real Slurm jobs reported through Slurm's jobcomp/elasticsearch plugin: slurmctld -> `openacct
receive slurm-elasticsearch` -> spool -> relay -> Redis -> charger -> ledger, with no process per
job. slurmctld runs in a zone other than UTC here, so that a receiver reading the plugin's times
in the wrong zone would give other event ids than sacct's records and fail these tests."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy import Engine

from shared import spool
from tests.pipeline import Process, RedisServer, free_port, wait_for
from tests.slurm.harness import Slurm
from tests.slurm.lab import (
    LAB,
    assert_charged_as_sacct_says,
    pipeline_env,
    start_pipeline,
    wait_until_recorded,
)

# The plugin's first round may wait INDEX_RETRY_INTERVAL (30 s) after slurmctld starts, and a
# record it could not deliver is sent again 30 s later (jobcomp_elasticsearch.c).
ROUND = 30


class Receiver:
    def __init__(self, env: dict[str, str], logs: Path) -> None:
        self.port = free_port()
        self.process = Process(["receive", "slurm-elasticsearch", "--listen", f"127.0.0.1:{self.port}"],
                               env, logs / f"receiver-{self.port}.log")

    def start(self) -> Receiver:
        self.process.start()
        wait_for(lambda: "listening" in self.process.log.read_text(), 20, "the receiver to listen")
        return self


@pytest.fixture
def elasticsearch(slurm: Slurm, slurm_spool: Path, tmp_path: Path) -> Iterator[Receiver]:
    """slurmctld with JobCompType=jobcomp/elasticsearch pointed at a receiver (not yet started)
    spooling into this test's spool; jobcomp/script again afterwards."""
    # The receiver needs no broker; the configuration must name one all the same.
    receiver = Receiver(pipeline_env("redis://127.0.0.1:1/0", slurm_spool), tmp_path)
    saved = {k: slurm.options.get(k) for k in ("JobCompType", "JobCompLoc", "DebugFlags")}
    slurm.options.update(JobCompType="jobcomp/elasticsearch", DebugFlags="Elasticsearch",
                         JobCompLoc=f"http://127.0.0.1:{receiver.port}/{slurm.cluster}")
    slurm.daemon_tz = "Asia/Kolkata"  # UTC+05:30: the plugin's times are UTC whatever slurmctld's zone
    slurm.restart_slurmctld()
    try:
        yield receiver
    finally:
        receiver.process.stop()
        slurm.cancel_all()
        slurm.options.update(saved)
        slurm.daemon_tz = "UTC"
        slurm.restart_slurmctld()


def test_every_kind_of_job_reported_by_the_plugin_is_charged_what_slurm_recorded(
    lab: Engine, slurm: Slurm, elasticsearch: Receiver, slurm_spool: Path, redis: RedisServer, tmp_path: Path
) -> None:
    elasticsearch.start()
    processes = start_pipeline(pipeline_env(redis.url, slurm_spool), tmp_path)
    try:
        jobs = {"completed": slurm.submit(LAB, "--wrap", "sleep 2"),
                "failed": slurm.submit(LAB, "--wrap", "sleep 1; exit 3"),
                "cpus": slurm.submit(LAB, "-c", "4", "--wrap", "sleep 2"),
                "array": slurm.submit(LAB, "--array=0-2", "--wrap", "sleep 1"),
                "pending": slurm.submit(LAB, "--hold", "--wrap", "sleep 1"),
                "running": slurm.submit(LAB, "--wrap", "sleep 120"),
                "labuser": slurm.submit("--wrap", "sleep 1", user="labuser")}
        slurm.scancel(jobs["pending"])
        slurm.wait_for_state(jobs["running"], "RUNNING")
        time.sleep(2)
        slurm.scancel(jobs["running"])
        records = slurm.sacct_jobs(jobs.values(), timeout=150)
        wait_until_recorded(lab, records, slurm_spool, timeout=2 * ROUND + 30)
        time.sleep(1)
    finally:
        for process in processes:
            process.stop()
    states = sorted(r["State"].split()[0] for r in records)
    assert states == ["CANCELLED"] * 2 + ["COMPLETED"] * 6 + ["FAILED"]
    assert_charged_as_sacct_says(lab, records)  # and `openacct ledger verify` is clean
    assert "script" not in (tmp_path / f"receiver-{elasticsearch.port}.log").read_text()


def test_jobs_that_end_while_the_receiver_is_down_are_charged_once_when_it_is_back(
    lab: Engine, slurm: Slurm, elasticsearch: Receiver, slurm_spool: Path, redis: RedisServer, tmp_path: Path
) -> None:
    processes = start_pipeline(pipeline_env(redis.url, slurm_spool), tmp_path)
    try:
        jobs = [slurm.submit(LAB, "--wrap", "sleep 1"), slurm.submit(LAB, "-c", "2", "--wrap", "sleep 1"),
                slurm.submit("--wrap", "true", user="labuser")]
        records = slurm.sacct_jobs(jobs)  # ended, and nobody listening for their records
        time.sleep(3)  # the plugin has tried (refused connections) and will try again in 30 s
        assert spool.backlog(slurm_spool)[0] == 0
        elasticsearch.start()
        wait_until_recorded(lab, records, slurm_spool, timeout=2 * ROUND + 30)
        time.sleep(1)
    finally:
        for process in processes:
            process.stop()
    assert_charged_as_sacct_says(lab, records)  # each once

