"""Re-rating ("selective charging"): charges priced again at the rate in effect when they
happened, or with a discount, the difference written as adjustments that refer to each charge.

A charge's price is what it was charged plus the adjustments already referring to it, so a second
run finds nothing to change. A charge that was refunded is left alone and reported: re-pricing
it under its refund would let refunds exceed what was charged.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass, field
from decimal import Decimal

from sqlalchemy import select
from sqlalchemy.orm import Session

from shared import ledger
from shared.errors import AlreadyRefunded, InvalidInput
from shared.models import Account, LedgerTransaction, Project, Service
from shared.rating.price import charged_quantity, price, rate_in, rate_tables

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
    rates = rate_tables(session, [service.id])
    results: dict[str, ProjectRerate] = {}
    for charge, project in charges:
        result = results.setdefault(project, ProjectRerate(project))
        result.examined += 1
        rate = rate_in(rates, service.id, charge.effective_at)
        if rate is None:
            raise InvalidInput(f"service {service.name!r} has no charge rate in effect at {charge.effective_at.isoformat()}")
        multiplier = Decimal(str(charge.details.get("multiplier", "1")))
        target = price(charged_quantity(charge.quantity, charge.details), rate, multiplier * (1 - discount))
        # Read again by the ledger with the account locked before it writes: this is the report.
        now = ledger.carried(session, charge)
        if now.refunded:
            result.refunded_skipped += 1
            continue
        if target == now.price:
            continue
        result.changed += 1
        result.difference += target - now.price
        if dry_run:
            continue
        try:
            txn = ledger.reprice(session, charge, target, actor=actor,
                                 description=f"re-rated at {rate}" + (f" less {(discount * 100).normalize():f}%" if discount else ""))
        except AlreadyRefunded:  # refunded since it was read
            result.changed -= 1
            result.difference -= target - now.price
            result.refunded_skipped += 1
            continue
        if txn is not None:
            result.adjustments.append(txn.id)
    return sorted(results.values(), key=lambda r: r.project)
