"""How long PrologSlurmctld's admission check takes, process start included, against p99 <= 100 ms.

    .venv/bin/python bench/admission.py [--runs N] [--jobs N]

Needs root and Slurm (as the live test tier: ``python -m tests.slurm.harness install``). It starts
a live single-node Slurm, a scratch database (on OPENACCT_DATABASE_URL's server, else embedded) and
``openacct admission serve``, then times, interleaved so that all see the same load:
- the bare interpreter (``python -c pass``), the floor of any hook;
- ``openacct hook slurm-prologctld`` without admission control (it only spools job.started);
- the same with admission control: squeue for a real running job, the service's decision and a
  new hold in the ledger each run (every run is a new restart of the job, so none is a replay).
Then it hooks the prolog into slurmctld, runs ``--jobs`` real jobs and reads the prolog's time as
slurmctld waited for it (the harness's wrapper stamps each run).
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
from bench.hook import percentile, timed  # noqa: E402
from bench.ingest import scratch_database, use_database  # noqa: E402

OPENACCT = Path(sys.executable).with_name("openacct")
TARGET_P99_MS = 100.0
WARMUP = 5


def prepare(url: str, cluster: str) -> None:
    from openacct import shortcuts as oa
    from shared import db

    use_database(url)
    with db.session_scope():
        system = oa.create_system(cluster)
        service = oa.create_service(f"{cluster}-core-hours", system=system, units="core-hours", charge_rate="0.01")
        oa.create_user("root")
        oa.create_project("lab", pi="root")
        oa.grant_service_access(service, project="lab")
        oa.deposit("lab", "1000000", start="2000-01-01")


def series(name: str, samples: list[float], floor: float) -> str:
    p50, p99 = percentile(samples, 50), percentile(samples, 99)
    return f"  {name:52} p50 {p50:6.1f} ms ({p50 / floor:4.1f}x bare)   p99 {p99:6.1f} ms"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=200, help="timed runs per series (default 200)")
    parser.add_argument("--jobs", type=int, default=40, help="real jobs through slurmctld (default 40)")
    args = parser.parse_args()
    from tests.pipeline import Process, wait_for
    from tests.slurm.harness import Slurm, unavailable

    if (reason := unavailable()) is not None:
        print(f"no live Slurm here: {reason}", file=sys.stderr)
        return 2
    from shared import local_instance

    with tempfile.TemporaryDirectory(prefix="openacct-bench-admission-") as tmp_name, \
            local_instance.stopped_after(Path(tmp_name)) as tmp:
        tmp.chmod(0o755)
        slurm = Slurm(tmp / "slurm")
        slurm.directory.chmod(0o755)
        prepare(scratch_database(tmp), slurm.cluster)
        socket_path = tmp / "admission.sock"
        server = Process(["admission", "serve", "--loglevel", "warning"],
                         {**os.environ, "OPENACCT_ADMISSION_SOCKET": str(socket_path)}, tmp / "admission.log")
        try:
            slurm.start()
            slurm.add_account("lab", ["root"])
            server.start()
            wait_for(socket_path.exists, 30, "the admission service")
            job = slurm.submit("--account=lab", "-t", "10", "--wrap", "sleep 600")
            slurm.wait_for_state(job, "RUNNING")
            env = {**slurm.hook_env, "SLURM_CONF": str(slurm.conf), "SLURM_JOB_ID": job, "SLURM_JOB_USER": "root",
                   "SLURM_JOB_ACCOUNT": "lab", "SLURM_JOB_PARTITION": "debug", "SLURM_JOB_NUM_NODES": "1",
                   "SLURM_JOB_CPUS_PER_NODE": "1", "SLURM_JOB_NODELIST": slurm.node_name,
                   "SLURM_CLUSTER_NAME": slurm.cluster}
            admitted = {**env, "OPENACCT_ADMISSION_SOCKET": str(socket_path)}
            prolog = [str(OPENACCT), "hook", "slurm-prologctld"]
            squeue = ["/usr/bin/squeue", "-h", "-j", job, "-o", "%l|%V|%q|%b"]
            times: dict[str, list[float]] = {"bare": [], "plain": [], "squeue": [], "decision": [], "admission": []}
            for i in range(WARMUP + args.runs):
                sample = {"bare": timed([sys.executable, "-c", "pass"], env), "plain": timed(prolog, env),
                          "squeue": timed(squeue, slurm.env),
                          "decision": _decision(socket_path, slurm.cluster, job, 100_000 + i),
                          "admission": timed(prolog, {**admitted, "SLURM_JOB_RESTART_COUNT": str(i)})}
                if i >= WARMUP:
                    for name, ms in sample.items():
                        times[name].append(ms)
            holds = _count_holds()
            slurm.scancel(job)

            slurm.set_hook_env(OPENACCT_ADMISSION_SOCKET=str(socket_path), SLURM_CONF=str(slurm.conf))
            slurm.hook("PrologSlurmctld", "slurm-prologctld")
            slurm.restart_slurmctld()
            jobs = []
            for _ in range(args.jobs):  # one at a time: each prolog's own latency
                jobs.append(slurm.submit("--account=lab", "-t", "2", "--wrap", "true"))
                wait_for(lambda: jobs[-1] in {r.job_id for r in slurm.hook_runs("slurm-prologctld")}, 30,
                         "the prolog to run")
            burst = [slurm.submit("--account=lab", "-t", "2", "--wrap", "true") for _ in range(args.jobs)]
            records = slurm.sacct_jobs(jobs + burst, timeout=300)
            runs = [r for r in slurm.hook_runs("slurm-prologctld") if r.job_id in set(jobs)]
            burst_runs = [r for r in slurm.hook_runs("slurm-prologctld") if r.job_id in set(burst)]
        finally:
            server.stop()
            slurm.stop()

    floor = percentile(times["bare"], 50)
    print(f"PrologSlurmctld admission check: {args.runs} runs per series, {sys.executable}")
    print(series("bare interpreter (python -c pass)", times["bare"], floor))
    print(series("prolog, no admission control (spools job.started)", times["plain"], floor))
    print(series("squeue for the job's limit, alone", times["squeue"], floor))
    print(series("the service's decision and hold, alone (socket)", times["decision"], floor))
    print(series("prolog with admission (squeue + decision + hold)", times["admission"], floor))
    wall = [r.seconds * 1000 for r in runs]
    print(series(f"the same, seen by slurmctld, {len(runs)} real jobs one by one", wall, floor))
    print(series(f"  {len(burst_runs)} jobs of one account at once (holds queue on it)",
                 [r.seconds * 1000 for r in burst_runs], floor))
    ok = percentile(times["admission"], 99) <= TARGET_P99_MS and percentile(wall, 99) <= TARGET_P99_MS
    print(f"  target: p99 <= {TARGET_P99_MS:.0f} ms   {'PASS' if ok else 'FAIL'}")
    completed = sum(r["State"] == "COMPLETED" for r in records)
    jobs += burst
    runs += burst_runs
    print(f"  holds placed by the timed runs: {holds} of {2 * (WARMUP + args.runs)}; real jobs completed: "
          f"{completed} of {len(jobs)}, each admitted: {all(r.status == 0 for r in runs) and len(runs) == len(jobs)}")
    if holds != 2 * (WARMUP + args.runs) or completed != len(jobs):
        print("  the check did not do its job: the timings above mean nothing", file=sys.stderr)
        return 2
    return 0 if ok else 1


def _decision(path: Path, cluster: str, job: str, restart: int) -> float:
    """One request straight to the service, timed from connect to answer."""
    import json
    import socket

    now = time.strftime("%Y-%m-%dT%H:%M:%S+00:00", time.gmtime())
    request = {"system": cluster, "job_id": job, "submit_time": now, "start_time": now, "user": "root",
               "account": "lab", "cpus": 1, "nodes": 1, "time_limit_minutes": 10, "restart_count": restart}
    start = time.perf_counter()
    with socket.socket(socket.AF_UNIX) as conn:
        conn.connect(str(path))
        conn.sendall(json.dumps(request).encode() + b"\n")
        reply = conn.makefile("rb").readline()
    elapsed = (time.perf_counter() - start) * 1000
    if not reply.startswith(b"admit\t"):
        raise SystemExit(f"the service refused the benchmark's job: {reply}")
    return elapsed


def _count_holds() -> int:
    from sqlalchemy import func, select

    from shared import db
    from shared.models import LedgerTransaction

    with db.session_scope() as s:
        return s.scalar(select(func.count()).where(LedgerTransaction.kind == "hold")) or 0


if __name__ == "__main__":
    sys.exit(main())
