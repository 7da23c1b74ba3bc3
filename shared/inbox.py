"""The inbox: an event is applied once. Every worker claims the ids of the events it applies in
the same database transaction as their effect, so a redelivered or repeated event finds its id
taken and changes nothing (``INSERT … ON CONFLICT DO NOTHING RETURNING``)."""

from __future__ import annotations

from collections.abc import Iterable

from sqlalchemy import select
from sqlalchemy.orm import Session

from shared import bulk
from shared.models import ProcessedEvent


def claim(session: Session, events: Iterable[tuple[str, str]]) -> set[str]:
    """Claim these (event id, kind) pairs; returns the ids this call claimed (the others were
    applied before, or by a writer that committed first)."""
    # in one order for every batch, so that two claiming the same events cannot deadlock
    rows = sorted({event_id: {"event_id": event_id, "kind": kind} for event_id, kind in events}.values(),
                  key=lambda row: row["event_id"])
    return {row[0] for row in bulk.insert_rows(session, ProcessedEvent.__table__, rows,
                                               on_conflict="(event_id) DO NOTHING", returning=("event_id",))}


def applied(session: Session, event_ids: Iterable[str]) -> set[str]:
    """Which of these events were applied already."""
    return set(session.scalars(select(ProcessedEvent.event_id).where(bulk.any_of(ProcessedEvent.event_id, event_ids))))
