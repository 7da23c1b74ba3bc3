"""A job event as a plain dict, in the flat JSON shape of ``shared.events``. Standard library only.

The hooks cannot afford pydantic, so this module does the cheap checks that decide whether an
event can exist at all (times in order, an id that matches the job); the charger validates the rest.
Start-up is most of a hook's time, so this imports neither ``typing`` nor ``json`` (each costs
milliseconds of every run on a slow node); ``encode`` writes the one shape an event has.
"""

from __future__ import annotations

import time

from shared.event_id import job_event_id

SCHEMA_VERSION = 1
TIME_FIELDS = ("submit_time", "start_time", "end_time")


class BadInput(ValueError):
    """The scheduler's input cannot become an event; the message says why, in one line."""


def iso_utc(epoch: int) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S+00:00", time.gmtime(epoch))


def job_event(kind: str, source: str, now: int, job: dict[str, object]) -> dict[str, object]:
    """The event for ``job``, whose times are epoch seconds (or None); ``now`` is when it was emitted."""
    submit, start, end = (job.get(name) for name in TIME_FIELDS)
    _in_order(("submit_time", submit), ("start_time", start), ("end_time", end))
    if submit is None and start is None:
        raise BadInput(f"job {job['job_id']} has neither a submit time nor a start time")
    event_id = job_event_id(kind, job["system"], job["job_id"], job.get("array_task_id"), None, submit, start)
    event = {"schema_version": SCHEMA_VERSION, "kind": kind, "event_id": event_id,
             "source": source, "emitted_at": iso_utc(now)}
    for name, value in job.items():
        event[name] = iso_utc(value) if name in TIME_FIELDS and value is not None else value
    return event


def _in_order(*times: tuple[str, int | None]) -> None:
    known = [(name, value) for name, value in times if value is not None]
    for (earlier, a), (later, b) in zip(known, known[1:], strict=False):
        if b < a:
            raise BadInput(f"{later} ({iso_utc(b)}) is before {earlier} ({iso_utc(a)})")


# What JSON requires escaped in a string; everything else, non-ASCII included, stays as it is.
_ESCAPES = {c: f"\\u{c:04x}" for c in range(0x20)} | {ord('"'): '\\"', ord("\\"): "\\\\"}


def encode(flat: dict[str, object]) -> bytes:
    """``json.dumps`` of a flat object of str, int and None, as one line, so spooled files
    concatenate into JSON Lines (``cat new/* | openacct publish -``). Text stays UTF-8: job names
    are the users' own. Raises UnicodeEncodeError for text that was not UTF-8 to begin with."""
    return ("{" + ",".join(f"{_json(k)}:{_json(v)}" for k, v in flat.items()) + "}\n").encode()


def _json(value: object) -> str:
    if value is None:
        return "null"
    if isinstance(value, int) and not isinstance(value, bool):
        return str(value)
    if isinstance(value, str):
        return '"' + value.translate(_ESCAPES) + '"'
    raise TypeError(f"an event holds text, whole numbers and null, not {type(value).__name__}")
