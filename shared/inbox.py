"""The inbox: an event is applied once. Every worker claims the ids of the events it applies in
the same database transaction as their effect, so a redelivered or repeated event finds its id
taken and changes nothing (``INSERT … ON CONFLICT DO NOTHING RETURNING``)."""

from __future__ import annotations

from collections.abc import Iterable

from sqlalchemy.orm import Session

from shared import bulk
from shared.models import ProcessedEvent


def claim(session: Session, events: Iterable[tuple[str, str]]) -> set[str]:
    """Claim these (event id, kind) pairs; returns the ids this call claimed (the others were
    applied before, or by a writer that committed first)."""
    # in one order for every batch, so that two claiming the same events cannot deadlock
    kinds = dict(events)  # the last kind given for an id, as one row per id always kept
    ids = sorted(kinds)
    return {row[0] for row in bulk.insert_columns(session, ProcessedEvent.__table__,
                                                  {"event_id": ids, "kind": [kinds[i] for i in ids]},
                                                  on_conflict="(event_id) DO NOTHING", returning=("event_id",))}


def applied(session: Session, event_ids: Iterable[str]) -> set[str]:
    """Which of these events were applied already."""
    return {row[0] for row in bulk.select_where_any(session, ProcessedEvent.__table__, ("event_id",), "event_id", event_ids)}
