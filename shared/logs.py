"""How the long-running processes log: plain lines, or with ``log_format = "json"`` one JSON
object per line (time, level, logger, message, and the event id, job id and task id where the
line is about one), for a log collector that should not have to parse prose.

What a line is about comes from ``extra={"event_id": …}`` on the call, or from ``context``
around the work it logs from (a batch, an admission request).
"""

from __future__ import annotations

import datetime as dt
import json
import logging
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar

# Fields a line carries when known, in this order.
FIELDS = ("worker", "task_id", "event_id", "job_id")
_context: ContextVar[dict[str, str] | None] = ContextVar("openacct_log_context", default=None)


@contextmanager
def context(**fields: str | None) -> Iterator[None]:
    """Every line logged inside the block (by this thread) carries these fields."""
    token = _context.set({**(_context.get() or {}), **{k: v for k, v in fields.items() if v is not None}})
    try:
        yield
    finally:
        _context.reset(token)


class JsonLines(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        line: dict[str, object] = {
            "time": dt.datetime.fromtimestamp(record.created, dt.UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname, "logger": record.name, "message": record.getMessage()}
        known = _context.get() or {}
        for name in FIELDS:
            value = getattr(record, name, None) or known.get(name)
            if value is not None:
                line[name] = str(value)
        if record.exc_info:
            line["exception"] = self.formatException(record.exc_info)
        return json.dumps(line, ensure_ascii=False)


def as_json(logger: logging.Logger) -> None:
    """Make each of the logger's handlers write JSON lines (Celery sets up the handlers)."""
    for handler in logger.handlers:
        handler.setFormatter(JsonLines())


def setup(process: str, level: str) -> None:
    """Log to stderr at ``level``, in the configured format. A worker in JSON does this before
    Celery starts, which then keeps the handler: what is said before Celery's logging is up (a
    warning) is a JSON line too."""
    from shared.config import get_settings

    json_lines = get_settings().log_format == "json"
    handler = logging.StreamHandler()
    handler.setFormatter(JsonLines() if json_lines
                         else logging.Formatter(f"%(asctime)s {process} %(levelname)s %(message)s"))
    logging.basicConfig(level=level.upper(), handlers=[handler])  # unless set up already (by a test)
    logging.captureWarnings(json_lines)  # else a warning is several lines of prose on stderr
