"""Re-rating ("selective charging"): charges priced again at the rate in effect when they
happened, or with a discount, the difference written as adjustments that refer to each charge.

A charge's price is what it was charged plus the adjustments already referring to it, so a second
run finds nothing to change. A charge that was refunded is left alone and reported: re-pricing
it under its refund would let refunds exceed what was charged.
"""

from __future__ import annotations

import datetime as dt
from collections import defaultdict
from dataclasses import dataclass, field
from decimal import Decimal

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from shared import ledger
from shared.errors import InvalidInput
from shared.models import Account, Allocation, LedgerEntry, LedgerTransaction, Project, Service
from shared.money import money_str, round_money

ZERO = Decimal(0)


@dataclass
class ProjectRerate:
    project: str
    examined: int = 0
    changed: int = 0
    refunded_skipped: int = 0
    difference: Decimal = ZERO  # what the changed charges cost more (+) or less (−)
    adjustments: list[int] = field(default_factory=list)


def rerate(session: Session, service: Service, start: dt.datetime, end: dt.datetime, *,
           projects: list[str] | None = None, discount: Decimal = ZERO, dry_run: bool = False,
           actor: str = "") -> list[ProjectRerate]:
    if not discount.is_finite() or not ZERO <= discount < 1:
        raise InvalidInput(f"discount {discount} must be a fraction from 0 up to (not including) 1, such as 0.2")
    if end <= start:
        raise InvalidInput("the period to re-rate ends before it starts")
    query = (
        select(LedgerTransaction, Project.name)
        .join(Account, Account.id == LedgerTransaction.account_id)
        .join(Project, Project.id == Account.project_id)
        .where(LedgerTransaction.kind == "charge", LedgerTransaction.service_id == service.id,
               LedgerTransaction.effective_at >= start, LedgerTransaction.effective_at < end)
        .order_by(LedgerTransaction.id)
    )
    if projects:
        known = set(session.scalars(select(Project.name).where(Project.name.in_(projects))))
        if missing := sorted(set(projects) - known):
            raise InvalidInput(f"no project named {', '.join(map(repr, missing))}")
        query = query.where(Project.name.in_(projects))
    charges = session.execute(query).all()
    ids = [c.id for c, _ in charges]
    adjusted, adjustment_count = _referring_sums(session, ids, "adjustment")
    refunded, _ = _referring_sums(session, ids, "refund")
    results: dict[str, ProjectRerate] = {}
    factor = 1 - discount
    for charge, project in charges:
        result = results.setdefault(project, ProjectRerate(project))
        result.examined += 1
        if refunded.get(charge.id):
            result.refunded_skipped += 1
            continue
        multiplier = Decimal(str(charge.details.get("multiplier", "1")))
        target = round_money(charge.quantity * ledger.rate_at(session, service, charge.effective_at) * multiplier * factor)
        delta = target - (charge.amount + adjusted.get(charge.id, ZERO))
        if delta == 0:
            continue
        result.changed += 1
        result.difference += delta
        if dry_run:
            continue
        txn = ledger.adjust(
            session, session.get_one(Account, charge.account_id), delta, bucket="charged",
            allocation=_drawn_from(session, charge), refers_to=charge,
            # The n-th adjustment of this charge: two runs that see the same state write one;
            # a later run (another discount, then this one again) writes the next.
            key=f"rerate:{charge.id}:{adjustment_count.get(charge.id, 0) + 1}:{money_str(target)}", actor=actor,
            description=f"re-rated at {ledger.rate_at(session, service, charge.effective_at)}"
                        + (f" less {float(discount) * 100:g}%" if discount else ""),
        )
        result.adjustments.append(txn.id)
    return sorted(results.values(), key=lambda r: r.project)


def _referring_sums(session: Session, ids: list[int], kind: str) -> tuple[dict[int, Decimal], dict[int, int]]:
    """Per charge, the signed sum its adjustments (or refunds) put on their bucket, and how many
    there are."""
    sums: dict[int, Decimal] = defaultdict(lambda: ZERO)
    counts: dict[int, int] = {}
    bucket = "charged" if kind == "adjustment" else "refunded"
    for charge_id, amount, count in session.execute(
        select(LedgerTransaction.refers_to_id, func.sum(LedgerEntry.amount), func.count(func.distinct(LedgerTransaction.id)))
        .join(LedgerEntry, LedgerEntry.transaction_id == LedgerTransaction.id)
        .where(LedgerTransaction.kind == kind, LedgerTransaction.refers_to_id.in_(ids), LedgerEntry.bucket == bucket)
        .group_by(LedgerTransaction.refers_to_id)
    ):
        sums[charge_id], counts[charge_id] = amount, count
    return sums, counts


def _drawn_from(session: Session, charge: LedgerTransaction) -> Allocation | None:
    """The allocation that carried most of the charge: its adjustment goes there."""
    slices = [e for e in charge.entries if e.bucket == "charged"]
    largest = max(slices, key=lambda e: e.amount, default=None)
    if largest is None or largest.allocation_id is None:
        return None
    return session.get(Allocation, largest.allocation_id)
