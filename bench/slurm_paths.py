"""Jobs per second a live slurmctld completes and gets into OpenAcct's spool, by charging path.

    .venv/bin/python bench/slurm_paths.py [--jobs 500] [--runs 2] [--paths none,script,elasticsearch]
                                          [--submit sbatch|array] [--cpus 64]

Needs root and Slurm with its elasticsearch plugin (as the live test tier: ``python -m
tests.slurm.harness install``), and ``openacct receive slurm-elasticsearch`` for the third path.
It starts one live single-node Slurm (tests/slurm/harness.py: slurmdbd on the local MariaDB,
slurmctld, slurmd) and, in each run, for each path in turn (interleaved, so that a burst of load
on the machine hits every path alike), submits ``--jobs`` short jobs (``sbatch --wrap true``) at
once and times from the first submission until every job is finished (``squeue`` has none left)
and, where there is accounting, every job's record is in the spool:

- ``none``: ``JobCompType=jobcomp/none``, no accounting at all: the ceiling;
- ``script``: ``JobCompType=jobcomp/script``, ``JobCompLoc`` a wrapper as deploy/slurm ships it
  (``sh`` exporting the spool, then ``exec openacct hook slurm-jobcomp``); slurmctld's one
  jobcomp thread runs it once per job, one after another;
- ``elasticsearch``: ``JobCompType=jobcomp/elasticsearch``, ``JobCompLoc=http://127.0.0.1:PORT/
  <cluster>``, ``openacct receive slurm-elasticsearch --listen 127.0.0.1:PORT``, which fsyncs each
  record into the spool before it answers 201. The plugin's thread POSTs its queue one record at a
  time, every second.

Every path gets the same slurm.conf but for those two lines, the same node (``--cpus`` declared,
so that that many jobs run side by side) and a spool of its own per run. Before each timed burst
one job is run through the path and waited for (the plugin's thread may wait up to 30 s before
its first round). A job is "in the spool" when its record is: the spool's own timestamp of the
last record is the end; squeue is polled every 0.2 s for the jobs. Each path's time is printed
beside the no-accounting run of the same run, with the CPU each part used per job.

``--submit sbatch`` (default) submits independent jobs, 8 sbatch processes at a time; ``array``
submits one ``--array=0-N-1`` (one RPC; slurmctld makes the tasks' records as it starts them, so
that is a different, cheaper workload).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import shlex
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from glob import glob
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

OPENACCT = Path(sys.executable).with_name("openacct")
PATHS = {
    "none": "(a) no accounting (jobcomp/none)",
    "script": "(b) jobcomp/script + openacct hook",
    "elasticsearch": "(c) jobcomp/elasticsearch + openacct receive",
}
# The same for every path: what Slurm's high-throughput guide (doc/html/high_throughput.shtml)
# suggests that this harness can take: completed jobs purged from slurmctld's memory soon, and
# the scheduler run at every submission and completion rather than held back.
TUNING = {
    "MinJobAge": "5",
    "SchedulerParameters": "bf_interval=30,default_queue_depth=1000,partition_job_depth=1000,"
                           "sched_max_job_start=0,batch_sched_delay=0,sched_min_interval=0",
}
SUBMITTERS = 8
POLL = 0.2
TIMEOUT = 900.0
# Acceptance (issue 15): the receiver path at least 5x faster than the hook path, and within 20% of none.
TARGET_VS_HOOK, TARGET_VS_NONE = 5.0, 1.20


@dataclass
class Cpu:
    """CPU seconds: the whole machine (busy), and the daemons we started, from /proc."""

    busy: float = 0.0
    wall: float = 0.0
    procs: dict[str, float] = field(default_factory=dict)

    @staticmethod
    def now(pids: dict[str, int]) -> Cpu:
        tick = os.sysconf("SC_CLK_TCK")
        fields = [int(x) for x in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
        idle = fields[3] + fields[4]  # idle, iowait
        cpu = Cpu(busy=(sum(fields[:8]) - idle) / tick, wall=time.time())
        for name, pid in pids.items():
            try:
                after_name = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            utime, stime, cutime, cstime = (int(x) / tick for x in after_name[11:15])
            cpu.procs[name] = utime + stime
            cpu.procs[f"{name} children"] = cutime + cstime
        times = os.times()  # our own children: sbatch, squeue
        cpu.procs["bench children"] = times.children_user + times.children_system
        return cpu

    def since(self, before: Cpu) -> Cpu:
        return Cpu(self.busy - before.busy, self.wall - before.wall,
                   {k: v - before.procs.get(k, 0.0) for k, v in self.procs.items()})


@dataclass
class Result:
    path: str
    run: int
    seconds: float = 0.0  # first submission -> all finished and spooled
    submitted: float = 0.0  # first submission -> last sbatch returned
    finished: float = 0.0  # first submission -> squeue empty
    first_record: float | None = None
    last_record: float | None = None
    records: int = 0
    completed: int = 0
    after_finish: int = 0  # records spooled after squeue was empty
    cpu: Cpu | None = None
    problems: list[str] = field(default_factory=list)

    def rate(self, jobs: int) -> float:
        return jobs / self.seconds


def spooled(spool_dir: Path) -> list[tuple[int, bytes]]:
    """(ns spooled, event) of every event in a spool: its log (the relay never ran: nothing is
    shipped) and any event that went to a file of its own."""
    from shared import spool

    events: list[tuple[int, bytes]] = []
    for path in [*spool.segments(spool_dir), str(spool_dir / spool.LOG / spool.CURRENT)]:
        try:
            with open(path, "rb") as f:
                events += spool.read_records(f.read())[0]
        except FileNotFoundError:
            pass
    for path in spool.pending(spool_dir, 10**9):
        with open(path, "rb") as f:
            events.append((int(os.path.basename(path).split("-", 1)[0]), f.read()))
    return events


def rejected(spool_dir: Path) -> int:
    return len(glob(str(spool_dir / "reject" / "*.reason")))


class Bench:
    def __init__(self, tmp: Path, args: argparse.Namespace) -> None:
        from tests.pipeline import free_port
        from tests.slurm.harness import Slurm

        self.tmp, self.args = tmp, args
        self.slurm = Slurm(tmp / "slurm", cpus=args.cpus)
        self.slurm.directory.chmod(0o755)
        self.slurm.options.update(TUNING)
        self.slurm.options.update(args.option)
        self.port = free_port()
        self.empty_config = tmp / "openacct.toml"
        self.empty_config.write_text("")
        self.wrapper = tmp / "openacct-jobcomp"
        self.receiver = None
        self.current: str | None = None

    # -- set-up of a path ----------------------------------------------------------------------

    def use(self, path: str, spool_dir: Path) -> None:
        """slurm.conf for ``path``, restarting slurmctld if it changed; the path's spool."""
        self._stop_receiver()
        options = {"none": ("jobcomp/none", None),
                   "script": ("jobcomp/script", str(self.wrapper)),
                   "elasticsearch": ("jobcomp/elasticsearch", f"http://127.0.0.1:{self.port}/{self.slurm.cluster}")}
        self.slurm.options["JobCompType"], self.slurm.options["JobCompLoc"] = options[path]
        if path == "script":
            self._write_wrapper(spool_dir)
        if path == "elasticsearch":
            self._start_receiver(spool_dir)
        if "slurmctld" not in self.slurm.processes:
            self.slurm.start()
        elif path != self.current:
            self.slurm.restart_slurmctld()
        self.current = path

    def _write_wrapper(self, spool_dir: Path) -> None:
        """deploy/slurm/openacct-jobcomp, pointed at this run's spool (no restart needed)."""
        script = ("#!/bin/sh\n"
                  f"OPENACCT_SPOOL_DIR={shlex.quote(str(spool_dir))}\n"
                  f"OPENACCT_DEFAULT_SYSTEM={self.slurm.cluster}\n"
                  f"OPENACCT_CONFIG={shlex.quote(str(self.empty_config))}\n"
                  "export OPENACCT_SPOOL_DIR OPENACCT_DEFAULT_SYSTEM OPENACCT_CONFIG\n"
                  f"exec {shlex.quote(str(OPENACCT))} hook slurm-jobcomp 2>>{shlex.quote(str(self.tmp / 'hook.stderr'))}\n")
        tmp = self.wrapper.with_suffix(".tmp")
        tmp.write_text(script)
        tmp.chmod(0o755)
        os.replace(tmp, self.wrapper)

    def _start_receiver(self, spool_dir: Path) -> None:
        from tests.pipeline import Process, wait_for

        env = {"PATH": os.environ.get("PATH", ""), "OPENACCT_SPOOL_DIR": str(spool_dir),
               "OPENACCT_DEFAULT_SYSTEM": self.slurm.cluster, "OPENACCT_CONFIG": str(self.empty_config)}
        self.receiver = Process(["receive", "slurm-elasticsearch", "--listen", f"127.0.0.1:{self.port}",
                                 "--log-level", "warning"], env, self.tmp / "receiver.log").start()
        wait_for(lambda: _listening(self.port), 30, "the receiver to listen")

    def _stop_receiver(self) -> None:
        if self.receiver is not None:
            self.receiver.stop()
            self.receiver = None

    def stop(self) -> None:
        self._stop_receiver()
        self.slurm.stop()

    def pids(self) -> dict[str, int]:
        pids = {name: p.popen.pid for name, p in self.slurm.processes.items() if p.popen is not None}
        if self.receiver is not None and self.receiver.popen is not None:
            pids["receiver"] = self.receiver.popen.pid
        return pids

    # -- one measurement -------------------------------------------------------------------------

    def submit(self, jobs: int) -> list[str]:
        common = ["--output", "/dev/null", "--wrap", "true"]
        if self.args.submit == "array":
            return [self.slurm.submit(f"--array=0-{jobs - 1}", *common)]
        with ThreadPoolExecutor(SUBMITTERS) as pool:
            return list(pool.map(lambda _: self.slurm.submit(*common), range(jobs)))

    def measure(self, path: str, run: int) -> Result:
        from tests.pipeline import wait_for

        spool_dir = self.tmp / f"spool-{path}-{run}"
        spooling = path != "none"
        self.use(path, spool_dir)
        # Warm up: one job through the whole path (the plugin's thread may first wait 30 s).
        warm = self.slurm.submit("--output", "/dev/null", "--wrap", "true")
        wait_for(lambda: not self.slurm.queue() and (not spooling or len(spooled(spool_dir)) >= 1), 120,
                 f"the warm-up job {warm} through {path}", interval=POLL)
        before = len(spooled(spool_dir)) if spooling else 0
        jobs = self.args.jobs
        result = Result(path, run)
        pids = self.pids()
        cpu_before = Cpu.now(pids)
        t0 = time.time()
        ids = self.submit(jobs)
        result.submitted = time.time() - t0
        finished_at: float | None = None
        deadline = time.monotonic() + TIMEOUT
        while True:
            if finished_at is None and not self.slurm.queue():
                finished_at = time.time()
            all_in = not spooling or len(spooled(spool_dir)) - before >= jobs
            if finished_at is not None and all_in:
                break
            if time.monotonic() > deadline:
                result.problems.append(f"timed out after {TIMEOUT:.0f} s")
                break
            time.sleep(POLL)
        end = time.time()
        result.cpu = Cpu.now(pids).since(cpu_before)
        result.finished = (finished_at or end) - t0
        result.seconds = result.finished
        if spooling:
            events = spooled(spool_dir)[before:]
            result.records = len(events)
            ids_seen = set()
            for _, data in events:
                event = json.loads(data)
                ids_seen.add(str(event.get("array_job_id") or event["job_id"]))
                ids_seen.add(str(event["job_id"]))
            if events:
                times = [ns / 1e9 - t0 for ns, _ in events]
                result.first_record, result.last_record = min(times), max(times)
                result.seconds = max(result.finished, result.last_record)
                result.after_finish = sum(1 for t in times if t > result.finished)
            missing = [j for j in ids if j not in ids_seen]
            if result.records != jobs or missing:
                result.problems.append(f"{result.records} records spooled for {jobs} jobs"
                                       + (f"; none for jobs {', '.join(missing[:5])}" if missing else ""))
            if rejected(spool_dir):
                result.problems.append(f"{rejected(spool_dir)} records rejected into {spool_dir / 'reject'}")
        result.completed = self._completed(ids, t0)
        if result.completed != jobs:
            result.problems.append(f"sacct has {result.completed} of {jobs} jobs COMPLETED")
        return result

    def backlog(self) -> tuple[int, float] | None:
        """The elasticsearch path's own rate, with no job launch to wait for: ``--jobs`` records
        queued in slurmctld while the receiver is down, kept across a graceful restart of
        slurmctld (elasticsearch_state), then POSTed in one round once the receiver is up.
        (records, seconds from the first spooled to the last)."""
        from tests.pipeline import wait_for

        spool_dir = self.tmp / "spool-backlog"
        self.use("elasticsearch", spool_dir)
        self._stop_receiver()
        ids = self.submit(self.args.jobs)
        wait_for(lambda: not self.slurm.queue(), TIMEOUT, "the backlog's jobs to finish", interval=POLL)
        time.sleep(2)  # a round fails on the refused connection: the records stay queued
        self.slurm.kill_slurmctld(signal.SIGTERM)  # saves the queue in StateSaveLocation
        self._start_receiver(spool_dir)
        self.slurm.start_slurmctld()
        wait_for(lambda: len(spooled(spool_dir)) >= len(ids) if self.args.submit == "sbatch" else
                 len(spooled(spool_dir)) >= self.args.jobs, 120, "the backlog to arrive", interval=POLL)
        times = [ns / 1e9 for ns, _ in spooled(spool_dir)]
        return len(times), max(times) - min(times)

    def _completed(self, ids: list[str], t0: float) -> int:
        """How many of the jobs (or array tasks) sacct has COMPLETED: asked by time window, not by
        a list of ids (issue 15: long lists hold slurmdbd)."""
        from tests.pipeline import wait_for

        start = time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime(t0 - 1))
        wanted = set(ids)
        count = [0]

        def settled() -> bool:
            out = self.slurm.run("sacct", "-X", "-n", "-P", "-a", "-S", start, "-E", "now",
                                 "--format=JobIDRaw,JobID,State").stdout
            rows = [line.split("|") for line in out.splitlines() if line]
            count[0] = sum(1 for raw, name, state in rows
                           if (raw in wanted or name.split("_")[0] in wanted) and state == "COMPLETED")
            return count[0] >= self.args.jobs

        try:
            wait_for(settled, 60, "sacct to have every job", interval=1)
        except AssertionError:
            pass
        return count[0]


def _listening(port: int) -> bool:
    import socket

    try:
        socket.create_connection(("127.0.0.1", port), timeout=1).close()
        return True
    except OSError:
        return False


def _elasticsearch_missing() -> str | None:
    if not glob("/usr/lib/*/slurm-wlm/jobcomp_elasticsearch.so") and not glob("/usr/lib*/slurm/jobcomp_elasticsearch.so"):
        return "Slurm's jobcomp/elasticsearch plugin is not installed (Debian: slurm-wlm-elasticsearch-plugin)"
    probe = subprocess.run([str(OPENACCT), "receive", "slurm-elasticsearch", "--help"], capture_output=True)
    if probe.returncode != 0:
        return f"{OPENACCT} has no `receive slurm-elasticsearch` command"
    return None


def machine() -> str:
    model = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                  if line.startswith("model name")), platform.machine())
    mem = int(Path("/proc/meminfo").read_text().split()[1]) / 2**20
    return f"{platform.node()}: {os.cpu_count()} CPUs ({model}), {mem:.0f} GiB, {platform.release()}"


def cpu_line(result: Result, jobs: int) -> str:
    cpu = result.cpu
    assert cpu is not None
    per = lambda seconds: seconds / jobs * 1000  # noqa: E731  (ms per job)
    parts = [f"machine busy {cpu.busy / cpu.wall / (os.cpu_count() or 1):.0%} of {os.cpu_count()} CPUs "
             f"({per(cpu.busy):.1f} ms/job)"]
    names = {"slurmctld": "slurmctld", "slurmctld children": "hooks (slurmctld's children)",
             "slurmd": "slurmd", "slurmdbd": "slurmdbd", "receiver": "receiver",
             "bench children": "sbatch and squeue"}
    for key, label in names.items():
        if cpu.procs.get(key, 0.0) > 0.005 or key in ("slurmctld", "slurmd"):
            parts.append(f"{label} {per(cpu.procs.get(key, 0.0)):.1f}")
    rest = cpu.busy - sum(cpu.procs.get(key, 0.0) for key in names)
    parts.append(f"the rest (slurmstepd, the jobs, anything else on the machine) {per(rest):.1f}")
    return "cpu ms/job: " + ", ".join(parts)


def report(results: list[Result], args: argparse.Namespace, started: dt.datetime, load: str,
           backlog: tuple[int, float] | None) -> int:
    jobs = args.jobs
    print(f"slurmctld jobs/s by charging path: {jobs} jobs "
          f"({'one job array' if args.submit == 'array' else f'independent sbatch, {SUBMITTERS} at a time'}, "
          f"sbatch --wrap true), {args.runs} runs, interleaved")
    print(f"  machine: {machine()}")
    print(f"  date: {started:%Y-%m-%d %H:%M} UTC; load average at start {load}")
    print(f"  command: {shlex.join([sys.executable, *sys.argv])}")
    print(f"  slurm.conf, every path: node of {args.cpus} CPUs, "
          + ", ".join(f"{k}={v}" for k, v in {**TUNING, **args.option}.items()) + "; the rest as tests/slurm/harness.py")
    by_run: dict[int, dict[str, Result]] = {}
    for r in results:
        by_run.setdefault(r.run, {})[r.path] = r
    status = 0
    for run, paths in sorted(by_run.items()):
        base = paths.get("none")
        print(f"  run {run}:")
        for path in PATHS:
            r = paths.get(path)
            if r is None:
                continue
            ratio = f"{r.seconds / base.seconds:5.2f}x the time of (a)" if base else ""
            print(f"    {PATHS[path]:46} {r.seconds:6.1f} s  {r.rate(jobs):6.1f} jobs/s  {ratio}")
            detail = f"submitted in {r.submitted:.1f} s, squeue empty at {r.finished:.1f} s"
            if r.first_record is not None:
                detail += f", records spooled from {r.first_record:.1f} s to {r.last_record:.1f} s"
                if r.after_finish and r.last_record - r.finished > 1:
                    detail += (f"; {r.after_finish} of them after squeue was empty, "
                               f"{r.after_finish / (r.last_record - r.finished):.1f}/s")
            print(f"      {detail}")
            print(f"      {cpu_line(r, jobs)}")
            for problem in r.problems:
                print(f"      PROBLEM: {problem}", file=sys.stdout)
                status = 2
        hook, receiver = paths.get("script"), paths.get("elasticsearch")
        if hook and receiver and base:
            vs_hook, vs_none = hook.seconds / receiver.seconds, receiver.seconds / base.seconds
            ok = vs_hook >= TARGET_VS_HOOK and vs_none <= TARGET_VS_NONE
            print(f"    acceptance: receiver {vs_hook:.2f}x faster than the hook (>= {TARGET_VS_HOOK:.0f}x), "
                  f"{(vs_none - 1) * 100:+.0f}% of no accounting's time (<= +{(TARGET_VS_NONE - 1) * 100:.0f}%): "
                  f"{'PASS' if ok else 'FAIL'}")
            if not ok and status == 0:
                status = 1
    if args.runs > 1:
        print("  median over runs:")
        for path in PATHS:
            times = [r.seconds for r in results if r.path == path]
            if times:
                print(f"    {PATHS[path]:46} {statistics.median(times):6.1f} s  "
                      f"{jobs / statistics.median(times):6.1f} jobs/s  (runs: {', '.join(f'{t:.1f}' for t in times)} s)")
    if backlog is not None:
        records, seconds = backlog
        print(f"  (c)'s own rate, no job launch to wait for: {records} records queued in slurmctld while the "
              f"receiver was down, then spooled in {seconds:.2f} s (first to last) = {(records - 1) / seconds:.0f} records/s")
    if status == 2:
        print("  a path did not do its job (see PROBLEM): its figures mean nothing", file=sys.stderr)
    return status


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=500, help="jobs per burst (default 500)")
    parser.add_argument("--runs", type=int, default=2, help="bursts per path, interleaved (default 2)")
    parser.add_argument("--paths", default=",".join(PATHS), help=f"comma-separated, of {', '.join(PATHS)}")
    parser.add_argument("--submit", choices=("sbatch", "array"), default="sbatch",
                        help="independent jobs (default) or one job array")
    parser.add_argument("--cpus", type=int, default=64, help="CPUs the node declares (default 64)")
    parser.add_argument("--slurm-option", dest="option", action="append", default=[], metavar="KEY=VALUE",
                        help="a slurm.conf line for every path (repeat; e.g. JobAcctGatherType=jobacct_gather/none)")
    parser.add_argument("--no-backlog", action="store_true",
                        help="skip the elasticsearch path's backlog drain (about a minute more)")
    args = parser.parse_args()
    try:
        args.option = dict(o.split("=", 1) for o in args.option)
    except ValueError:
        parser.error("--slurm-option takes KEY=VALUE")
    if {"JobCompType", "JobCompLoc"} & set(args.option):
        parser.error("JobCompType and JobCompLoc are what the paths set")
    paths = [p for p in args.paths.split(",") if p]
    if unknown := [p for p in paths if p not in PATHS]:
        parser.error(f"unknown path {', '.join(unknown)}: choose from {', '.join(PATHS)}")
    from tests.slurm.harness import unavailable

    if (reason := unavailable()) is not None:
        print(f"no live Slurm here: {reason}", file=sys.stderr)
        return 2
    if "elasticsearch" in paths and (reason := _elasticsearch_missing()) is not None:
        print(f"cannot measure the elasticsearch path: {reason} (leave it out with --paths none,script)",
              file=sys.stderr)
        return 2

    started = dt.datetime.now(dt.UTC)
    load = " ".join(Path("/proc/loadavg").read_text().split()[:3])
    results: list[Result] = []
    backlog = None
    with tempfile.TemporaryDirectory(prefix="openacct-bench-slurm-") as tmp_name:
        tmp = Path(tmp_name)
        tmp.chmod(0o755)
        bench = Bench(tmp, args)
        try:
            for run in range(1, args.runs + 1):
                for path in paths:
                    result = bench.measure(path, run)
                    results.append(result)
                    print(f"  [run {run} {path}: {result.seconds:.1f} s]", file=sys.stderr, flush=True)
            if "elasticsearch" in paths and not args.no_backlog:
                backlog = bench.backlog()
        finally:
            bench.stop()
    return report(results, args, started, load, backlog)


if __name__ == "__main__":
    sys.exit(main())
