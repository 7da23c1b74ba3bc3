"""Slurm's accounting records of ended jobs (``sacct``), read as jobcomp/script environments.

Each record is mapped onto the variable names jobcomp/script sets, so that
``shared.slurm.records.jobcomp_event`` builds from it the very event the hook would have built
for that job: the same id, the same fields. What sacct prints differently from jobcomp (an array
task as ``123_4``, a job that never ran as ``None assigned`` with the CPUs it asked for) is
translated here, as observed on Slurm 22.05.
"""

from __future__ import annotations

import datetime as dt
import os
import secrets
import shutil
import subprocess
from dataclasses import dataclass

from shared.errors import InvalidInput, OpenAcctError
from shared.job_event import BadInput
from shared.slurm import values as v

# JobName last: it is the one field a user writes freely.
FIELDS = ("JobIDRaw", "JobID", "Cluster", "Submit", "Start", "End", "State", "ExitCode", "User",
          "Account", "Partition", "QOS", "NNodes", "NodeList", "AllocCPUS", "AllocTRES", "Timelimit",
          "JobName")
# The end states sacct accounts (it refuses SPECIAL_EXIT). With -s, sacct's window selects jobs
# that reached one of them in it, which is what "ended in the window" means; without -s, a job
# whose begin time lay in the future when it was cancelled is left out.
# REQUEUED: a run that ended in a requeue (the next run is another record, submitted anew).
ENDED = ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "PREEMPTED", "OUT_OF_MEMORY", "REQUEUED",
         "BOOT_FAIL", "DEADLINE", "REVOKED")
TIMEOUT = 120
WINDOW = dt.timedelta(hours=1)  # what one sacct call asks slurmdbd for, at most
NO_VAL = "4294967294"  # jobcomp's ARRAYTASKID of a job that is no array task
NEVER_ALLOCATED = ("None assigned", "")
SACCT_TIME = "%Y-%m-%dT%H:%M:%S"


class SacctUnavailable(OpenAcctError):
    """sacct is missing, failed, timed out, or cannot reach slurmdbd."""


@dataclass(frozen=True)
class Record:
    fields: dict[str, str]
    line: int

    @property
    def state(self) -> str:
        return self.fields["State"].split()[0].upper() if self.fields["State"].strip() else ""

    @property
    def end(self) -> int | None:
        return _epoch(self.fields["End"])

    @property
    def gpus(self) -> int:
        """GPUs allocated (AllocTRES), by the one rule of ``values.gpus``; 0 for none or an unreadable count."""
        try:
            return v.gpus(self.fields["AllocTRES"]) or 0
        except BadInput:
            return 0

    def jobcomp_env(self) -> dict[str, str]:
        """The record as the jobcomp/script environment of the same job."""
        f = self.fields
        array_job, _, task = f["JobID"].partition("_")
        if task.startswith("["):
            # The tasks of an array that never started, cancelled together ("123_[4-10]"): one
            # record, as jobcomp's of the array job, which used nothing.
            task = ""
        allocated = f["NodeList"] not in NEVER_ALLOCATED
        start, end = _epoch(f["Start"]), _epoch(f["End"])
        if not allocated and start is None:
            start = end  # jobcomp gives a job cancelled while pending START=END
        return {
            "JOBID": f["JobIDRaw"],
            "ARRAYJOBID": array_job if task else "0",
            "ARRAYTASKID": task or NO_VAL,
            "CLUSTER": f["Cluster"],
            "SUBMIT": str(_epoch(f["Submit"]) or 0),
            "START": str(start or 0),
            "END": str(end or 0),
            "JOBSTATE": f["State"],
            "EXITCODE": f["ExitCode"],
            "USERNAME": f["User"],
            "ACCOUNT": f["Account"],
            "PARTITION": f["Partition"],
            "QOS": f["QOS"],
            # A job that never ran: sacct shows what it asked for, jobcomp what it got (nothing).
            "NODECNT": f["NNodes"] if allocated else "0",
            "NODES": f["NodeList"] if allocated else "",
            "PROCS": f["AllocCPUS"] if allocated else "0",
            "LIMIT": f["Timelimit"],
            "JOBNAME": f["JobName"],
        }


def _epoch(value: str) -> int | None:
    """Epoch seconds (SLURM_TIME_FORMAT=%s); sacct's Unknown and None are None."""
    value = value.strip()
    if not (value.isascii() and value.isdigit()):
        return None
    return int(value) or None


def parse(text: str, delimiter: str = "|") -> tuple[list[Record], list[str]]:
    """Records of ``sacct -P -n --delimiter=D -o FIELDS`` output, and the lines that are none.

    A job name may hold newlines: a line without the delimiter right after a record continues
    its name. With a delimiter chosen at random per run (``query`` does), no job name can pass
    for a record of its own."""
    records: list[Record] = []
    unreadable: list[str] = []
    continues = False  # whether the line before belonged to the last record
    for number, line in enumerate(text.removesuffix("\n").split("\n"), 1):
        values = line.split(delimiter, len(FIELDS) - 1)
        if len(values) == len(FIELDS):
            records.append(Record(dict(zip(FIELDS, values, strict=True)), number))
            continues = True
        elif continues and delimiter not in line:
            last = records[-1]
            records[-1] = Record({**last.fields, "JobName": f"{last.fields['JobName']}\n{line}"}, last.line)
        else:
            continues = False
            if line.strip():
                unreadable.append(f"line {number}: not a sacct record of {len(FIELDS)} fields: {line[:120]!r}")
    return records, unreadable


def sacct_path() -> str:
    """sacct on PATH, else in ``slurm_bin_dir`` (a service's PATH may be short)."""
    from shared.config import get_settings

    bin_dir = get_settings().slurm_bin_dir
    found = shutil.which("sacct") or shutil.which("sacct", path=bin_dir)
    if found is None:
        raise SacctUnavailable(f"sacct is neither on PATH nor in slurm_bin_dir ({bin_dir}): run this where "
                               "Slurm's client tools are and slurmdbd answers")
    return found


def command(sacct: str, since: dt.datetime, until: dt.datetime, cluster: str | None, delimiter: str) -> list[str]:
    """All users' allocations (not steps) that ended in [since, until], every run of a reused job
    id or a requeued job (-D). The window is in UTC: sacct reads times in its own zone (TZ=UTC)."""
    def utc(moment: dt.datetime) -> str:
        return moment.astimezone(dt.UTC).strftime(SACCT_TIME)

    return [sacct, "-a", "-X", "-P", "-n", "-D", f"--delimiter={delimiter}", "-S", utc(since), "-E", utc(until),
            "-s", ",".join(ENDED), *(["-M", cluster] if cluster else []), "-o", ",".join(FIELDS)]


def query(since: dt.datetime, until: dt.datetime, cluster: str | None,
          window: dt.timedelta = WINDOW) -> tuple[list[Record], list[str]]:
    """The records of jobs that ended in [since, until), read from sacct one ``window`` at a time:
    slurmdbd answers a bounded window quickly, where one query over months (or a long job id
    list) has been seen to hold it for minutes."""
    if until <= since:
        raise InvalidInput(f"--until {until.isoformat()} is not after --since {since.isoformat()}")
    records: list[Record] = []
    unreadable: list[str] = []
    start = since
    while start < until:
        stop = min(start + window, until)
        found, bad = _query_window(start, stop, cluster, first=start == since)
        records += found
        unreadable += bad
        start = stop
    return records, unreadable


def _query_window(since: dt.datetime, until: dt.datetime, cluster: str | None,
                  first: bool) -> tuple[list[Record], list[str]]:
    delimiter = f"~{secrets.token_hex(6)}~"
    # One second wider on each side: sacct's window has second resolution; the exact one is ours.
    args = command(sacct_path(), since - dt.timedelta(seconds=1), until + dt.timedelta(seconds=1), cluster, delimiter)
    env = {**os.environ, "SLURM_TIME_FORMAT": "%s", "TZ": "UTC"}
    try:
        result = subprocess.run(args, capture_output=True, text=True, errors="surrogateescape", env=env,
                                timeout=TIMEOUT)
    except subprocess.TimeoutExpired:
        raise SacctUnavailable(f"sacct gave no answer within {TIMEOUT} s (is slurmdbd overloaded?)") from None
    except OSError as exc:
        raise SacctUnavailable(f"cannot run {args[0]}: {exc.strerror}") from None
    if result.returncode != 0:
        # sacct's last line says why ("Problem talking to the database: Connection refused").
        lines = [line.strip() for line in result.stderr.splitlines() if line.strip()]
        raise SacctUnavailable(f"sacct failed (exit {result.returncode}): {lines[-1] if lines else 'no message'}")
    records, unreadable = parse(result.stdout, delimiter)
    start, stop = int(since.timestamp()), int(until.timestamp())
    # Each end falls in one window; a record without one is kept once, from the first.
    return [r for r in records if (r.end is None and first) or (r.end is not None and start <= r.end < stop)], unreadable
