"""Dead letters: events that could not be applied, kept whole with the precise reason.

Nothing is dropped: an event that fails validation or names something OpenAcct does not know is
parked here, the rest of its batch goes through, and ``openacct deadletter replay`` applies it
again once an administrator has fixed the cause.
"""

from __future__ import annotations

import base64
from dataclasses import dataclass

from sqlalchemy import insert, select
from sqlalchemy.orm import Session

from shared.models import ParkedEvent


@dataclass(frozen=True)
class Parked:
    raw: bytes
    reason: str
    event_id: str | None = None
    kind: str | None = None
    source: str = ""


def raw_bytes(item: str | bytes | dict[str, str]) -> bytes:
    """An event as it travelled: text, bytes, or {"b64": ...} for bytes that are not UTF-8."""
    if isinstance(item, bytes):
        return item
    if isinstance(item, dict) and isinstance(item.get("b64"), str):
        try:
            return base64.b64decode(item["b64"], validate=True)
        except ValueError:
            return item["b64"].encode()
    if isinstance(item, str):
        return item.encode("utf-8", "surrogateescape")
    return repr(item).encode()


def park(session: Session, items: list[Parked]) -> int:
    """Park each item, unless the same event is already parked (unreplayed) for the same reason:
    a hook that fires twice must not make two dead letters to replay."""
    if not items:
        return 0
    ids = [p.event_id for p in items if p.event_id]
    known = set()
    if ids:
        known = set(session.execute(
            select(ParkedEvent.event_id, ParkedEvent.reason)
            .where(ParkedEvent.event_id.in_(ids), ParkedEvent.replayed_at.is_(None))
        ))
    rows, seen = [], set()
    for p in items:
        if p.event_id and ((p.event_id, p.reason) in known or (p.event_id, p.reason) in seen):
            continue
        seen.add((p.event_id, p.reason))
        rows.append({"event_id": p.event_id, "kind": p.kind, "reason": p.reason[:4000],
                     "payload": p.raw, "source": p.source})
    if rows:
        session.execute(insert(ParkedEvent), rows)
    return len(rows)
