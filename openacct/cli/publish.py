"""``openacct publish``: put events into the spool by hand, or backfill from Slurm's jobcomp records.

Every record is validated in full (``shared.events``) before it is spooled, so nothing spooled here
is parked later for its shape; what fails is kept in the spool's ``reject/`` with its reason.
"""

from __future__ import annotations

import collections
import enum
import itertools
import json
import os
import select
import stat
import sys
import time
from collections.abc import Iterable, Iterator
from contextlib import nullcontext
from typing import IO, Annotated, Any

import typer

from shared import spool
from shared.config import get_settings
from shared.errors import InvalidInput
from shared.events import EventRejected, parse_event
from shared.job_event import BadInput
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
    counts = {"event": 0, "reject": 0, "skip": 0}
    batch: list[tuple[str, bytes]] = []
    with _open(file) as stream:
        records = _records(stream)
        # A file (a backfill of millions of lines) is converted on every core, a batch of lines at
        # a time, and spooled in its order; a pipe line by line, as its lines come.
        is_file = _is_file(stream)
        converted = (_in_parallel(records, from_, settings.default_system) if is_file
                     else (convert(line, raw, from_, settings.default_system) for line, raw in records))
        for line, kind, value in converted:
            counts[kind] += 1
            if kind == "reject":
                raw, reason = value
                kept = spool.reject(settings.spool_path, raw, reason, "publish")
                typer.echo(f"line {line}: {reason} (kept in {kept})", err=True)
            elif kind == "event":
                batch.append(value)
            # One fsync per batch, not per line; a pipe that has nothing more for now is not
            # kept waiting for the batch to fill (tail -f | openacct publish -). A file always has
            # more ready: asking it, a system call a line, was a fifth of this process's own work.
            if batch and (len(batch) >= BATCH or (not is_file and not _more_ready(stream))):
                spool.write_many(settings.spool_path, batch)
                batch.clear()
        spool.write_many(settings.spool_path, batch)
    skipped = f", skipped {counts['skip']} records of other hooks" if counts["skip"] else ""
    typer.echo(f"spooled {counts['event']}, rejected {counts['reject']}{skipped}")
    if counts["reject"]:
        raise typer.Exit(1)


Converted = tuple[int, str, Any]  # (line, "event" | "reject" | "skip", (event id, data) | (raw, reason) | None)


def convert(line: int, raw: bytes, from_: RecordKind | None, default_system: str | None) -> Converted:
    try:
        data = raw if from_ is None else CONVERT[from_](raw, default_system)
        event = parse_event(data)
    except Skipped:
        return line, "skip", None
    except (EventRejected, BadInput) as exc:
        return line, "reject", (raw, str(exc))
    except UnicodeEncodeError as exc:  # a record's text that was not UTF-8 where it counts
        return line, "reject", (raw, f"not UTF-8 text: {exc.reason} at {exc.start}")
    # A converted record is one line of JSON already; an event as given may end in anything.
    return line, "event", (event.event_id, data if from_ is not None else data.rstrip() + b"\n")


def _convert_batch(records: list[tuple[int, bytes]], from_: RecordKind | None,
                   default_system: str | None) -> list[Converted]:
    return [convert(line, raw, from_, default_system) for line, raw in records]


def _in_parallel(records: Iterator[tuple[int, bytes]], from_: RecordKind | None,
                 default_system: str | None) -> Iterator[Converted]:
    """``convert`` of every record, in their order, by a process per core, a batch each, with a
    few batches in flight (a file of millions of lines is never all in memory)."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    if cores < 2:
        yield from (convert(line, raw, from_, default_system) for line, raw in records)
        return
    from concurrent.futures import Future, ProcessPoolExecutor

    with ProcessPoolExecutor(cores) as pool:
        in_flight: collections.deque[Future[list[Converted]]] = collections.deque()
        while True:
            chunk = list(itertools.islice(records, BATCH))
            if chunk:
                in_flight.append(pool.submit(_convert_batch, chunk, from_, default_system))
            if in_flight and (not chunk or len(in_flight) > 2 * cores):
                yield from in_flight.popleft().result()
            if not chunk and not in_flight:
                return


def _is_file(stream: IO[bytes]) -> bool:
    try:
        return stat.S_ISREG(os.fstat(stream.fileno()).st_mode)
    except (OSError, ValueError, AttributeError):
        return False


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


_DECODER = json.JSONDecoder()
# What json.loads gives, by type, that a jobcomp environment may hold (bool: isinstance(True, int)).
_TEXT = {str}
_TEXT_OR_NUMBER = {str, int, bool}


def _json_record(raw: bytes) -> Any:
    """``json.loads(raw)``, or BadInput saying why it is not JSON. A record that begins an object
    and holds nothing after it (a line of a backfill, of which there are millions) is read without
    json.loads's preamble (finding the encoding, skipping whitespace); anything else, errors too,
    is left to json.loads to read or refuse with its own message."""
    # An object's "{" followed by a zero byte would be UTF-16 or UTF-32 to json.loads.
    if raw[:1] == b"{" and raw[1:2] != b"\x00":
        try:
            text = raw.decode("utf-8", "surrogatepass")  # as json.loads decodes UTF-8
            value, end = _DECODER.raw_decode(text)
        except (ValueError, RecursionError):
            pass
        else:
            if end == len(text):
                return value  # an object: the text begins with "{"
    try:
        return json.loads(raw)
    except (ValueError, RecursionError) as exc:
        raise BadInput(f"not JSON: {type(exc).__name__}: {exc}") from None


def _from_jobcomp(raw: bytes, default_system: str | None) -> bytes:
    """The event the jobcomp hook would have written for this record, now."""
    record = _json_record(raw)
    if isinstance(record, dict) and isinstance(record.get("env"), dict):  # a captured hook run
        if record.get("hook", "jobcomp") != "jobcomp":
            raise Skipped
        record = record["env"]
    if not isinstance(record, dict):
        raise BadInput("not a jobcomp environment: want a JSON object of variable names to strings")
    # JSON's names are text already: a record of text values (nearly every one) is the environment
    # as it is, without a copy; numbers (and JSON's true and false, which are ints too) become text.
    types = set(map(type, record.values()))
    if types <= _TEXT:
        env = record
    elif types <= _TEXT_OR_NUMBER:
        env = {k: str(v) for k, v in record.items()}
    else:
        raise BadInput("not a jobcomp environment: want a JSON object of variable names to strings")
    return _dump(slurm.jobcomp_event(env, int(time.time()), default_system, source="publish:slurm-jobcomp"))


def _from_elasticsearch(raw: bytes, default_system: str | None) -> bytes:
    """The event the receiver would have spooled for this jobcomp/elasticsearch record, now."""
    record = _json_record(raw)
    if isinstance(record, dict) and isinstance(record.get("_source"), dict):  # a document of the index
        record = record["_source"]
    if not isinstance(record, dict):
        raise BadInput("not a jobcomp/elasticsearch record: want a JSON object")
    system = record.get("cluster") or default_system
    if not isinstance(system, str):
        raise BadInput("the record names no cluster: set default_system (OPENACCT_DEFAULT_SYSTEM)")
    event = slurm.elasticsearch_event(record, system, int(time.time()))
    return _dump({**event, "source": "publish:slurm-elasticsearch"})


# json.dumps with options other than its defaults builds an encoder on every call; one does.
_ENCODER = json.JSONEncoder(ensure_ascii=False, separators=(",", ":"))


def _dump(event: dict[str, object]) -> bytes:
    """One line of JSON, as ``shared.job_event.encode`` writes it for the hooks (which cannot
    afford importing json), in C here: a backfill writes millions. Raises UnicodeEncodeError for
    text that was not UTF-8 to begin with."""
    return _ENCODER.encode(event).encode() + b"\n"


CONVERT = {RecordKind.slurm_jobcomp: _from_jobcomp, RecordKind.slurm_elasticsearch: _from_elasticsearch}
