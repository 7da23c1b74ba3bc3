"""``openacct publish``: put events into the spool by hand, or backfill from Slurm's jobcomp records.

Every record is validated in full (``shared.events``) before it is spooled, so nothing spooled here
is parked later for its shape; what fails is kept in the spool's ``reject/`` with its reason.
"""

from __future__ import annotations

import enum
import itertools
import json
import select
import sys
import time
from collections.abc import Iterable, Iterator
from contextlib import nullcontext
from typing import IO, Annotated

import typer

from shared import spool
from shared.config import get_settings
from shared.errors import InvalidInput
from shared.events import EventRejected, parse_event
from shared.job_event import BadInput, encode
from shared.slurm import records as slurm

# Lines spooled with one fsync: a backfill of millions of lines is bounded by the disk's writes,
# not by its flushes.
BATCH = 2000


class RecordKind(enum.StrEnum):
    slurm_jobcomp = "slurm-jobcomp"
    slurm_elasticsearch = "slurm-elasticsearch"


class Skipped(Exception):
    """A record of another hook, in a file of captured hook environments."""


def publish(
    file: Annotated[str, typer.Argument(metavar="FILE|-", help="One JSON event, or JSON Lines of them; - reads standard input.")],
    from_: Annotated[RecordKind | None, typer.Option(
        "--from", help="Read scheduler records instead of events and convert each as its hook would: "
        "slurm-jobcomp reads jobcomp/script environments, one JSON object a line, bare or as {\"env\": {...}}; "
        "slurm-elasticsearch reads jobcomp/elasticsearch records, bare or as an index's {\"_source\": {...}} "
        "(the system: the record's cluster, else default_system).",
    )] = None,
) -> None:
    """Validate events and spool them for the relay; exit 1 if any was rejected."""
    settings = get_settings()
    spooled = rejected = skipped = 0
    batch: list[tuple[str, bytes]] = []
    with _open(file) as stream:
        for line, raw in _records(stream):
            try:
                data = raw if from_ is None else CONVERT[from_](raw, settings.default_system)
                event = parse_event(data)
            except Skipped:
                skipped += 1
                continue
            except (EventRejected, BadInput) as exc:
                kept = spool.reject(settings.spool_path, raw, str(exc), "publish")
                typer.echo(f"line {line}: {exc} (kept in {kept})", err=True)
                rejected += 1
                continue
            batch.append((event.event_id, data.rstrip() + b"\n"))
            # One fsync per batch, not per line; a pipe that has nothing more for now is not
            # kept waiting for the batch to fill (tail -f | openacct publish -).
            if len(batch) >= BATCH or not _more_ready(stream):
                spool.write_many(settings.spool_path, batch)
                spooled += len(batch)
                batch.clear()
        spool.write_many(settings.spool_path, batch)
        spooled += len(batch)
    typer.echo(f"spooled {spooled}, rejected {rejected}" + (f", skipped {skipped} records of other hooks" if skipped else ""))
    if rejected:
        raise typer.Exit(1)


def _more_ready(stream: IO[bytes]) -> bool:
    """Whether reading on would not wait (always, for a file)."""
    try:
        return bool(select.select([stream], [], [], 0)[0])
    except (OSError, ValueError):
        return True


def _open(file: str) -> IO[bytes] | nullcontext[IO[bytes]]:
    if file == "-":
        return nullcontext(sys.stdin.buffer)
    try:
        return open(file, "rb")  # closed by the caller's with
    except OSError as exc:
        raise InvalidInput(f"cannot read {file}: {exc.strerror}") from None


def _records(stream: Iterable[bytes]) -> Iterator[tuple[int, bytes]]:
    """(line number, record) for each non-blank line of JSON Lines, read as they come (a backfill
    may be millions of lines). When the first line is not JSON by itself, the input may be one
    document pretty-printed over many lines: it is read whole, and is one record if it parses."""
    lines: Iterable[tuple[int, bytes]] = enumerate(stream, 1)
    first = next(((n, line) for n, line in lines if line.strip()), None)
    if first is None:
        return
    if _parses(first[1]):
        lines = itertools.chain([first], lines)
    else:
        buffered = [first[1], *(line for _, line in lines)]
        whole = b"".join(buffered).strip()
        if _parses(whole):
            yield first[0], whole
            return
        lines = enumerate(buffered, first[0])
    yield from ((n, line.strip()) for n, line in lines if line.strip())


def _parses(raw: bytes) -> bool:
    try:
        json.loads(raw)
        return True
    except (ValueError, RecursionError):
        return False


def _from_jobcomp(raw: bytes, default_system: str | None) -> bytes:
    """The event the jobcomp hook would have written for this record, now."""
    try:
        record = json.loads(raw)
    except (ValueError, RecursionError) as exc:
        raise BadInput(f"not JSON: {type(exc).__name__}: {exc}") from None
    if isinstance(record, dict) and isinstance(record.get("env"), dict):  # a captured hook run
        if record.get("hook", "jobcomp") != "jobcomp":
            raise Skipped
        record = record["env"]
    if not isinstance(record, dict) or not all(isinstance(v, str | int) for v in record.values()):
        raise BadInput("not a jobcomp environment: want a JSON object of variable names to strings")
    env = {str(k): str(v) for k, v in record.items()}
    return encode(slurm.jobcomp_event(env, int(time.time()), default_system, source="publish:slurm-jobcomp"))


def _from_elasticsearch(raw: bytes, default_system: str | None) -> bytes:
    """The event the receiver would have spooled for this jobcomp/elasticsearch record, now."""
    try:
        record = json.loads(raw)
    except (ValueError, RecursionError) as exc:
        raise BadInput(f"not JSON: {type(exc).__name__}: {exc}") from None
    if isinstance(record, dict) and isinstance(record.get("_source"), dict):  # a document of the index
        record = record["_source"]
    if not isinstance(record, dict):
        raise BadInput("not a jobcomp/elasticsearch record: want a JSON object")
    system = record.get("cluster") or default_system
    if not isinstance(system, str):
        raise BadInput("the record names no cluster: set default_system (OPENACCT_DEFAULT_SYSTEM)")
    event = slurm.elasticsearch_event(record, system, int(time.time()))
    return encode({**event, "source": "publish:slurm-elasticsearch"})


CONVERT = {RecordKind.slurm_jobcomp: _from_jobcomp, RecordKind.slurm_elasticsearch: _from_elasticsearch}
