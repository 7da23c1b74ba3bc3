"""Project statements: opening balance, the period's activity, closing balance.

A statement covers ``[start, end)``: its opening balance is the balance just before ``start``,
its closing balance the balance just before ``end`` (so October's closing is November's opening,
and a deposit effective at midnight on the first belongs to the month it opens). It reads the
journal, never the running totals, so it can be drawn up as of any date. Balances are what the ledger calls available (allocated − charged +
refunded − held) over the allocations in force at the moment, so besides the period's
transactions a statement shows the money that allocations brought in when they started, or took
away when they ended, during the period: with it, opening + activity = closing to the last
decimal, and closing is the ledger's own balance as of the last instant of the period.

Every project of a statement run is computed by the same three grouped queries, whatever the
number of projects.

A statement sent never changes. Once a period's statements are issued (``issue``: the reporter's
monthly files), they count only what was posted (written to the ledger) by the issue's cutoff,
``statement_settle`` seconds before it was issued (longer than any writer's transaction lasts,
so that none still committing can slip in). What is posted
later for a period that was issued, a job's charge that arrived late say, shows in the statement
of the next period as a late posting (``Line.late``), with its own effective date: the next
statement opens at the issued one's closing balance, and opening + activity = closing still holds.
"""

from __future__ import annotations

import datetime as dt
from collections import defaultdict
from dataclasses import dataclass, field
from decimal import Decimal
from typing import Any

from sqlalchemy import and_, case, false, func, select, true
from sqlalchemy.dialects.postgresql import insert
from sqlalchemy.orm import Session, aliased

from shared.ledger import AVAILABLE_EFFECT
from shared.models import (
    Account,
    Allocation,
    Job,
    LedgerEntry,
    LedgerTransaction,
    Project,
    Service,
    StatementIssued,
    User,
)

ZERO = Decimal(0)
INSTANT = dt.timedelta(microseconds=1)  # PostgreSQL's resolution: "just before"
KINDS = ("deposit", "charge", "refund", "adjustment", "transfer", "hold", "release")
POSTED = LedgerTransaction.created_at


@dataclass
class Line:
    transaction_id: int
    effective_at: dt.datetime
    kind: str
    account: str
    service: str | None
    job: str | None  # the scheduler's job id (a refund's or re-rating's: its charge's)
    user: str | None
    quantity: Decimal | None  # of the service used, in its units
    units: str | None
    rate: Decimal | None  # per unit
    description: str
    amount: Decimal  # its effect on the project's available balance
    late: bool = False  # effective in an earlier period whose statement was already issued


@dataclass
class Statement:
    project: str
    start: dt.datetime
    end: dt.datetime
    opening: Decimal = ZERO
    activity: dict[str, Decimal] = field(default_factory=lambda: dict.fromkeys(KINDS, ZERO))
    allocations_started: Decimal = ZERO  # money that became available as its allocation began
    allocations_ended: Decimal = ZERO  # money that stopped being available as its allocation ended (≤ 0)
    closing: Decimal = ZERO
    lines: list[Line] = field(default_factory=list)

    @property
    def balanced(self) -> bool:
        return self.opening + sum(self.activity.values()) + self.allocations_started + self.allocations_ended == self.closing

    def as_dict(self) -> dict[str, Any]:
        return {
            "project": self.project, "start": self.start, "end": self.end, "opening": self.opening,
            **{f"{kind}s" if kind != "refund" else "refunds": amount for kind, amount in self.activity.items()},
            "allocations_started": self.allocations_started, "allocations_ended": self.allocations_ended,
            "closing": self.closing,
            "lines": [vars(line) for line in self.lines],
        }


def statements(session: Session, start: dt.datetime, end: dt.datetime, projects: list[str] | None = None,
               *, itemized: bool = True) -> list[Statement]:
    """One statement per project (every project, or those named), for ``[start, end)``."""
    if end <= start:
        raise ValueError("a statement's end must be after its start")
    opened, closed = start - INSTANT, end - INSTANT  # the ledger's balances include their moment
    project_query = select(Project.id, Project.name).order_by(Project.name)
    if projects:
        project_query = project_query.where(Project.name.in_(projects))
    found = {pid: Statement(name, start, end) for pid, name in session.execute(project_query)}
    if not found:
        return []
    project_of = Account.project_id
    opened_by, closed_by = _cutoff(session, end=start), _cutoff(session, start=start, end=end)
    known_at_start = true() if opened_by is None else POSTED <= opened_by
    known_at_end = true() if closed_by is None else POSTED <= closed_by
    # Posted too late for the statement that covered its moment: this one shows it.
    late = false() if opened_by is None else and_(LedgerEntry.effective_at < start, POSTED > opened_by)
    in_period = and_(known_at_end, (LedgerEntry.effective_at >= start) & (LedgerEntry.effective_at < end) | late)

    # Per project and allocation (NULL: the account itself): its entries' effect up to the start
    # and up to the end, as known when each was drawn, and whether it is in force then.
    upto_start = func.coalesce(func.sum(AVAILABLE_EFFECT).filter(LedgerEntry.effective_at <= opened, known_at_start), 0)
    upto_end = func.coalesce(func.sum(AVAILABLE_EFFECT), 0)
    per_allocation = session.execute(
        select(project_of, LedgerEntry.allocation_id, upto_start, upto_end,
               Allocation.starts_at, Allocation.ends_at)
        .join(Account, Account.id == LedgerEntry.account_id)
        .join(LedgerTransaction, LedgerTransaction.id == LedgerEntry.transaction_id)
        .outerjoin(Allocation, Allocation.id == LedgerEntry.allocation_id)
        .where(project_of.in_(found), LedgerEntry.effective_at <= closed, known_at_end)
        .group_by(project_of, LedgerEntry.allocation_id, Allocation.starts_at, Allocation.ends_at)
    )
    for pid, allocation_id, before, after, starts_at, ends_at in per_allocation:
        s = found[pid]
        at_start = allocation_id is None or (starts_at <= opened and (ends_at is None or ends_at > opened))
        at_end = allocation_id is None or (starts_at <= closed and (ends_at is None or ends_at > closed))
        if at_start:
            s.opening += before
        if at_end:
            s.closing += after
        if at_end and not at_start:
            s.allocations_started += before  # deposited before the period, available within it
        elif at_start and not at_end:
            s.allocations_ended -= after  # what it held when it ended
        elif not at_start and not at_end:
            # In force at neither end: what reached it during the period (a refund to an
            # allocation that has ended, an allocation that began and ended within) lapsed.
            s.allocations_ended -= after - before

    # The period's activity by kind of transaction.
    by_kind = session.execute(
        select(project_of, LedgerTransaction.kind, func.sum(AVAILABLE_EFFECT))
        .join(Account, Account.id == LedgerEntry.account_id)
        .join(LedgerTransaction, LedgerTransaction.id == LedgerEntry.transaction_id)
        .where(project_of.in_(found), in_period)
        .group_by(project_of, LedgerTransaction.kind)
    )
    for pid, kind, amount in by_kind:
        found[pid].activity[kind] += amount

    if itemized:
        t = LedgerTransaction
        # A re-rating carries none of its charge's job, user or service, and a release its hold's:
        # they come from the transaction it refers to. Quantity and rate are the line's own.
        referred = aliased(LedgerTransaction)
        units = case((t.quantity.is_not(None), Service.units))
        described = (Account.name, Service.name, Job.job_id, User.name, t.quantity, units, t.rate, t.description)
        lines = session.execute(
            select(project_of, t.id, LedgerEntry.effective_at, t.kind, *described, func.sum(AVAILABLE_EFFECT),
                   LedgerEntry.effective_at < start)
            .join(Account, Account.id == LedgerEntry.account_id)
            .join(t, t.id == LedgerEntry.transaction_id)
            .outerjoin(referred, referred.id == t.refers_to_id)
            .outerjoin(Service, Service.id == func.coalesce(t.service_id, referred.service_id))
            .outerjoin(Job, Job.id == func.coalesce(t.job_id, referred.job_id))
            .outerjoin(User, User.id == func.coalesce(t.user_id, referred.user_id))
            .where(project_of.in_(found), in_period)
            .group_by(project_of, t.id, LedgerEntry.effective_at, t.kind, *described)
            .order_by(LedgerEntry.effective_at, t.id)
        )
        collected: dict[int, list[Line]] = defaultdict(list)
        for pid, *fields in lines:
            collected[pid].append(Line(*fields))
        for pid, project_lines in collected.items():
            found[pid].lines = project_lines
    return list(found.values())


def _cutoff(session: Session, *, end: dt.datetime, start: dt.datetime | None = None) -> dt.datetime | None:
    """What the issued statement ending at ``end`` (and starting at ``start``) counted: what was
    posted by this; None where no such statement was issued."""
    query = select(StatementIssued.cutoff).where(StatementIssued.period_end == end)
    if start is not None:
        query = query.where(StatementIssued.period_start == start)
    return session.scalar(query.order_by(StatementIssued.cutoff.desc()).limit(1))


def issue(session: Session, start: dt.datetime, end: dt.datetime, settle: int) -> dt.datetime:
    """Mark the statements of ``[start, end)`` as sent (once: issuing again keeps the first
    cutoff, so the same statements are drawn); returns what they count: what was posted up to
    ``settle`` seconds ago."""
    cutoff = func.now() - dt.timedelta(seconds=settle)
    session.execute(insert(StatementIssued).values(period_start=start, period_end=end, cutoff=cutoff)
                    .on_conflict_do_nothing())
    cutoff = _cutoff(session, start=start, end=end)
    assert cutoff is not None
    return cutoff


def month(period: str) -> tuple[dt.datetime, dt.datetime]:
    """``2026-10`` as (the instant October began, the instant it ended), in UTC."""
    try:
        year, number = (int(part) for part in period.split("-"))
        start = dt.datetime(year, number, 1, tzinfo=dt.UTC)
    except ValueError:
        raise ValueError(f"bad period {period!r}: want a month such as 2026-10") from None
    end = dt.datetime(year + number // 12, number % 12 + 1, 1, tzinfo=dt.UTC)
    return start, end
