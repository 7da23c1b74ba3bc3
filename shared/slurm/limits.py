"""Limits mode: Slurm itself keeps jobs within what their accounts can pay, with no prolog.

Each Slurm account that names an OpenAcct account (as the charger maps names: an account, an
alias, or a project whose default account pays) gets ``GrpTRESMins=billing=N`` with

    N = used + floor((payable - pending) / price of one billing minute), and never below used

- ``used``: the billing minutes Slurm has counted for the association (``scontrol show
  assoc_mgr``: ``GrpTRESMins=billing=LIMIT(USED)``), which never decays: the mode refuses a
  slurm.conf with PriorityDecayHalfLife or PriorityUsageResetPeriod set (``check_config``);
- ``payable``: what admission control lets an account spend, its available money (allocations
  in force less charges and open holds, ``ledger.account_balance``) plus its credit limit;
- ``pending``: the minutes Slurm counted that OpenAcct has not charged yet, job by job: for each
  running job, and each ended job slurmctld still lists whose (job id, submit time) the ledger
  has not recorded as ended, billing x UsageFactor of its QoS x TimeUsed / 60, exact (Slurm
  counts seconds). Slurm counts a running job's usage each PriorityCalcPeriod, so this is an
  upper bound of what it counted: it errs toward a lower limit by at most that period per job.
  Without it a run while a job runs would give its money twice;
- the price of a billing minute (``minute_price``): ``slurm_billing_minute_price`` for the
  system, else its core-hour rate / 60 where Slurm's billing is CPUs and OpenAcct prices CPUs
  alone (no GPU or node service, no partition or QoS multipliers, no TRESBillingWeights, every
  QoS UsageFactor 1).

Rounded down: Slurm never lets an account use a minute it cannot pay for. Slurm sub-accounts
under a mapped account are refused (usage rolls up to the parent). Runs hold an advisory lock
from reading Slurm until its limits are set, so two runs never set limits out of order.
"""

from __future__ import annotations

import datetime as dt
import math
import os
import shutil
import subprocess
from collections.abc import Iterable
from dataclasses import dataclass, field
from decimal import Decimal
from fractions import Fraction
from types import SimpleNamespace

from sqlalchemy import select, text
from sqlalchemy.orm import Session

from shared import ledger
from shared.config import get_settings
from shared.errors import InvalidInput
from shared.events import NAME
from shared.models import Account, Job
from shared.rating.directory import AccountInfo, Directory, SystemInfo
from shared.rating.price import rate_at

SLURM_TIMEOUT = 60
# squeue fields no user can write into (a job name or a path could hold "Key=" text); width 0:
# printed whole, never cut. Ended jobs stay listed for MinJobAge seconds. JobID is the job's own
# id (an array task's too: squeue's JobArrayID is the one that prints 123_4); SubmitTime is epoch
# seconds under SLURM_TIME_FORMAT=%s.
SQUEUE_FIELDS = ("JobID", "Account", "State", "QOS", "SubmitTime", "TimeUsed", "tres-alloc")
SQUEUE_FORMAT = ",".join(f"{f}:0|" for f in SQUEUE_FIELDS)
# -a: jobs in hidden partitions too (slurmctld hides them from a user who is no operator).
SQUEUE = ("squeue", "-a", "-h", "-t", "all", "-O", SQUEUE_FORMAT)
SLURM_ENV = {"SLURM_TIME_FORMAT": "%s", "TZ": "UTC"}
RUNNING_STATES = {"RUNNING", "SUSPENDED", "CONFIGURING", "STOPPED", "SIGNALING"}
# COMPLETING and STAGE_OUT: slurmctld counted the job's usage and released its run minutes
# when it deallocated its nodes (acct_policy_job_fini), as for a job that ended.
ENDED_STATES = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "PREEMPTED", "OUT_OF_MEMORY",
                "BOOT_FAIL", "DEADLINE", "COMPLETING", "STAGE_OUT"}
# pg_advisory_xact_lock key: one limits run at a time, from reading Slurm to setting its limits.
LIMITS_LOCK = 0x0A_CC7_11A1


class LimitsRefused(InvalidInput):
    """Limits mode cannot keep Slurm's limits right here; the message says why and what to change."""


# --------------------------------------------------------------------------- Slurm's side, as data

@dataclass(frozen=True)
class Association:
    """An account's own association (no user, no partition) in slurmctld's memory."""

    account: str
    limit: int | None  # GrpTRESMins billing; None: no limit
    used: int  # billing minutes counted (raw: the mode runs without decay)
    run_minutes: int  # billing minutes still reserved for its running jobs (GrpTRESRunMins used)
    parent: str | None = None  # ParentAccount: None for root (or where not printed)


@dataclass(frozen=True)
class SlurmJob:
    job_id: str  # the job's own id (an array task's too), as squeue -O JobID prints it
    account: str
    state: str
    qos: str
    submit_time: int | None  # epoch seconds; None where squeue gives none
    used_seconds: int
    billing: int


@dataclass(frozen=True)
class SlurmSide:
    cluster: str
    associations: dict[str, Association]
    jobs: list[SlurmJob]
    billing_weights: dict[str, str]  # partition -> its TRESBillingWeights, where set
    warnings: list[str]
    usage_factors: dict[str, Fraction] = field(default_factory=dict)  # QoS -> UsageFactor

    def usage_factor(self, qos: str) -> Fraction:
        """The UsageFactor Slurm multiplies a job's usage by; a QoS it does not list (deleted
        since) gets the largest there is, at least 1: more pending, a lower limit."""
        if qos in self.usage_factors:
            return self.usage_factors[qos]
        return max([Fraction(1), *self.usage_factors.values()])


def parse_config(text: str) -> dict[str, str]:
    """``scontrol show config``: ``Key = value`` lines."""
    found = {}
    for line in text.splitlines():
        key, sep, value = line.partition("=")
        if sep and key.strip() and " " not in key.strip():
            found[key.strip()] = value.strip()
    return found


def check_config(config: dict[str, str]) -> list[str]:
    """Refuse a slurm.conf under which used + available is the wrong limit; warnings for what
    merely weakens it."""
    enforce = {f.strip() for f in config.get("AccountingStorageEnforce", "").lower().split(",")}
    if "limits" not in enforce and "safe" not in enforce:
        raise LimitsRefused("Slurm does not enforce association limits: set AccountingStorageEnforce="
                            "associations,limits,safe in slurm.conf")
    # GrpTRESMins counts usage only under priority/multifactor (resource_limits.html); with
    # decay or resets, what Slurm counts as used is no longer what OpenAcct charged.
    if config.get("PriorityType") != "priority/multifactor":
        raise LimitsRefused(f"PriorityType is {config.get('PriorityType')!r}: GrpTRESMins counts usage only "
                            "under PriorityType=priority/multifactor")
    if config.get("PriorityDecayHalfLife") not in ("00:00:00", "0"):
        raise LimitsRefused(f"PriorityDecayHalfLife is {config.get('PriorityDecayHalfLife')}: Slurm decays the "
                            "usage GrpTRESMins counts, so used + available would let accounts spend money "
                            "again; set PriorityDecayHalfLife=0")
    if config.get("PriorityUsageResetPeriod", "NONE") != "NONE":
        raise LimitsRefused(f"PriorityUsageResetPeriod is {config.get('PriorityUsageResetPeriod')}: Slurm "
                            "resets the usage GrpTRESMins counts; set PriorityUsageResetPeriod=NONE")
    warnings = []
    if "safe" not in enforce:
        warnings.append("AccountingStorageEnforce has no 'safe': Slurm starts a job that cannot run to its "
                        "time limit within the account's money, and kills it when the money runs out")
    return warnings


def _tres(text: str, name: str = "billing") -> tuple[int | None, int | None]:
    """(limit, used) of one TRES in ``cpu=N(U),billing=L(U)`` (N: no limit)."""
    for item in text.split(","):
        key, _, value = item.partition("=")
        if key == name:
            limit, _, used = value.partition("(")
            return (None if limit == "N" else int(limit)), int(used.rstrip(")") or 0)
    return None, None


def parse_associations(text: str) -> dict[str, Association]:
    """The accounts' own associations from ``scontrol show assoc_mgr flags=assoc -o``."""
    found = {}
    for line in text.splitlines():
        words = dict(w.partition("=")[::2] for w in line.split() if "=" in w)
        if "Account" not in words or words.get("UserName") or words.get("Partition"):
            continue
        limit, used = _tres(words.get("GrpTRESMins", ""))
        _, running = _tres(words.get("GrpTRESRunMins", ""))
        parent = words.get("ParentAccount", "").partition("(")[0] or None  # ParentAccount=NAME(ID)
        found[words["Account"]] = Association(words["Account"], limit, used or 0, running or 0, parent)
    return found


def parse_jobs(text: str) -> list[SlurmJob]:
    """The jobs of ``SQUEUE``: ``squeue -a -h -t all -O SQUEUE_FORMAT`` (SLURM_TIME_FORMAT=%s)."""
    jobs = []
    for line in text.splitlines():
        values = [v.strip() for v in line.split("|")]
        if len(values) < len(SQUEUE_FIELDS):
            continue
        job_id, account, state, qos, submit, used, tres = values[:len(SQUEUE_FIELDS)]
        billing = dict(item.partition("=")[::2] for item in tres.split(",")).get("billing", "0")
        jobs.append(SlurmJob(job_id, account, state.split()[0] if state else "", qos,
                             int(submit) if submit.isascii() and submit.isdigit() else None, _seconds(used),
                             int(billing) if billing.isdigit() else 0))
    return jobs


def parse_usage_factors(text: str) -> dict[str, Fraction]:
    """QoS -> UsageFactor from ``sacctmgr -n -P show qos format=name,usagefactor`` (printed as
    %f: 1.000000); one left blank (unset) is Slurm's default, 1."""
    found = {}
    for line in text.splitlines():
        name, sep, factor = line.strip().partition("|")
        if not sep or not name:
            continue
        factor = factor.strip().rstrip("|")
        try:
            found[name] = Fraction(Decimal(factor)) if factor else Fraction(1)
        except ArithmeticError:
            raise LimitsRefused(f"sacctmgr gives QoS {name!r} the UsageFactor {factor!r}, not a number") from None
        if found[name] < 0:  # Slurm applies a factor only when it is >= 0
            found[name] = Fraction(1)
    return found


def _seconds(clock: str) -> int:
    """Seconds of Slurm's [D-][HH:]MM:SS."""
    days, _, rest = clock.rpartition("-")
    parts = [int(p) for p in rest.split(":") if p.isdigit()]
    seconds = 0
    for part in parts:
        seconds = seconds * 60 + part
    return seconds + int(days or 0) * 86_400


def parse_billing_weights(text: str) -> dict[str, str]:
    """Partition -> TRESBillingWeights from ``scontrol show partition -o``, where one is set."""
    found = {}
    for line in text.splitlines():
        words = dict(w.partition("=")[::2] for w in line.split() if "=" in w)
        if words.get("TRESBillingWeights"):
            found[words.get("PartitionName", "?")] = words["TRESBillingWeights"]
    return found


def read_slurm() -> SlurmSide:
    """What slurmctld says now: its configuration (checked), associations, jobs and billing weights."""
    config = parse_config(_run("scontrol", "show", "config"))
    warnings = check_config(config)
    cluster = config.get("ClusterName", "")
    if not NAME.fullmatch(cluster):
        raise LimitsRefused(f"scontrol gives no usable ClusterName ({cluster!r})")
    # Usage first, jobs after: a job that ends in between is counted in pending in full, whatever
    # of it the usage read held (more pending: a lower limit, never a higher one).
    associations = parse_associations(_run("scontrol", "show", "assoc_mgr", "flags=assoc", "-o"))
    return SlurmSide(cluster, associations,
                     parse_jobs(_run(*SQUEUE)),
                     parse_billing_weights(_run("scontrol", "show", "partition", "-o")), warnings,
                     parse_usage_factors(_run("sacctmgr", "-n", "-P", "show", "qos", "format=name,usagefactor")))


def _program(name: str) -> str:
    bin_dir = get_settings().slurm_bin_dir
    found = shutil.which(name) or shutil.which(name, path=bin_dir)
    if found is None:
        raise LimitsRefused(f"{name} is neither on PATH nor in slurm_bin_dir ({bin_dir}): run this where "
                            "Slurm's client tools are")
    return found


def _run(*command: str) -> str:
    try:
        result = subprocess.run([_program(command[0]), *command[1:]], capture_output=True, text=True,
                                env={**os.environ, **SLURM_ENV}, timeout=SLURM_TIMEOUT)
    except subprocess.TimeoutExpired:
        raise LimitsRefused(f"{' '.join(command)} did not answer in {SLURM_TIMEOUT} s") from None
    if result.returncode != 0:
        raise LimitsRefused(f"{' '.join(command)} failed: {result.stderr.strip() or result.stdout.strip()}")
    return result.stdout


# --------------------------------------------------------------------------- money and minutes

def minute_price(session: Session, system: SystemInfo, billing_weights: dict[str, str], at: dt.datetime,
                 usage_factors: dict[str, Fraction] | None = None) -> Fraction:
    """The price of one Slurm billing minute on ``system``, exact."""
    explicit = get_settings().slurm_billing_minute_price.get(system.name)
    if explicit is not None:
        return Fraction(explicit)
    why = None
    factored = sorted(f"{q} (UsageFactor={float(f):g})" for q, f in (usage_factors or {}).items() if f != 1)
    if "cpu" not in system.services:
        why = "it has no core-hours service"
    elif {"gpu", "node"} & set(system.services):
        why = "it charges GPU- or node-hours too, which Slurm's default billing (CPUs) does not count"
    elif any(m != 1 for m in system.multipliers.values()):
        why = "it has partition or QoS charge multipliers, which Slurm's billing does not know"
    elif billing_weights:
        why = f"Slurm weighs billing (TRESBillingWeights on {', '.join(sorted(billing_weights))})"
    elif factored:
        why = f"Slurm multiplies usage by a QoS UsageFactor other than 1 ({', '.join(factored)})"
    if why is not None:
        raise LimitsRefused(f"cannot derive the price of a Slurm billing minute on {system.name!r}: {why}; set "
                            f'slurm_billing_minute_price = {{"{system.name}" = "..."}}, with TRESBillingWeights '
                            "and QoS UsageFactor making billing minutes match OpenAcct's prices")
    service_id, name = system.services["cpu"]
    return Fraction(rate_at(session, service_id, at, name)) / 60


def pending_minutes(side: SlurmSide, account: str, charged_ends: set[tuple[str, int]]) -> Fraction:
    """Billing minutes Slurm counted for ``account`` that the ledger has not charged yet, job by
    job: billing x UsageFactor x TimeUsed / 60 (exact) for its running jobs and its ended jobs
    whose (job id, submit time) the ledger has not recorded as ended. Slurm counts what a job ran
    in seconds (acct_policy.c, priority_multifactor.c: billing x run seconds x UsageFactor), a
    running job's up to its last PriorityCalcPeriod: TimeUsed bounds it from above, so this errs
    toward a lower limit, by at most that period per job."""
    return sum((j.billing * side.usage_factor(j.qos) * Fraction(j.used_seconds, 60)
                for j in side.jobs if j.account == account
                and (j.state in RUNNING_STATES
                     or (j.state in ENDED_STATES and (j.job_id, j.submit_time) not in charged_ends))),
               Fraction(0))


def _charged_ends(session: Session, system_id: int, jobs: Iterable[SlurmJob]) -> set[tuple[str, int]]:
    """Of the ended jobs slurmctld lists, the (job id, submit time) whose end the ledger has
    recorded. The submit time tells a reused or requeued job id (Slurm gives a requeued job a
    new submit time) from the job the ledger charged."""
    ended = {j.job_id for j in jobs if j.state in ENDED_STATES and j.submit_time is not None}
    if not ended:
        return set()
    return {(job_id, int(submit.timestamp())) for job_id, submit in session.execute(
        select(Job.job_id, Job.submit_time).where(Job.system_id == system_id, Job.end_time.is_not(None),
                                                  Job.job_id.in_(sorted(ended))))}


# --------------------------------------------------------------------------- what to set

@dataclass(frozen=True)
class Limit:
    slurm_account: str
    account: str
    payable: Decimal
    used: int
    pending: Fraction
    current: int | None
    wanted: int

    @property
    def changed(self) -> bool:
        return self.current != self.wanted

    def command(self, cluster: str) -> list[str]:
        return ["sacctmgr", "-i", "modify", "account", "where", f"name={self.slurm_account}",
                f"cluster={cluster}", "set", f"GrpTRESMins=billing={self.wanted}"]

    def as_dict(self) -> dict[str, object]:
        return {"slurm_account": self.slurm_account, "account": self.account, "payable": self.payable,
                "used": self.used, "pending": math.ceil(self.pending), "current": self.current,
                "wanted": self.wanted, "changed": self.changed}


@dataclass(frozen=True)
class Plan:
    cluster: str
    system: str
    price: Fraction
    limits: list[Limit]
    warnings: list[str]

    @property
    def price_shown(self) -> Decimal:
        """The price of a billing minute for people to read (exact where it ends, else 28 digits)."""
        return Decimal(self.price.numerator) / Decimal(self.price.denominator)


def plan(session: Session, side: SlurmSide, at: dt.datetime | None = None) -> Plan:
    """The GrpTRESMins each Slurm account that names an OpenAcct account should have."""
    at = at or ledger.now()
    names = sorted(a for a in side.associations if a != "root")
    for name in names:
        if not NAME.fullmatch(name):
            raise LimitsRefused(f"{name!r} cannot be a Slurm account name sacctmgr is given")
    directory = Directory.load(session, [SimpleNamespace(system=side.cluster, user="", account=n) for n in names])
    system = directory.systems.get(side.cluster)
    if system is None:
        raise LimitsRefused(f"Slurm's cluster {side.cluster!r} is no OpenAcct system (add it, or a system alias)")
    mapped = {n: directory.accounts[(system.id, n)] for n in names if (system.id, n) in directory.accounts}
    by_account: dict[int, list[str]] = {}
    for name, info in mapped.items():
        by_account.setdefault(info.id, []).append(name)
    shared = [names for names in by_account.values() if len(names) > 1]
    if shared:  # each would be given the whole of the money
        raise LimitsRefused("Slurm accounts " + "; ".join(" and ".join(n) for n in shared)
                            + " pay from one OpenAcct account: one Slurm account per OpenAcct account")
    _refuse_sub_accounts(side, mapped)
    warnings = list(side.warnings)
    unmapped = [n for n in names if n not in mapped]
    if unmapped:
        warnings.append(f"Slurm accounts OpenAcct does not know are left without a limit: {', '.join(unmapped)} "
                        "(add an OpenAcct account or alias by that name to limit them)")
    price = minute_price(session, system, side.billing_weights, at, side.usage_factors)
    charged_ends = _charged_ends(session, system.id, side.jobs)
    limits = []
    for name, info in sorted(mapped.items()):
        association = side.associations[name]
        money = _payable(session, info, at)
        pending = pending_minutes(side, name, charged_ends)
        # Rounded down, and never below what Slurm counted: no minute the account cannot pay.
        wanted = association.used + max(0, math.floor(Fraction(money) / price - pending))
        limits.append(Limit(name, info.name, money, association.used, pending, association.limit, wanted))
    return Plan(side.cluster, system.name, price, limits, warnings)


def _refuse_sub_accounts(side: SlurmSide, mapped: dict[str, AccountInfo]) -> None:
    """Slurm counts a sub-account's usage and run minutes in its parents' too (assoc_mgr rolls
    them up), and holds its jobs to its parents' limits: a limit set from one account's money
    would be spent by another's jobs. Refused where a mapped account has a mapped ancestor."""
    nested = []
    for name in sorted(mapped):
        seen = {name}
        parent = side.associations[name].parent
        while parent is not None and parent not in seen:
            if parent in mapped:
                nested.append(f"{name} (under {parent})")
                break
            seen.add(parent)
            association = side.associations.get(parent)
            parent = association.parent if association is not None else None
    if nested:
        raise LimitsRefused("Slurm sub-accounts under an account OpenAcct limits: " + ", ".join(nested)
                            + "; Slurm counts a sub-account's usage in its parent's too, which limits mode "
                            "cannot split: give each OpenAcct account a Slurm account directly under root "
                            "(or an account OpenAcct does not know)")


def _payable(session: Session, info: AccountInfo, at: dt.datetime) -> Decimal:
    """What the account may still spend on jobs, as admission control counts it (available
    within the credit limit); nothing for an account closed or expired."""
    if not info.active or (info.expires_at is not None and at >= info.expires_at):
        return Decimal(0)
    balance = ledger.account_balance(session, session.get_one(Account, info.id), at)
    return max(Decimal(0), balance.available + balance.credit_limit)


def apply(found: Plan) -> list[str]:
    """Run sacctmgr for each limit that changes; the failures, one line each."""
    failures = []
    for limit in found.limits:
        if not limit.changed:
            continue
        command = limit.command(found.cluster)
        try:
            result = subprocess.run([_program("sacctmgr"), *command[1:]], capture_output=True, text=True,
                                    timeout=SLURM_TIMEOUT)
        except (subprocess.TimeoutExpired, LimitsRefused) as exc:
            failures.append(f"{' '.join(command)}: {exc}")
            continue
        if result.returncode != 0:
            failures.append(f"{' '.join(command)}: {result.stderr.strip() or result.stdout.strip()}")
    return failures


def keep_in_step(session: Session, *, dry_run: bool = False) -> tuple[Plan, list[str]]:
    """Read Slurm, work out every limit, and set those that change (none with ``dry_run``).

    One run at a time (an advisory lock in the session's transaction, from before Slurm is read
    until its limits are set): a run that read Slurm and the ledger before a transfer must not
    set its older, higher limit after the transfer's run set the lower one."""
    session.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": LIMITS_LOCK})
    found = plan(session, read_slurm())
    return found, ([] if dry_run else apply(found))
