"""Dates and times from people and config: ISO 8601, in the center's zone unless they say."""

from __future__ import annotations

import datetime as dt
from zoneinfo import ZoneInfo

from shared.errors import InvalidInput

# Clocks on cluster nodes and admin hosts drift: a time this far in the future is still "now".
CLOCK_SKEW = dt.timedelta(minutes=10)


def parse_time(value: object, what: str, zone: ZoneInfo | None = None) -> dt.datetime:
    """A timezone-aware datetime. Dates mean midnight; naive times are read in ``zone`` (UTC if
    none), so "2026-10-01" in a center on Europe/Paris means that day's midnight in Paris."""
    zone = zone or ZoneInfo("UTC")
    if isinstance(value, dt.datetime):
        moment = value
    elif isinstance(value, dt.date):
        moment = dt.datetime.combine(value, dt.time())
    elif isinstance(value, str):
        text = value.strip()
        try:
            moment = dt.datetime.fromisoformat(text.replace("Z", "+00:00") if text.endswith("Z") else text)
        except ValueError:
            raise InvalidInput(
                f"{what} {value!r} is not a date or time; use ISO 8601 such as 2026-10-01 "
                "or 2026-10-01T08:00:00+02:00"
            ) from None
    else:
        raise InvalidInput(f"{what} must be a date or time, not {type(value).__name__}")
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=zone)
    if not 1970 <= moment.year <= 9999 - 1:
        raise InvalidInput(f"{what} {value!r} is outside the years 1970 to 9998")
    return moment
