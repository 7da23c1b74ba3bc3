"""What every worker does with a batch: count deliveries, apply it in one transaction, and
fall back to one event at a time when the batch as a whole fails.

A batch that keeps coming back (its worker dies on it: out of memory, killed) is parked whole
after ``max_deliveries``, so one poison message cannot stall a queue; an administrator replays
its events with ``openacct deadletter replay``.
"""

from __future__ import annotations

import gc
import json
import logging
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from typing import Any

from celery.exceptions import SoftTimeLimitExceeded
from sqlalchemy import func, update
from sqlalchemy.dialects.postgresql import insert
from sqlalchemy.exc import InterfaceError, OperationalError
from sqlalchemy.orm import Session

from shared import logs, metrics, signing
from shared.celery_app import ROUTES
from shared.config import get_settings
from shared.db import session_scope
from shared.deadletter import Parked, park, raw_bytes
from shared.events import EventRejected, parse_event
from shared.models import TaskDelivery

log = logging.getLogger("openacct.worker")

# What a message refused for its signature is parked as: kept for the record, never replayed (its
# sender sends it again, signed).
REFUSED = "refused-message"
# The database is away or restarting, or the batch ran out of time: retry the task later, it is
# not its events' fault. Each retry counts as a delivery, so a batch that never fits is parked.
RETRYABLE = (OperationalError, InterfaceError, SoftTimeLimitExceeded)


@dataclass
class Outcome:
    charged: int = 0
    recorded: int = 0
    duplicates: int = 0
    parked: int = 0
    transactions: int = 0

    def add(self, other: Outcome) -> None:
        for name, value in asdict(other).items():
            setattr(self, name, getattr(self, name) + value)


Handler = Callable[..., Outcome]


def sort_out(items: list[Any], accepted: tuple[type, ...], worker: str, source: str) -> tuple[list[tuple[Any, bytes]], list[Parked]]:
    """Parse a batch: the events this worker applies, with their raw bytes, and the rest parked
    with the reason (unreadable, invalid, or another worker's kind)."""
    events: list[tuple[Any, bytes]] = []
    parked: list[Parked] = []
    for item in items:
        raw = raw_bytes(item)
        try:
            event = parse_event(raw)
        except EventRejected as exc:
            parked.append(Parked(raw, str(exc), source=source))
            continue
        if not isinstance(event, accepted):
            parked.append(Parked(raw, f"{event.kind} events go to the {ROUTES[event.kind]}, not the {worker}",
                                 event.event_id, event.kind, source))
            continue
        events.append((event, raw))
    return events, parked


def count_delivery(delivery_id: str) -> int:
    with session_scope() as session:
        stmt = insert(TaskDelivery).values(task_id=delivery_id[:64])
        return session.execute(
            stmt.on_conflict_do_update(index_elements=["task_id"],
                                       set_={"deliveries": TaskDelivery.deliveries + 1})
            .returning(TaskDelivery.deliveries)
        ).scalar_one()


@contextmanager
def gc_paused() -> Iterator[None]:
    """Python's cycle collector off while a batch is applied, back on after.

    A batch makes hundreds of thousands of short-lived objects (events, plans, rows), freed by
    their reference counts; meanwhile the collector would walk the worker's whole heap (Celery,
    SQLAlchemy, pydantic: about a fifth of the charger's CPU). Cycles a batch makes are collected
    once it is on again. Only whoever turned it off turns it back on, so nesting, or a site that
    runs with it off, keeps what it had."""
    paused = gc.isenabled()
    if paused:
        gc.disable()
    try:
        yield
    finally:
        if paused:
            gc.enable()


def run_batch(task: Any, message: Any, handler: Handler, source: str, *, pause_gc: bool = False) -> dict[str, int]:
    """Apply one delivered batch, as the worker ``source``; counted here for every worker.
    ``pause_gc``: with the cycle collector off (``gc_paused``), for a worker whose batches are
    many small events (the charger), not long reports."""
    if pause_gc:
        with gc_paused():
            return _run_batch(task, message, handler, source)
    return _run_batch(task, message, handler, source)


def _run_batch(task: Any, message: Any, handler: Handler, source: str) -> dict[str, int]:
    started = time.monotonic()
    with logs.context(worker=source, task_id=task.request.id):
        try:
            items = signing.unseal(task.name, message)
        except signing.Refused as exc:
            metrics.batches().delivered(source, 1)
            outcome = refuse(task, message, exc, source)
        else:
            items = items if isinstance(items, list) else [items]
            metrics.batches().delivered(source, len(items))
            # Only a message signed as this very task says its events are applied: the relay lets go of them.
            outcome = apply_delivery(task, items, handler, source, tracked=signing.carries(message, task.request.id))
    metrics.batches().finished(source, outcome, time.monotonic() - started)
    return asdict(outcome)


def refuse(task: Any, message: Any, exc: signing.Refused, source: str) -> Outcome:
    """Park a message refused for its signature, for the record, and do not mark it applied: a
    batch changed on the way is shipped again as it was spooled."""
    log.error("message %s refused: %s", task.request.id, exc)
    with session_scope() as session:
        return Outcome(parked=park(session, [Parked(json.dumps(message, default=str).encode(), str(exc),
                                                    kind=REFUSED, source=source)]))


def apply_delivery(task: Any, items: list[Any], handler: Handler, source: str, *, tracked: bool) -> Outcome:
    # A retry keeps the task id, as does a redelivery after a worker died: both count.
    deliveries = count_delivery(task.request.id)
    limit = get_settings().max_deliveries
    if deliveries > limit:
        reason = (f"batch {task.request.id} was delivered {deliveries} times without completing "
                  "(its worker died, or it ran out of time or database each time); parked for an "
                  "administrator to replay")
        with session_scope() as session:
            parked = park(session, [Parked(raw_bytes(i), reason, source=source) for i in items])
            if tracked:
                mark_applied(session, task.request.id)
        log.error("%s: %d events parked", reason, parked)
        return Outcome(parked=parked)
    try:
        with session_scope() as session:
            outcome = handler(session, items, source=source)
            if tracked:
                mark_applied(session, task.request.id)
    except RETRYABLE:
        raise
    except Exception:
        log.exception("batch of %d failed as a whole; applying its events one by one", len(items))
        outcome = apply_one_by_one(items, handler, source)
        if tracked:
            with session_scope() as session:
                mark_applied(session, task.request.id)
    return outcome


def mark_applied(session: Session, delivery_id: str) -> None:
    """The task's events are applied or parked: the relay may let go of them."""
    session.execute(update(TaskDelivery).where(TaskDelivery.task_id == delivery_id[:64])
                    .values(completed_at=func.now()))


def apply_one_by_one(items: list[Any], handler: Handler, source: str) -> Outcome:
    outcome = Outcome()
    for item in items:
        try:
            with session_scope() as session:
                outcome.add(handler(session, [item], source=source))
        except RETRYABLE:
            raise
        except Exception as exc:
            with session_scope() as session:
                outcome.parked += park(session, [Parked(
                    raw_bytes(item), f"could not be applied: {type(exc).__name__}: {exc}"[:2000], source=source)])
    return outcome


