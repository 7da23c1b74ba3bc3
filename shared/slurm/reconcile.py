"""Reconcile the ledger with Slurm's accounting: every job sacct says ended is charged once.

jobcomp/script records still queued when slurmctld dies (SIGKILL, a crash) are lost for good,
while slurmdbd keeps the job. Each sacct record is made into the event the jobcomp hook would
have built for the job (``shared.slurm.sacct`` maps it onto jobcomp's variables), so its id is the
hook's, and the ledger is asked about the job, known by system, job id, array task and submit
time:

- ``matches``: recorded as ended and charged what the charger makes of sacct's record;
- ``differs``: recorded, but charged otherwise; listed with both figures, never published again
  (the inbox would drop the event anyway: the difference is for a person to look into);
- ``parked``: its event is a dead letter (``openacct deadletter list`` says why);
- ``missing``: not recorded as ended; published, the relay and the charger apply it once
  (``published``), as they would have applied the hook's;
- ``invalid``: the record cannot become an event (the reason is given).
"""

from __future__ import annotations

import datetime as dt
import json
from collections import defaultdict
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from decimal import Decimal
from fractions import Fraction
from pathlib import Path
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from shared import bulk, ledger, spool
from shared.config import get_settings
from shared.event_id import job_event_id
from shared.events import EventRejected, JobCompleted, parse_event
from shared.job_event import BadInput, encode
from shared.models import Job, LedgerTransaction, ParkedEvent
from shared.rating.directory import Directory, Unresolved, system_named
from shared.rating.jobs import plan as charger_plan
from shared.rating.jobs import refused_runs
from shared.rating.price import Quantity, RateTables, charged_quantity, hours, price_at, rate_tables
from shared.slurm import records as slurm
from shared.slurm.sacct import ENDED, Record

SOURCE = "slurm-reconcile"  # not part of the event id: the hook's and ours are one event
# The ctld hooks key a job by the prolog's clock, which may be a second or two off Slurm's start.
START_SLACK = dt.timedelta(seconds=60)
# ...and time a job by their own clocks: a few seconds off Slurm's, no more.
CLOCK_SLACK = dt.timedelta(seconds=5)
UNRECONCILED = ("missing", "differs", "parked", "invalid")
# (event id, raw event) pairs, to be applied as the hook's events are.
Publisher = Callable[[list[tuple[str, bytes]]], None]


@dataclass
class Finding:
    job: str
    status: str
    event_id: str | None = None
    state: str | None = None
    user: str | None = None
    account: str | None = None
    end: dt.datetime | None = None
    elapsed_seconds: int | None = None
    cpus: int | None = None
    gpus: int | None = None
    expected: Decimal | None = None
    charged: Decimal | None = None
    expected_quantity: dict[str, Decimal] = field(default_factory=dict)
    charged_quantity: dict[str, Decimal] = field(default_factory=dict)
    note: str = ""


@dataclass
class Reconciliation:
    findings: list[Finding]
    not_ended: int = 0

    @property
    def counts(self) -> dict[str, int]:
        counts = dict.fromkeys(("matches", "published", *UNRECONCILED), 0)
        for finding in self.findings:
            counts[finding.status] += 1
        return counts

    @property
    def reconciled(self) -> bool:
        return not any(f.status in UNRECONCILED for f in self.findings)


@dataclass
class _Candidate:
    record: Record
    event: JobCompleted
    raw: bytes


def reconcile(session: Session, records: Iterable[Record], unreadable: Iterable[str] = (), *,
              publish: Publisher | None, now: int, end_hook: str | None = None) -> Reconciliation:
    """Compare each ended job of ``records`` with the ledger; publish the missing ones unless
    ``publish`` is None (a dry run). ``end_hook`` (default: the ``slurm_end_hook`` setting) is
    the hook whose event ids the missing are published under."""
    settings = get_settings()
    candidates, result = events(records, now, settings.default_system)
    result.findings += [Finding("-", "invalid", note=line) for line in unreadable]
    found, raw = compare(session, candidates, end_hook or settings.slurm_end_hook)
    result.findings += found
    missing = [f for f in result.findings if f.status == "missing"]
    if publish is not None and missing:
        publish([(f.event_id, raw[f.event_id]) for f in missing])  # type: ignore[index]
        for finding in missing:
            finding.status = "published"
    return result


def events(records: Iterable[Record], now: int, default_system: str | None) -> tuple[list[_Candidate], Reconciliation]:
    """The jobcomp hook's event for each ended job (one per event id: sacct -D may list a job
    twice after slurmctld recovered), and a reconciliation holding those that cannot be one."""
    result = Reconciliation([])
    candidates: dict[str, _Candidate] = {}
    for record in records:
        if record.state not in ENDED:  # running, pending, requeued: not the end of a run
            result.not_ended += 1
            continue
        try:
            raw = encode(slurm.jobcomp_event(record.jobcomp_env(), now, default_system, source=SOURCE))
            event = parse_event(raw)
        except (BadInput, EventRejected) as exc:
            result.findings.append(Finding(record.fields["JobID"], "invalid", state=record.state, note=str(exc)))
            continue
        assert isinstance(event, JobCompleted)
        candidates.setdefault(event.event_id, _Candidate(record, event, raw))
    return list(candidates.values()), result


def compare(session: Session, candidates: list[_Candidate], end_hook: str = "jobcomp",
            ) -> tuple[list[Finding], dict[str, bytes]]:
    """A finding per candidate, and the event each would be published as, by event id."""
    systems = {name: system_named(session, name) for name in {c.event.system for c in candidates}}
    rows = _jobs(session, {s.id for s in systems.values() if s is not None}, {c.event.job_id for c in candidates})
    findings: list[Finding] = []
    events: dict[str, bytes] = {}
    recorded: list[tuple[_Candidate, Job, Finding, bool]] = []
    for c in candidates:
        system = systems[c.event.system]
        row, by_start = None, False
        try:
            if system is not None and "gpu" in system.services and c.record.gpus and c.event.gpus is None:
                c = _changed(c, gpus=c.record.gpus)  # noqa: PLW2901  (jobcomp knows no GPUs; sacct does)
            if system is not None:
                row, by_start = _recorded(rows.get((system.id, c.event.job_id, c.event.array_task_id), []),
                                          c.event, end_hook)
            if row is not None and row.end_time is None and row.start_time is not None and (
                    by_start or end_hook == "epilogctld"):
                # Its epilog's event may still be on the way, keyed by the start its prolog saw,
                # whether the prolog's row carries the submit time (admission's does) or not.
                c = _as_epilogs(c, row)  # noqa: PLW2901
        except EventRejected as exc:
            findings.append(Finding(c.record.fields["JobID"], "invalid", state=c.record.state, note=str(exc)))
            continue
        e = c.event
        finding = Finding(c.record.fields["JobID"], "missing", event_id=e.event_id, state=e.state, user=e.user,
                          account=e.account, end=e.end_time, cpus=e.cpus, gpus=c.record.gpus,
                          elapsed_seconds=int((e.end_time - (e.start_time or e.end_time)).total_seconds()))
        findings.append(finding)
        events[e.event_id] = c.raw
        if row is not None and row.end_time is not None:
            recorded.append((c, row, finding, by_start))
    parked = set(session.scalars(select(ParkedEvent.event_id).where(
        bulk.any_of(ParkedEvent.event_id, list(events)), ParkedEvent.replayed_at.is_(None))))
    for finding in findings:
        if finding.status == "missing" and finding.event_id in parked:
            finding.status, finding.note = "parked", "its event is a dead letter: openacct deadletter list"
    _check_charges(session, recorded)
    return findings, events


def _as_epilogs(c: _Candidate, row: Job) -> _Candidate:
    """The event under the id EpilogSlurmctld gives this job (keyed by the start its prolog
    recorded, not by the submit time), so that the epilog's own, should it still come, is
    dropped as a repeat: sacct's times and state, the prolog's start."""
    assert row.start_time is not None
    return _changed(c, submit_time=None, start_time=row.start_time.isoformat(), event_id=job_event_id(
        "job.completed", c.event.system, c.event.job_id, c.event.array_task_id, None, None,
        int(row.start_time.timestamp())))


def _changed(c: _Candidate, **fields: object) -> _Candidate:
    raw = json.dumps({**json.loads(c.raw), **fields}).encode()
    event = parse_event(raw)
    assert isinstance(event, JobCompleted)
    return _Candidate(c.record, event, raw)


def _jobs(session: Session, system_ids: set[int], job_ids: set[str]) -> dict[tuple[Any, ...], list[Job]]:
    found: dict[tuple[Any, ...], list[Job]] = defaultdict(list)
    if system_ids and job_ids:
        for job in session.scalars(select(Job).where(Job.system_id.in_(system_ids), bulk.any_of(Job.job_id, job_ids))):
            found[(job.system_id, job.job_id, job.array_task_id)].append(job)
    return found


def _recorded(rows: list[Job], event: JobCompleted, end_hook: str) -> tuple[Job | None, bool]:
    """This run of the job among the rows of its id, and whether it is known by its start.

    By submit time first. Else a row the ctld hooks keyed by the start their prolog saw: one
    that has ended was charged by EpilogSlurmctld (jobcomp's records name the submit time); one
    that has not is the prolog's alone, and belongs to the epilog's event only where that hook
    reports the ends (``end_hook``): beside jobcomp, jobcomp's record will name the job."""
    same = [r for r in rows if r.submit_time == event.submit_time]
    if same:
        return same[0], False
    if event.start_time is not None:
        same = [r for r in rows if r.submit_time == r.start_time and r.start_time is not None
                and abs(r.start_time - event.start_time) <= START_SLACK
                and (r.end_time is not None or end_hook == "epilogctld")]
    return (same[0], True) if same else (None, False)


def _check_charges(session: Session, recorded: list[tuple[_Candidate, Job, Finding, bool]]) -> None:
    """Compare what each recorded job was charged (charges as re-rated since; refunds are
    deliberate and not counted) with what the charger would charge for sacct's record."""
    if not recorded:
        return
    charges: dict[int, list[LedgerTransaction]] = defaultdict(list)
    for txn in session.scalars(select(LedgerTransaction).where(
            LedgerTransaction.kind == "charge", bulk.any_of(LedgerTransaction.job_id, [row.id for _, row, _, _ in recorded]))):
        charges[txn.job_id].append(txn)  # type: ignore[index]
    prices = ledger.prices(session, [t.id for ts in charges.values() for t in ts])
    directory = Directory.load(session, [c.event for c, _, _, _ in recorded])
    free_states = set(get_settings().free_states)
    plans = {}
    refused = refused_runs(session, directory, [c.event for c, _, _, _ in recorded])
    for c, _, finding, _ in recorded:
        try:
            plans[c.event.event_id] = charger_plan(session, directory, c.event, free_states, refused=refused)
        except Unresolved as exc:
            finding.note = f"the charger would not charge sacct's record now: {exc}"
    rates = rate_tables(session, {p["service_id"] for plan in plans.values() for p in plan.charges})
    for c, row, finding, by_start in recorded:
        held = charges[row.id]
        finding.charged = sum((prices[t.id] for t in held), Decimal(0))
        finding.charged_quantity = {str(t.details.get("resource", t.service_id)): t.quantity or Decimal(0) for t in held}
        exact = {str(t.details.get("resource", t.service_id)): charged_quantity(t.quantity, t.details) for t in held}
        plan = plans.get(c.event.event_id)
        if plan is None:
            finding.status = "differs"
            continue
        finding.expected_quantity = {p["details"]["resource"]: p["quantity"] for p in plan.charges}
        finding.expected = _cost(rates, plan.charges, c.event.end_time,
                                 {p["details"]["resource"]: p["exact_quantity"] for p in plan.charges})
        same = finding.expected == finding.charged and finding.expected_quantity == finding.charged_quantity
        if not same and by_start and finding.expected is not None and _off_by_clocks_only(
                plan.charges, exact, finding.charged, rates, c.event.end_time):
            same, finding.note = True, "charged by the ctld hooks' clocks, seconds off sacct's times"
        finding.status = "matches" if same else "differs"
        if finding.expected is None:
            finding.note = "no charge rate in effect at the job's end"


def _off_by_clocks_only(planned: list[dict[str, Any]], quantities: dict[str, Quantity], charged: Decimal,
                        rates: RateTables, at: dt.datetime) -> bool:
    """Whether a job the ctld hooks timed by their own clocks was charged as sacct's record
    says but for those clocks: each resource for sacct's time give or take CLOCK_SLACK, and
    for those quantities exactly what the charger would ask (same services, rates, multipliers)."""
    slack = hours(1, int(CLOCK_SLACK.total_seconds()))
    if {p["details"]["resource"] for p in planned} != set(quantities):
        return False
    if any(abs(p["exact_quantity"] - Fraction(quantities[p["details"]["resource"]])) > p["details"]["count"] * slack
           for p in planned):
        return False
    return _cost(rates, planned, at, quantities) == charged


def _cost(rates: RateTables, planned: list[dict[str, Any]], at: dt.datetime,
          quantities: dict[str, Quantity]) -> Decimal | None:
    """What the charger would ask for the planned charges with these quantities (by resource),
    priced as the ledger prices them; None where a rate is missing."""
    prices = [price_at(rates, p["service_id"], at, quantities[p["details"]["resource"]], p["multiplier"])
              for p in planned]
    return None if None in prices else sum((amount for _, amount in prices), Decimal(0))  # type: ignore[misc]


def spool_publisher(spool_dir: Path) -> Publisher:
    """Into the spool, as ``openacct publish`` does: the relay ships it with the hooks' events."""
    def publish(events: list[tuple[str, bytes]]) -> None:
        for event_id, raw in events:
            spool.write(spool_dir, event_id, raw)

    return publish
