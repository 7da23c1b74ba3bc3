"""A real single-node Slurm 22.05 (slurmdbd on the local MariaDB, slurmctld, slurmd) for tests.

Everything lives under one directory of the session's: slurm.conf, slurmdbd.conf, state, spool,
logs, pid files, the hook wrappers, and a munged of our own (its own socket, the machine's key),
so that two sessions side by side do not stop each other's munged. Every user who submits must be
able to read slurm.conf: give a directory they can traverse (tests/slurm/conftest.py makes one
under /tmp, mode 0755). The daemons run in the foreground (``-D``) as our own children, so they
are stopped by the pids we started and reaped, never looked up by name. slurmdbd keeps its
records in a MariaDB database of this run's (``openacct_slurm_<pid>_<hex>``, dropped at stop;
one left by a run that died is dropped by the next).

    slurm = Slurm(directory)            # cluster "oalab", one node declaring 16 CPUs
    slurm.start()                       # munged (our own socket), slurmdbd, slurmctld, slurmd
    job = slurm.submit("--account=lab", "--wrap", "sleep 1")        # job id (sbatch --parsable)
    job = slurm.submit("--wrap", "true", user="labuser")            # as another user (created)
    proc = slurm.srun("--account=lab", "sleep", "1")                # a Popen: .communicate()
    slurm.wait_for_state(job, "RUNNING")                            # scontrol, else sacct
    slurm.scontrol_job(job)             # `scontrol show job -o` as a dict (None once purged)
    slurm.sacct_jobs([job])             # sacct -X records, waited for until final; times in epoch s
    slurm.scancel(job); slurm.cancel_all()
    slurm.node()                        # `scontrol show node -o` as a dict (State=IDLE, ...)
    slurm.add_account("lab", ["root", "labuser"])                   # sacctmgr -i
    slurm.hook_runs("slurm-jobcomp")    # each hook run: job id, start, end (epoch s), exit status
    slurm.log("slurmctld", since=offset); slurm.log_size("slurmctld")
    slurm.kill_slurmctld(signal.SIGKILL); slurm.start_slurmctld()
    slurm.stop()                        # cancels jobs, SIGTERM (then SIGKILL), drops the database

Client commands get ``slurm.env`` (the current environment plus SLURM_CONF and
SLURM_TIME_FORMAT=%s, so Slurm prints times as epoch seconds).

Hooks: ``slurm.hook(option, hook)`` writes a wrapper for ``openacct hook <hook>`` and points the
slurm.conf option at it; jobcomp/script is hooked by default
(``JobCompLoc`` -> ``openacct hook slurm-jobcomp``). For admission control, for instance::

    slurm.hook("PrologSlurmctld", "slurm-prologctld")
    slurm.set_hook_env(OPENACCT_SOMETHING="1")     # rewrites every wrapper; no restart needed
    slurm.options["PrologSlurmctldTimeout"] = "5"  # any slurm.conf line (None removes one)
    slurm.restart_slurmctld()                      # SIGTERM, then start with the new slurm.conf

Wrappers export ``slurm.hook_env`` (OPENACCT_SPOOL_DIR, OPENACCT_DEFAULT_SYSTEM, OPENACCT_CONFIG
and whatever the caller sets) and run the hook as a child, not by exec, to time it: bash's
$EPOCHREALTIME costs no process, so the timing adds none to what slurmctld waits for. Slurm
sends a hook's output nowhere; the wrapper appends its stderr to ``hooks/<hook>.stderr``.

Run ``python -m tests.slurm.harness install`` to install Slurm (as root, with apt-get).
"""

from __future__ import annotations

import contextlib
import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import uuid
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from tests.pipeline import Process, free_port, wait_for

PACKAGES = ["munge", "slurmctld", "slurmd", "slurm-client", "slurmdbd", "slurm-wlm-elasticsearch-plugin"]
BINARIES = ["munged", "munge", "slurmctld", "slurmd", "slurmdbd", "sbatch", "srun", "scancel",
            "scontrol", "sacct", "sacctmgr", "sinfo", "squeue"]
SBIN_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
OPENACCT = str(Path(sys.executable).with_name("openacct"))
FINAL_STATES = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "PREEMPTED",
                "OUT_OF_MEMORY", "BOOT_FAIL", "DEADLINE"}
SACCT_FIELDS = ["JobID", "JobIDRaw", "Cluster", "Submit", "Start", "End", "ElapsedRaw", "AllocCPUS",
                "State", "ExitCode", "Account", "User", "Partition", "QOS", "NNodes", "NodeList",
                "Timelimit", "JobName"]  # JobName last: a name may hold the separator
MYSQL = {"host": "127.0.0.1", "port": 3306, "user": "root"}
DB_PREFIX = "openacct_slurm_"


def _which(name: str) -> str | None:
    return shutil.which(name, path=f"{os.environ.get('PATH', '')}:{SBIN_PATH}")


def missing_binaries() -> list[str]:
    """Slurm's programs, and the jobcomp/elasticsearch plugin, that this machine lacks."""
    missing = [b for b in BINARIES if _which(b) is None]
    plugins = [Path(d) / "slurm-wlm" for d in ("/usr/lib/x86_64-linux-gnu", "/usr/lib/aarch64-linux-gnu", "/usr/lib")]
    if not any((d / "jobcomp_elasticsearch.so").exists() for d in plugins):
        missing.append("jobcomp_elasticsearch.so")
    return missing


def install() -> None:
    """apt-get install Slurm's packages (apt-get update first only if that fails); raises
    RuntimeError saying why it cannot."""
    if not missing_binaries():
        print("slurm: already installed")
        return
    if os.geteuid() != 0 or _which("apt-get") is None:
        raise RuntimeError(f"Slurm is not installed ({', '.join(missing_binaries())} missing) and "
                           "cannot be: installing needs root and apt-get")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    command = ["apt-get", "install", "-y", "-q", "--no-install-recommends", *PACKAGES]
    print("slurm:", " ".join(command))
    if subprocess.run(command, env=env).returncode != 0:
        print("slurm: apt-get update, then again")
        subprocess.run(["apt-get", "update", "-q"], env=env, check=False)
        if subprocess.run(command, env=env).returncode != 0:
            raise RuntimeError(f"{' '.join(command)} failed")
    if missing_binaries():
        raise RuntimeError(f"still missing after the install: {', '.join(missing_binaries())}")


def unavailable() -> str | None:
    """Why this machine cannot run the Slurm tier, or None. A test run installs nothing: Slurm's
    packages come from ``make test-slurm`` (``python -m tests.slurm.harness install``), before it."""
    if os.geteuid() != 0:
        return "the Slurm tier runs slurmd, which must be root to start jobs as their users"
    if missing_binaries():
        return (f"Slurm is not installed ({', '.join(missing_binaries())} missing): "
                "make test-slurm installs it (root, apt-get)")
    if _which("mysql") is None and _which("mariadb") is None:
        return "no mysql/mariadb client to create slurmdbd's database with"
    try:
        socket.create_connection((MYSQL["host"], MYSQL["port"]), timeout=2).close()
    except OSError as exc:
        return f"no MariaDB/MySQL for slurmdbd at {MYSQL['host']}:{MYSQL['port']}: {exc}"
    return None


@dataclass(frozen=True)
class HookRun:
    job_id: str
    start: float  # epoch seconds, as the wrapper saw them
    end: float
    status: int

    @property
    def seconds(self) -> float:
        return self.end - self.start


class Slurm:
    def __init__(self, directory: Path, *, cluster: str = "oalab", cpus: int = 16) -> None:
        self.directory = directory
        self.cluster = cluster
        self.node_name, self.memory_mb = _node_facts()
        self.database = f"{DB_PREFIX}{os.getpid()}_{uuid.uuid4().hex[:6]}"
        self.conf = directory / "slurm.conf"
        self.munge_socket = directory / "munge" / "munge.socket"
        self.dbd_port = free_port()
        self.processes: dict[str, Process] = {}
        empty_config = directory / "hooks" / "openacct.toml"
        self.hook_env: dict[str, str] = {
            "OPENACCT_SPOOL_DIR": str(directory / "spool"),
            "OPENACCT_DEFAULT_SYSTEM": cluster,
            "OPENACCT_CONFIG": str(empty_config),
        }
        self.hooks: dict[str, str] = {}  # slurm.conf option -> openacct hook name
        self.daemon_tz = "UTC"  # the daemons' TZ, from their next start
        d = directory
        # CPUs beyond the real ones (SlurmdParameters=config_overrides) let jobs run side by side.
        self.options: dict[str, str | None] = {
            "ClusterName": cluster,
            "SlurmctldHost": f"{self.node_name}(127.0.0.1)",
            "SlurmctldPort": str(free_port()),
            "SlurmdPort": str(free_port()),
            # The venv's Python lives under /root: user slurm could not start the hooks.
            "SlurmUser": "root",
            "AuthType": "auth/munge",
            "CredType": "cred/munge",
            "AuthInfo": f"socket={self.munge_socket}",
            "ProctrackType": "proctrack/linuxproc",  # no cgroups here
            "TaskPlugin": "task/none",
            "JobAcctGatherType": "jobacct_gather/linux",
            "AccountingStorageType": "accounting_storage/slurmdbd",
            "AccountingStorageHost": "127.0.0.1",
            "AccountingStoragePort": str(self.dbd_port),
            "AccountingStoragePass": str(self.munge_socket),  # the munge socket for slurmdbd's connections
            # As sites run it: a job's account must be one of its user's associations.
            "AccountingStorageEnforce": "associations",
            "SchedulerType": "sched/backfill",
            "SchedulerParameters": "bf_interval=1,sched_interval=1",
            "SelectType": "select/cons_tres",
            "SelectTypeParameters": "CR_Core",
            "SlurmdParameters": "config_overrides",
            "ReturnToService": "2",
            "MinJobAge": "30",
            "KillWait": "2",
            "InactiveLimit": "0",
            "MpiDefault": "none",  # no PMIx here
            "MailProg": "/bin/true",
            "StateSaveLocation": str(d / "state"),
            "SlurmdSpoolDir": str(d / "slurmd"),
            "SlurmctldPidFile": str(d / "run" / "slurmctld.pid"),
            "SlurmdPidFile": str(d / "run" / "slurmd.pid"),
            "SlurmctldLogFile": str(d / "log" / "slurmctld.log"),
            "SlurmdLogFile": str(d / "log" / "slurmd.log"),
            "SlurmctldDebug": "debug",
            "SlurmdDebug": "info",
            "JobCompType": "jobcomp/script",
            "NodeName": (f"{self.node_name} NodeAddr=127.0.0.1 CPUs={cpus} Boards=1 SocketsPerBoard=1 "
                         f"CoresPerSocket={cpus} ThreadsPerCore=1 RealMemory={self.memory_mb}"),
            "PartitionName": f"debug Nodes={self.node_name} Default=YES MaxTime=INFINITE State=UP",
        }
        self.extra_lines: list[str] = []
        for sub in ("state", "slurmd", "run", "log", "hooks", "jobs"):
            (d / sub).mkdir(parents=True, exist_ok=True)
        empty_config.write_text("")
        self.hook("JobCompLoc", "slurm-jobcomp")

    # -- environment and configuration ----------------------------------------------------------

    @property
    def env(self) -> dict[str, str]:
        """For client commands (and `openacct slurm sync`): this process's environment, now."""
        path = os.environ.get("PATH", "")
        return {**os.environ, "PATH": f"{path}:{SBIN_PATH}", "SLURM_CONF": str(self.conf),
                "SLURM_TIME_FORMAT": "%s"}

    def hook(self, option: str, hook: str) -> Path:
        """Point slurm.conf's ``option`` at a wrapper running ``openacct hook <hook>``."""
        wrapper = self.directory / "hooks" / f"openacct-{hook}"
        self.hooks[option] = hook
        self.options[option] = str(wrapper)
        self._write_wrapper(hook)
        return wrapper

    def set_hook_env(self, **variables: str | None) -> None:
        """Change what every wrapper exports (None removes a variable): slurmctld runs the wrapper
        by its path each time, so this takes effect at the next hook run."""
        for name, value in variables.items():
            if value is None:
                self.hook_env.pop(name, None)
            else:
                self.hook_env[name] = str(value)
        for hook in set(self.hooks.values()):
            self._write_wrapper(hook)

    def _write_wrapper(self, hook: str) -> None:
        hooks = self.directory / "hooks"
        exports = "\n".join(f"export {k}={shlex.quote(v)}" for k, v in sorted(self.hook_env.items()))
        script = (
            "#!/bin/bash\n"
            "# Written by tests/slurm/harness.py. Runs the hook as a child (not exec) to time it.\n"
            f"{exports}\n"
            "started=$EPOCHREALTIME\n"
            f"{shlex.quote(OPENACCT)} hook {hook} 2>>{shlex.quote(str(hooks / f'{hook}.stderr'))}\n"
            "status=$?\n"
            f'echo "${{JOBID:-$SLURM_JOB_ID}} $started $EPOCHREALTIME $status" >>'
            f"{shlex.quote(str(hooks / f'{hook}.times'))}\n"
            "exit $status\n"
        )
        wrapper = hooks / f"openacct-{hook}"
        tmp = wrapper.with_suffix(".tmp")
        tmp.write_text(script)
        tmp.chmod(0o755)
        os.replace(tmp, wrapper)  # a hook running the old script keeps its own copy

    def hook_runs(self, hook: str = "slurm-jobcomp") -> list[HookRun]:
        path = self.directory / "hooks" / f"{hook}.times"
        runs = []
        for line in path.read_text().splitlines() if path.exists() else []:
            job, start, end, status = line.split()
            runs.append(HookRun(job, float(start), float(end), int(status)))
        return runs

    def write_config(self) -> None:
        lines = [f"{k}={v}" for k, v in self.options.items() if v is not None] + self.extra_lines
        self.conf.write_text("\n".join(lines) + "\n")
        dbd = self.directory / "slurmdbd.conf"
        dbd.write_text("\n".join([
            "AuthType=auth/munge", f"AuthInfo=socket={self.munge_socket}", "DbdHost=localhost",
            "DbdAddr=127.0.0.1", f"DbdPort={self.dbd_port}",
            "SlurmUser=root", f"LogFile={self.directory / 'log' / 'slurmdbd.log'}",
            f"PidFile={self.directory / 'run' / 'slurmdbd.pid'}", "StorageType=accounting_storage/mysql",
            f"StorageHost={MYSQL['host']}", f"StoragePort={MYSQL['port']}", f"StorageUser={MYSQL['user']}",
            f"StorageLoc={self.database}",
        ]) + "\n")
        dbd.chmod(0o600)  # slurmdbd refuses a readable one

    # -- daemons --------------------------------------------------------------------------------

    def start(self) -> None:
        self.write_config()
        _drop_stale_databases()
        try:
            self._start_munge()
            self._daemon("slurmdbd", ["-D"])
            wait_for(lambda: self.run("sacctmgr", "-n", "list", "cluster", check=False).returncode == 0,
                     30, "slurmdbd to answer")
            self.run("sacctmgr", "-i", "add", "cluster", self.cluster)
            self.start_slurmctld()
            self._daemon("slurmd", ["-D", "-f", str(self.conf), "-N", self.node_name])
            wait_for(lambda: self.node().get("State") == "IDLE", 30, "the node to be idle")
        except BaseException:
            self.stop()
            raise

    def _daemon(self, name: str, args: list[str]) -> Process:
        # Nothing of ours leaks into jobs; TZ makes the log's timestamps UTC (unless a test says).
        env = {"PATH": SBIN_PATH, "SLURM_CONF": str(self.conf), "TZ": self.daemon_tz}
        process = Process(args, env, self.directory / "log" / f"{name}.stderr", program=_which(name) or name)
        self.processes[name] = process.start()
        return process

    def _start_munge(self) -> None:
        """A munged of our own on its own socket, with the machine's key: a shared munged that
        one session started and stopped would cut off any other Slurm running beside it."""
        key = Path("/etc/munge/munge.key")
        if not key.exists():
            subprocess.run(["runuser", "-u", "munge", "--", _which("mungekey") or "mungekey", "--create"],
                           check=True)
        run_dir = self.munge_socket.parent
        run_dir.mkdir(mode=0o755, exist_ok=True)  # munged refuses a socket directory others can write
        shutil.chown(run_dir, "munge", "munge")
        # setpriv execs munged as user munge, so munged is our own child and is reaped.
        process = Process(["--reuid=munge", "--regid=munge", "--init-groups", _which("munged") or "munged",
                           "-F", f"--socket={self.munge_socket}", f"--pid-file={run_dir / 'munged.pid'}",
                           f"--log-file={run_dir / 'munged.log'}", f"--seed-file={run_dir / 'munged.seed'}"],
                          {"PATH": SBIN_PATH}, self.directory / "log" / "munged.stderr",
                          program=_which("setpriv") or "setpriv")
        self.processes["munged"] = process.start()
        wait_for(lambda: self.run("munge", "-n", f"--socket={self.munge_socket}", check=False).returncode == 0,
                 10, "munged to answer")

    def start_slurmctld(self) -> None:
        """Start slurmctld with the slurm.conf ``options`` say now (state is kept across restarts)."""
        self.write_config()
        self._daemon("slurmctld", ["-D", "-f", str(self.conf)])
        wait_for(lambda: "UP" in self.run("scontrol", "ping", check=False).stdout, 30, "slurmctld to answer")
        slurmd = self.processes.get("slurmd")
        if slurmd is not None and slurmd.popen is not None:
            # A restart: the node is UNKNOWN until slurmd registers again, which it does at once
            # on SIGHUP (it re-reads slurm.conf too) rather than when slurmctld next pings it.
            slurmd.popen.send_signal(signal.SIGHUP)
            wait_for(lambda: not self.node().get("State", "UNKNOWN").startswith("UNKNOWN"), 60,
                     "slurmd to register again", interval=0.2)

    def kill_slurmctld(self, sig: int = signal.SIGKILL) -> None:
        """Signal slurmctld (the daemon only, as a crash or a plain kill would) and wait for it:
        SIGTERM lets it drain its jobcomp queue first; SIGKILL loses whatever is queued. A hook
        already running finishes on its own."""
        _end(self.processes.pop("slurmctld"), sig)

    def restart_slurmctld(self) -> None:
        self.kill_slurmctld(signal.SIGTERM)
        self.start_slurmctld()

    def stop(self) -> None:
        """Cancel every job, stop the daemons we started (SIGTERM, then SIGKILL), drop the database."""
        if "slurmctld" in self.processes and self.processes["slurmctld"].alive():
            try:
                self.cancel_all()
            except (AssertionError, subprocess.SubprocessError):
                pass
        for name in ("slurmd", "slurmctld", "slurmdbd", "munged"):
            process = self.processes.pop(name, None)
            if process is not None:
                _end(process, signal.SIGTERM)
        _mysql(f"DROP DATABASE IF EXISTS `{self.database}`")

    # -- client commands ------------------------------------------------------------------------

    def run(self, *args: str, user: str | None = None, check: bool = True, timeout: float = 60,
            **kwargs: object) -> subprocess.CompletedProcess[str]:
        command = list(args)
        cwd: str | None = str(self.directory / "jobs")
        if user is not None and user != "root":
            self.ensure_user(user)
            command = ["runuser", "-u", user, "--", *command]
            cwd = os.path.expanduser(f"~{user}")
        result = subprocess.run(command, env=self.env, cwd=cwd, capture_output=True, text=True,
                                timeout=timeout, **kwargs)  # type: ignore[call-overload]
        if check and result.returncode != 0:
            raise AssertionError(f"{' '.join(command)} exited {result.returncode}: {result.stderr.strip()}")
        return result

    def ensure_user(self, name: str) -> None:
        if subprocess.run(["id", "-u", name], capture_output=True).returncode != 0:
            subprocess.run(["useradd", "-m", name], check=True)

    def add_account(self, account: str, users: Iterable[str] = ()) -> None:
        """A Slurm account with an association for each user (each user made a Unix user first:
        slurmctld maps associations to uids)."""
        self._sacctmgr_add("account", account, f"cluster={self.cluster}")
        for user in users:
            self.ensure_user(user)
            self._sacctmgr_add("user", user, f"account={account}", f"cluster={self.cluster}")

    def _sacctmgr_add(self, *args: str) -> None:
        result = self.run("sacctmgr", "-i", "add", *args, check=False)
        if result.returncode != 0 and "Nothing new added" not in result.stdout + result.stderr:
            raise AssertionError(f"sacctmgr add {' '.join(args)}: {result.stderr.strip() or result.stdout.strip()}")

    def submit(self, *args: str, user: str | None = None) -> str:
        """sbatch; the job id. Output goes to jobs/ (root) or to /dev/null (other users)."""
        defaults = [] if any(a.startswith(("-o", "--output")) for a in args) else (
            ["--output", str(self.directory / "jobs" / "%j.out")] if user in (None, "root") else
            ["--output", "/dev/null"])
        out = self.run("sbatch", "--parsable", *defaults, *args, user=user).stdout
        return out.strip().split(";")[0]

    def srun(self, *args: str, user: str | None = None) -> subprocess.Popen[str]:
        """srun in the background (it blocks until its job ends); read it with .communicate()."""
        command = ["srun", *args]
        cwd = str(self.directory / "jobs")
        if user is not None and user != "root":
            self.ensure_user(user)
            command, cwd = ["runuser", "-u", user, "--", *command], os.path.expanduser(f"~{user}")
        return subprocess.Popen(command, env=self.env, cwd=cwd, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True)

    def scancel(self, *jobs: str, signal_name: str | None = None) -> None:
        self.run("scancel", *([f"--signal={signal_name}"] if signal_name else []), *jobs)

    def queue(self) -> list[str]:
        """Ids of the jobs slurmctld has not finished with (array jobs by their array id)."""
        return self.run("squeue", "-h", "-o", "%A").stdout.split()

    def cancel_all(self, timeout: float = 30) -> None:
        jobs = self.queue()
        if jobs:
            self.run("scancel", *jobs, check=False)
        wait_for(lambda: not self.queue(), timeout, "the queue to empty")

    def scontrol_job(self, job: str) -> dict[str, str] | None:
        """``scontrol show job -o`` of a job (an array's first task); None once slurmctld forgot it."""
        result = self.run("scontrol", "show", "job", "-o", job, check=False)
        lines = result.stdout.strip().splitlines()
        return _fields(lines[0]) if result.returncode == 0 and lines else None

    def node(self) -> dict[str, str]:
        return _fields(self.run("scontrol", "show", "node", "-o", self.node_name).stdout.strip())

    def job_state(self, job: str) -> str | None:
        """The job's base state (RUNNING, COMPLETED, ...), from slurmctld or else from sacct."""
        fields = self.scontrol_job(job)
        if fields is not None:
            return fields["JobState"]
        records = self._sacct([job])
        return records[0]["State"].split()[0] if records else None

    def wait_for_state(self, job: str, states: str | Iterable[str], timeout: float = 60) -> str:
        wanted = {states} if isinstance(states, str) else set(states)
        seen: list[str | None] = [None]

        def reached() -> bool:
            seen[0] = self.job_state(job)
            return seen[0] in wanted

        try:
            wait_for(reached, timeout, f"job {job} to be {'/'.join(sorted(wanted))}", interval=0.2)
        except AssertionError as exc:
            raise AssertionError(f"{exc} (it is {seen[0]})") from None
        return seen[0]  # type: ignore[return-value]

    def sacct_jobs(self, jobs: Iterable[str], *, timeout: float = 120,
                   duplicates: bool = False) -> list[dict[str, str]]:
        """slurmdbd's records (``sacct -X``: one per job and array task) of ``jobs``, once they
        are final. slurmctld sends them asynchronously and in pieces (an array task shows first
        under the array's id), so while slurmctld still knows the jobs (MinJobAge) this waits
        until slurmdbd has every job and task with the controller's own id, state and end time;
        after that, until sacct gives the same final records twice running."""
        jobs = list(jobs)
        records: list[dict[str, str]] = []
        previous: list[list[dict[str, str]]] = [[]]

        def final() -> bool:
            view = self._controller_view(jobs)
            if view is not None and not all(state in FINAL_STATES for _, state, _ in view.values()):
                return False  # slurmctld has not finished them: no need to ask slurmdbd yet
            records[:] = self._sacct(jobs, duplicates)
            if view is not None:
                return view == {r["JobIDRaw"]: (r["JobID"], r["State"].split()[0], r["End"]) for r in records}
            found = {r["JobIDRaw"] for r in records} | {r["JobID"].split("_")[0] for r in records}
            stable, previous[0] = records == previous[0], list(records)
            return stable and set(jobs) <= found and all(
                r["State"].split()[0] in FINAL_STATES and r["End"].isdigit() for r in records)

        wait_for(final, timeout, f"sacct to have the final records of jobs {', '.join(jobs)}", interval=0.5)
        return records

    def _controller_view(self, jobs: list[str]) -> dict[str, tuple[str, str, str]] | None:
        """Job id -> (sacct's JobID, state, end time) of each job and array task, as slurmctld
        has them; None once it has forgotten any of them."""
        # One `scontrol show job` for all of them (every partition's, hidden ones too), not one
        # per job: this is polled twice a second for minutes, beside make test's CPU-bound run.
        result = self.run("scontrol", "-a", "show", "job", "-o", check=False)
        known = [_fields(line) for line in result.stdout.strip().splitlines()] if result.returncode == 0 else []
        view = {}
        for job in jobs:  # a job, or an array (its tasks and its pending remainder), by the id given
            lines = [f for f in known if job in (f.get("JobId"), f.get("ArrayJobId"))]
            if not lines:
                return None
            for fields in lines:
                task = fields.get("ArrayTaskId")
                name = fields["JobId"] if task is None else f"{fields['ArrayJobId']}_{task}"
                view[fields["JobId"]] = (name, fields["JobState"], fields["EndTime"])
        return view

    def _sacct(self, jobs: list[str], duplicates: bool = False) -> list[dict[str, str]]:
        out = self.run("sacct", "-X", "-P", "-n", *(["-D"] if duplicates else []), "-j", ",".join(jobs),
                       f"--format={','.join(SACCT_FIELDS)}").stdout
        return [dict(zip(SACCT_FIELDS, line.split("|", len(SACCT_FIELDS) - 1), strict=True))
                for line in out.splitlines() if line]

    # -- logs -----------------------------------------------------------------------------------

    def log_path(self, daemon: str) -> Path:
        return self.directory / "log" / f"{daemon}.log"

    def log_size(self, daemon: str = "slurmctld") -> int:
        path = self.log_path(daemon)
        return path.stat().st_size if path.exists() else 0

    def log(self, daemon: str = "slurmctld", since: int = 0) -> str:
        """A daemon's log from byte offset ``since`` (take one with log_size())."""
        with open(self.log_path(daemon), "rb") as f:
            f.seek(since)
            return f.read().decode(errors="replace")


def _fields(line: str) -> dict[str, str]:
    """Key=value pairs of a ``scontrol -o`` line; a value runs up to the next `` Key=``."""
    return dict(re.findall(r"(\w[\w:/]*)=(.*?)(?=\s+\w[\w:/]*=|\s*$)", line))


def _node_facts() -> tuple[str, int]:
    """The node's name and memory from ``slurmd -C`` (its CPUs we declare ourselves)."""
    line = subprocess.run([_which("slurmd") or "slurmd", "-C"], capture_output=True, text=True,
                          check=True).stdout.splitlines()[0]
    fields = _fields(line)
    return fields["NodeName"], int(fields["RealMemory"])


def _end(process: Process, sig: int, timeout: float = 20) -> None:
    """Signal the daemon, wait for it, then for what it started (its process group: slurmstepd,
    hooks), SIGKILLing the group if it is not gone in time."""
    if process.popen is None:
        return
    pid = process.popen.pid
    try:
        os.kill(pid, sig)
        process.popen.wait(timeout)
    except ProcessLookupError:
        pass
    except subprocess.TimeoutExpired:
        os.killpg(pid, signal.SIGKILL)
        process.popen.wait(10)
    process.popen = None
    try:
        wait_for(lambda: not _group_alive(pid), timeout, f"the processes of group {pid} to end")
    except AssertionError:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(pid, signal.SIGKILL)


def _group_alive(pgid: int) -> bool:
    """Whether any process of the group still runs; a zombie (state Z) is gone."""
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            after_name = stat.read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        if after_name[0] != "Z" and int(after_name[2]) == pgid:
            return True
    return False


def _mysql(sql: str) -> str:
    client = _which("mariadb") or _which("mysql") or "mysql"
    return subprocess.run([client, "-h", MYSQL["host"], "-P", str(MYSQL["port"]), "-u", MYSQL["user"],
                           "-N", "-B", "-e", sql], capture_output=True, text=True, check=True).stdout


def _drop_stale_databases() -> None:
    """Databases of earlier runs whose process is gone (a run killed before its teardown)."""
    for name in _mysql(f"SHOW DATABASES LIKE '{DB_PREFIX.replace('_', chr(92) + '_')}%'").split():
        pid = name[len(DB_PREFIX):].split("_")[0]
        if pid.isdigit() and not _pid_alive(int(pid)):
            _mysql(f"DROP DATABASE IF EXISTS `{name}`")


def _pid_alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state != "Z"


def _main(argv: list[str]) -> int:
    if argv != ["install"]:
        print("usage: python -m tests.slurm.harness install", file=sys.stderr)
        return 2
    try:
        install()
    except RuntimeError as exc:
        print(f"slurm: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(_main(sys.argv[1:]))


