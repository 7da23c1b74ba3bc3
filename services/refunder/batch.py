"""A batch of refund requests, each applied in its own savepoint of the batch's transaction.

A request names one charge (``transaction_id``) or a job (all of its charges), and how much:
everything still refundable, an ``amount`` spread over the job's charges in proportion to what
each has left, or a ``fraction`` of what each charge costs now (as re-rated). The request's event id is its request
id: it is claimed in the inbox with its refunds, so a request delivered or sent again refunds
once, and each refund's idempotency key (``<request id>/<charge id>``) says the same to the ledger.
A request the ledger refuses (more than is left, nothing left, no such job) is parked with the
reason, and nothing of it is written.
"""

from __future__ import annotations

from dataclasses import dataclass
from decimal import ROUND_DOWN, Decimal
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from shared import inbox, ledger
from shared.batches import Outcome, sort_out
from shared.deadletter import Parked, park
from shared.errors import OpenAcctError
from shared.events import RefundRequested
from shared.models import Job, LedgerTransaction
from shared.money import money_str
from shared.rating.directory import system_named

CENT = Decimal("0.000001")


class Refused(OpenAcctError):
    """A refund request that cannot be applied as asked."""


def refund_events(session: Session, items: list[Any], *, source: str = "") -> Outcome:
    outcome = Outcome()
    requests, parked = sort_out(items, (RefundRequested,), "refunder", source)
    for request, raw in requests:
        try:
            with session.begin_nested():
                written = apply(session, request)
        except OpenAcctError as exc:  # Refused, or the ledger's own refusal
            parked.append(Parked(raw, str(exc), request.event_id, request.kind, source))
            continue
        if written is None:
            outcome.duplicates += 1
        else:
            outcome.recorded += 1
            outcome.transactions += written
    outcome.parked = park(session, parked)
    return outcome


@dataclass(frozen=True)
class ToRefund:
    """What a request refunds from: the charges it names, and what each has left to refund."""

    charges: list[LedgerTransaction]
    remaining: dict[int, Decimal]

    @property
    def left(self) -> Decimal:
        return sum(self.remaining.values(), Decimal(0))


def to_refund(session: Session, request: RefundRequested) -> ToRefund:
    """The charges a request names and what is left of each; Refused when it names nothing
    refundable (no such job, system or charge; nothing left; more than is left). ``openacct
    refund`` asks before it sends a request, and the refunder again when it applies it."""
    charges = _charges(session, request)
    found = ToRefund(charges, {c.id: ledger.refundable(session, c) for c in charges})
    what = f"transaction #{charges[0].id}" if request.transaction_id else f"job {request.job_id}"
    if found.left == 0:
        raise Refused(f"{what} has nothing left to refund: its charges were refunded in full")
    if request.amount is not None and request.amount > found.left:
        raise Refused(f"refund of {money_str(request.amount)} refused: {what} has {money_str(found.left)} left to refund")
    return found


def apply(session: Session, request: RefundRequested) -> int | None:
    """Write the refunds a request asks for; None if the request was applied before."""
    if not inbox.claim(session, [(request.event_id, request.kind)]):
        return None
    found = to_refund(session, request)
    charges = found.charges
    actor = f"refunder for {request.requester}"
    if request.fraction is not None:  # of what each charge costs now: the ledger decides it, locked
        written = [ledger.refund_share(session, charge, request.fraction, key=f"{request.event_id}/{charge.id}",
                                       reason=request.reason, actor=actor) for charge in charges]
        return sum(1 for txn in written if txn is not None)
    amounts = _amounts(request, found)
    for charge in charges:
        if amounts[charge.id] > 0:
            ledger.refund(session, charge, amounts[charge.id], key=f"{request.event_id}/{charge.id}",
                          reason=request.reason, actor=actor)
    return sum(1 for a in amounts.values() if a > 0)


def _charges(session: Session, request: RefundRequested) -> list[LedgerTransaction]:
    if request.transaction_id is not None:
        txn = session.get(LedgerTransaction, request.transaction_id)
        if txn is None:
            raise Refused(f"no transaction #{request.transaction_id}")
        if txn.kind != "charge":
            raise Refused(f"transaction #{txn.id} is a {txn.kind}, not a charge: only charges are refunded")
        return [txn]
    system = system_named(session, request.system or "")
    if system is None:
        raise Refused(f"unknown system {request.system!r} (no system or alias by that name)")
    query = select(Job).where(Job.system_id == system.id, Job.job_id == request.job_id)
    if request.submit_time is not None:
        query = query.where(Job.submit_time == request.submit_time)
    jobs = list(session.scalars(query))
    if not jobs:
        raise Refused(f"no job {request.job_id} on {system.name}")
    if len({(j.array_task_id, j.het_offset) for j in jobs}) < len(jobs):
        raise Refused(f"job id {request.job_id} on {system.name} was used by {len(jobs)} jobs: "
                      "give the submit time of the one to refund")
    charges = list(session.scalars(
        select(LedgerTransaction).where(LedgerTransaction.job_id.in_([j.id for j in jobs]),
                                        LedgerTransaction.kind == "charge")
        .order_by(LedgerTransaction.id)
    ))
    if not charges:
        raise Refused(f"job {request.job_id} on {system.name} was not charged: nothing to refund")
    return charges


def _amounts(request: RefundRequested, found: ToRefund) -> dict[int, Decimal]:
    """An amount (or all) spread over a job's charges in proportion to what each has left."""
    charges, remaining, left = found.charges, found.remaining, found.left
    if request.amount is None:
        return dict(remaining)
    # Spread over the charges in proportion to what each has left, rounded down; what rounding
    # left over goes to the first charges that still have room.
    amounts = {c.id: (request.amount * remaining[c.id] / left).quantize(CENT, ROUND_DOWN) for c in charges}
    rest = request.amount - sum(amounts.values(), Decimal(0))
    for c in charges:
        extra = min(rest, remaining[c.id] - amounts[c.id])
        amounts[c.id] += extra
        rest -= extra
    return amounts
