"""Dead letters: events that could not be applied, kept whole with the precise reason.

Nothing is dropped: an event that fails validation or names something OpenAcct does not know is
parked here, the rest of its batch goes through, and ``openacct deadletter replay`` applies it
again once an administrator has fixed the cause.
"""

from __future__ import annotations

import base64
import json
import logging
from dataclasses import dataclass
from typing import Any

from sqlalchemy import insert, select
from sqlalchemy.orm import Session

from shared.events import MAX_EVENT_BYTES
from shared.models import ParkedEvent

# A payload bigger than any event is kept in part: its first bytes tell what it was.
MAX_PAYLOAD_BYTES = MAX_EVENT_BYTES
LOGGED_PER_BATCH = 10
log = logging.getLogger("openacct.deadletter")


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
            return _encode(item["b64"])
    if isinstance(item, str):
        return _encode(item)
    return repr(item).encode()


def _encode(text: str) -> bytes:
    # surrogateescape gives back the bytes of a payload decoded with it (``deadletter replay``);
    # other lone surrogates (a JSON "\ud800" in a broker message) become bytes that are not UTF-8.
    try:
        return text.encode("utf-8", "surrogateescape")
    except UnicodeEncodeError:
        return text.encode("utf-8", "surrogatepass")


def _clean(text: str | None, limit: int) -> str | None:
    """Text PostgreSQL can store (no NUL, no lone surrogate) within its column's length."""
    if text is None:
        return None
    text = text.replace("\x00", "\\x00").encode("utf-8", "backslashreplace").decode("utf-8")
    return text[:limit]


def park(session: Session, items: list[Parked]) -> int:
    """Park each item, unless the same event is already parked (unreplayed) for the same reason:
    a hook that fires twice must not make two dead letters to replay."""
    if not items:
        return 0
    items = [_storable(p) for p in items]
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
        rows.append({"event_id": p.event_id, "kind": p.kind, "reason": p.reason,
                     "payload": p.raw, "source": p.source})
    if rows:
        session.execute(insert(ParkedEvent), rows)
        _log_parked(rows)
    return len(rows)


def _log_parked(rows: list[dict[str, Any]]) -> None:
    """One line per parked event, with its event and job ids, up to a few per batch: a flood of
    bad input must not flood the log too (``openacct deadletter list`` has them all)."""
    for row in rows[:LOGGED_PER_BATCH]:
        log.info("event parked: %s", row["reason"],
                 extra={"event_id": row["event_id"], "job_id": _job_id(row["payload"])})
    if len(rows) > LOGGED_PER_BATCH:
        log.info("%d more events parked (openacct deadletter list)", len(rows) - LOGGED_PER_BATCH)


def _job_id(payload: bytes) -> str | None:
    try:
        job_id = json.loads(payload).get("job_id")
    except (ValueError, AttributeError, RecursionError):
        return None
    return str(job_id) if isinstance(job_id, str | int) and not isinstance(job_id, bool) else None


def _storable(p: Parked) -> Parked:
    """Hostile input must not fail the insert that parks it (and with it the whole batch)."""
    raw, reason = p.raw, p.reason
    if len(raw) > MAX_PAYLOAD_BYTES:
        raw = raw[:MAX_PAYLOAD_BYTES]
        reason = f"{reason[:3800]} (payload of {len(p.raw)} bytes truncated to its first {MAX_PAYLOAD_BYTES})"
    return Parked(raw, _clean(reason, 4000) or "", _clean(p.event_id, 200), _clean(p.kind, 64),
                  _clean(p.source, 1000) or "")
