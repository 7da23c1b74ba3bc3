"""``openacct relay``: ships spooled events to the broker, one spool host, one relay.

A batch of spooled events becomes one task message per queue, published with confirms where the
broker has them (RabbitMQ). The relay ships the log a segment at a time (``shared.spool``): after
each batch it notes how far it got, and deletes the segment once all of it is published; events
spooled as files of their own are deleted once their batch is published. If the relay dies in
between, that part is published again and the workers' inbox drops the repeat. While the broker
is away it backs off, and the spool grows.
"""

from __future__ import annotations

import base64
import contextlib
import functools
import json
import logging
import os
import stat
import threading
import time
import uuid
from collections import defaultdict
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from celery import Celery

from shared import metrics, signing, spool
from shared.celery_app import ROUTES, TASKS

log = logging.getLogger("openacct.relay")

IDLE_POLL = 0.2
# Batches taken from one listing of the spool: listing a spool of many thousand entries costs
# more than the entries themselves if it is done again for every batch.
BATCHES_PER_LISTING = 50
DELETE_THREADS = 4
# Published and not yet applied: beyond this the relay waits, and the spool holds the rest.
MAX_UNAPPLIED_TASKS = 200
SEGMENT_BYTES = 64 * 1024 * 1024
MAX_BACKOFF = 30.0
REPORT_EVERY = 10.0


# What an event must hold to be routed to a queue other than the charger's, which takes every
# other event: one of those kinds, or a backslash (see message_item).
_MAYBE_ELSEWHERE = ("\\", *(kind for kind, queue in ROUTES.items() if queue != "charger"))


def message_item(raw: bytes) -> tuple[str, Any]:
    """The queue an event goes to, and how it travels: as text, or base64 if not UTF-8."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        return "charger", {"b64": base64.b64encode(raw).decode()}
    # Parsing the event would cost more than all the rest the relay does for it, and nearly every
    # event is a job's, for the charger. JSON without a backslash writes each string as its very
    # characters, so an event in which no kind routed elsewhere appears, nor any backslash, cannot
    # have such a kind: it goes to the charger, as parsing it would have said.
    if not any(map(text.__contains__, _MAYBE_ELSEWHERE)):  # substring tests: a regex costs 5x
        return "charger", text
    try:
        kind = json.loads(text).get("kind")
    except (ValueError, AttributeError, RecursionError):  # the charger parks it with the reason
        kind = None
    return ROUTES.get(kind, "charger") if isinstance(kind, str) else "charger", text


def _read_entry(path: str) -> bytes:
    """A spool entry's bytes, refusing anything but a regular file (a FIFO would hang us)."""
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise OSError(f"{path} is not a regular file")
        chunks = []
        left = spool.MAX_EVENT_BYTES + 1
        while left > 0 and (chunk := os.read(fd, left)):
            chunks.append(chunk)
            left -= len(chunk)
        return b"".join(chunks)
    finally:
        os.close(fd)


def _delete(paths: list[str]) -> None:
    for path in paths:
        try:
            os.unlink(path)
        except FileNotFoundError:
            pass
        except OSError as exc:  # shipped but still there: it ships again, and the inbox drops it
            log.error("cannot delete shipped spool entry %s: %s", path, exc)


@dataclass
class _Segment:
    path: str
    records: list[bytes | None]  # by position in the segment; None: set aside (too large)
    spooled: list[int]  # when each record was spooled (ns), by position: for the backlog
    next: int  # records before this one are published
    applied: int  # records before this one are applied by the workers: the progress note
    total: int
    ranges: dict[int, int] = field(default_factory=dict)  # applied ranges beyond ``applied``

    def mark_applied(self, start: int, end: int) -> bool:
        """Note a range as applied; True once the whole segment is."""
        self.ranges[start] = end
        while self.applied in self.ranges:
            self.applied = self.ranges.pop(self.applied)
        # Not fsynced: a note lost in a crash only means that part of the segment ships again.
        note = self.path + spool.PROGRESS
        try:
            with open(note + ".tmp", "w") as f:
                f.write(str(self.applied))
            os.replace(note + ".tmp", note)
        except OSError as exc:
            log.error("cannot write the progress note %s (%s): after a restart that part ships again", note, exc)
        return self.applied >= self.total


@dataclass
class _Shipment:
    """Spooled events published together; ``on_applied`` runs once every task is applied."""
    tasks: set[str]
    on_applied: Callable[[], None]


@dataclass
class _Task:
    queue: str
    items: list[Any]
    sent_at: float
    shipment: _Shipment


@dataclass
class Backlog:
    count: int
    oldest_seconds: float


class Relay:
    """Ships the spool. With ``applied`` (task ids -> those a worker has applied, from the
    database), spooled events are kept until a worker has applied them, and published again
    if none has after ``reship_after`` seconds: a broker that loses a message (a Redis
    restarted without persistence; a Redis worker killed between taking a message and
    recording it as unacknowledged, kombu#305) loses nothing. Without it, an event leaves the
    spool once the broker has it."""

    def __init__(self, app: Celery | None, spool_dir: Path, batch_size: int, *,
                 applied: Callable[[list[str]], set[str]] | None = None, reship_after: float = 3600.0) -> None:
        # Whoever can write the spool can put events in it: every way of shipping checks first.
        spool.ensure(spool_dir)
        spool.check_safe(spool_dir)
        if app is None:  # the configured one, once the spool is known safe (it may start a Redis)
            from shared.celery_app import get_app

            app = get_app()
        self.app = app
        self.spool_dir = spool_dir
        self.batch_size = batch_size
        self.applied = applied
        self.reship_after = reship_after
        self.shipped = 0
        self._listed: list[str] = []  # spool files listed and not yet published, oldest first
        self._next = 0
        # Deleting a file waits on the filesystem's journal far longer than reading it (80 µs
        # against 10 here): threads delete, in parallel, while the next batch is published.
        self._deleter = ThreadPoolExecutor(max_workers=DELETE_THREADS, thread_name_prefix="spool-delete")
        self._deleting: list[Future[None]] = []
        self._files_out: set[str] = set()  # published, not yet applied
        self._segment: _Segment | None = None  # the log segment being published
        self._segments_out: dict[str, _Segment] = {}  # published in full, not yet applied
        self._tasks: dict[str, _Task] = {}  # published, not yet applied
        self.metrics = metrics.relay()

    @property
    def unapplied(self) -> int:
        """Tasks published and not yet known to be applied."""
        return len(self._tasks)

    def ship_once(self) -> int:
        """Publish one batch of spooled events; returns how many."""
        shipped = self.ship_batch()
        self.settle()
        return shipped

    def settle(self) -> None:
        """Wait until every applied file is deleted."""
        for deleting in self._deleting:
            deleting.result()
        self._deleting.clear()

    def ship_batch(self) -> int:
        """Publish the next batch of spooled events, from ``new/`` or the log."""
        # Files first whenever no segment is half shipped, so that a busy log cannot starve them.
        if self._segment is None and (shipped := self._ship_files()):
            return shipped
        return self._ship_from_log()

    def confirm(self) -> int:
        """Let go of what the workers have applied, and publish again what they should have
        applied long ago; returns how many tasks are still out."""
        if self.applied is None or not self._tasks:
            return len(self._tasks)
        for task_id in self.applied(list(self._tasks)):
            task = self._tasks.pop(task_id)
            task.shipment.tasks.discard(task_id)
            if not task.shipment.tasks:
                task.shipment.on_applied()
        now = time.monotonic()
        for task_id, task in list(self._tasks.items()):
            if now - task.sent_at > self.reship_after:
                log.warning("task %s (%d events) not applied after %.0f s: publishing it again",
                            task_id, len(task.items), now - task.sent_at)
                try:
                    self._send(task.queue, task.items, task.shipment)
                except Exception as exc:  # the broker away: the old task stays, to be sent again later
                    log.warning("cannot publish it again yet (%s: %s)", type(exc).__name__, exc)
                    break
                del self._tasks[task_id]
                task.shipment.tasks.discard(task_id)
                self.metrics.republished.inc(len(task.items))
        return len(self._tasks)

    def _ship_from_log(self) -> int:
        while True:
            if self._segment is None:
                found = [p for p in spool.segments(self.spool_dir) if p not in self._segments_out]
                if not found:
                    spool.rotate(self.spool_dir)
                    found = [p for p in spool.segments(self.spool_dir) if p not in self._segments_out]
                    if not found:
                        return 0
                self._segment = self._load(found[0])
            segment = self._segment
            start = segment.next
            batch = segment.records[start:start + self.batch_size]
            if not batch:
                self._segment = None
                if segment.applied >= segment.total:
                    self._drop_segment(segment)
                else:
                    segment.records = []  # published in full: the tasks hold what may ship again
                    self._segments_out[segment.path] = segment
                continue
            end = start + len(batch)
            items = [message_item(raw) for raw in batch if raw is not None]
            self._publish(items, functools.partial(self._applied, segment, start, end))
            segment.next = end
            self.shipped += len(items)
            return len(items) or 1  # a batch of set-aside records still counts as progress

    def _applied(self, segment: _Segment, start: int, end: int) -> None:
        if segment.mark_applied(start, end):
            self._drop_segment(segment)

    def _drop_segment(self, segment: _Segment) -> None:
        if segment is self._segment:
            return  # still being published: dropped when its last batch is out
        self._segments_out.pop(segment.path, None)
        for path in (segment.path + spool.PROGRESS, segment.path):  # a note without its segment is litter
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)

    def _load(self, path: str) -> _Segment:
        with open(path, "rb") as f:
            records, torn = spool.read_records(f.read())
        applied = min(spool.shipped_count(path), len(records))
        events: list[bytes | None] = [raw if len(raw) <= spool.MAX_EVENT_BYTES else None for _, raw in records]
        if None in events:  # rare: the loop over a segment's records is kept for them
            for n, (_, raw) in enumerate(records):
                if events[n] is None and n >= applied:
                    self._reject(raw, f"event of {len(raw)} bytes is larger than {spool.MAX_EVENT_BYTES}")
        if not applied:  # set aside once, not again each time the relay restarts on this segment
            for offset, raw in torn:
                self._reject(raw, f"torn spool record at byte {offset} of {os.path.basename(path)} "
                                  "(a crash while it was appended): not shipped")
        return _Segment(path, events, [ns for ns, _ in records], next=applied, applied=applied, total=len(events))

    def _reject(self, raw: bytes, reason: str) -> None:
        log.error("spool: %s", reason)
        try:
            spool.reject(self.spool_dir, raw, reason, "relay")
        except OSError as exc:
            log.error("cannot keep the rejected bytes (%s): %s", reason, exc)

    def _publish(self, items: list[tuple[str, Any]], on_applied: Callable[[], Any]) -> None:
        """Publish one task per queue; ``on_applied`` runs once every one of them is applied
        (at once, when nothing confirms)."""
        by_queue: dict[str, list[Any]] = defaultdict(list)
        # What this relay's key may not ask (a refund spooled on a scheduler's host) goes to the
        # charger, which parks it for an administrator to see: refused, it would ship for ever.
        # Asked once per queue for the batch, not once per event.
        goes_to = {queue: queue if signing.may_send(task) else "charger" for queue, task in TASKS.items()}
        for queue, item in items:
            by_queue[goes_to[queue]].append(item)
        shipment = _Shipment(set(), on_applied)
        sent: list[str] = []
        try:
            for queue, batch in by_queue.items():
                sent.append(self._send(queue, batch, shipment if self.applied else None))
        except Exception:
            # Some queues have their task, not all: forget those, and the whole batch is
            # published again (the workers drop the repeats).
            for task_id in sent:
                self._tasks.pop(task_id, None)
            raise
        self.metrics.shipped.inc(len(items))
        if self.applied is None or not sent:
            on_applied()

    def _send(self, queue: str, items: list[Any], shipment: _Shipment | None) -> str:
        task_id = str(uuid.uuid4())
        self.app.send_task(TASKS[queue], args=[signing.seal(TASKS[queue], items, task_id)], queue=queue,
                           routing_key=queue, task_id=task_id,
                           retry=True, retry_policy={"max_retries": 2, "interval_start": 0.2})
        if shipment is not None:
            shipment.tasks.add(task_id)
            self._tasks[task_id] = _Task(queue, items, time.monotonic(), shipment)
        return task_id

    def _ship_files(self) -> int:
        if self._next >= len(self._listed):
            self.settle()  # a new listing must not see files already deleted
            listed = spool.pending(self.spool_dir, self.batch_size * BATCHES_PER_LISTING + len(self._files_out))
            self._listed = [p for p in listed if p not in self._files_out]
            self._next = 0
        paths = self._listed[self._next:self._next + self.batch_size]
        if not paths:
            return 0
        items: list[tuple[str, Any]] = []
        done: list[str] = []
        for path in paths:
            try:
                raw = _read_entry(path)
            except FileNotFoundError:
                continue  # another relay on this spool took it: harmless, the inbox dedupes
            except OSError as exc:  # not a file we can read: set it aside, or it blocks the spool
                self._set_aside(path, f"unreadable spool entry: {type(exc).__name__}: {exc}")
                continue
            if len(raw) > spool.MAX_EVENT_BYTES:
                size = os.path.getsize(path)
                self._set_aside(path, f"event of {size} bytes is larger than {spool.MAX_EVENT_BYTES}")
                continue
            items.append(message_item(raw))
            done.append(path)
        self._publish(items, lambda: self._delete_files(done))
        self._next += len(paths)
        if self.applied is not None:
            self._files_out.update(done)
        self.shipped += len(done)
        return len(done)

    def _delete_files(self, paths: list[str]) -> None:
        self._files_out.difference_update(paths)
        step = max(1, -(-len(paths) // DELETE_THREADS))
        self._deleting += [self._deleter.submit(_delete, paths[i:i + step]) for i in range(0, len(paths), step)]

    def _set_aside(self, path: str, reason: str) -> None:
        try:
            spool.set_aside(self.spool_dir, path, reason, "relay")
        except OSError as exc:  # cannot even move it: say so; the other events still ship
            log.error("cannot set aside spool entry %s (%s): %s", path, reason, exc)

    def backlog(self) -> Backlog:
        # What waits in the segments this relay has read is known here; reading them again costs
        # a third of shipping them. (Should a progress note have failed to be written, this says
        # what the relay knows was applied, and the note what it held before.)
        read = [*([self._segment] if self._segment else []), *self._segments_out.values()]
        return Backlog(*spool.backlog(self.spool_dir, {s.path: s.spooled[s.applied:] for s in read}))

    def run(self, stop: threading.Event) -> None:
        backoff = 0.0
        last_report = 0.0
        while not stop.is_set():
            try:
                # However long the relay is busy (or the broker away), no segment grows past
                # this: each is read whole into memory when its turn comes.
                spool.rotate(self.spool_dir, at_least=SEGMENT_BYTES)
            except OSError as exc:
                log.error("cannot rotate the spool's log: %s", exc)
            # Before publishing: the backlog matters most while the broker is away.
            if time.monotonic() - last_report >= REPORT_EVERY:
                self.write_status()
                last_report = time.monotonic()
            try:
                out = self.confirm()
            except Exception as exc:  # the database away: nothing is let go meanwhile
                log.warning("cannot confirm what the workers applied (%s: %s)", type(exc).__name__, exc)
                out = len(self._tasks)
            shipped = 0
            if out < MAX_UNAPPLIED_TASKS:  # else the workers are behind or away: let the spool hold it
                try:
                    shipped = self.ship_batch()
                    if backoff:
                        log.warning("broker is back; shipping the spool")
                    backoff = 0.0
                except Exception as exc:  # broker away, full, refusing: keep the spool, try later
                    backoff = min(MAX_BACKOFF, max(0.5, backoff * 2))
                    log.warning("cannot publish (%s: %s); retrying in %.1f s", type(exc).__name__, exc, backoff)
                    stop.wait(backoff)
                    continue
            if shipped < self.batch_size:
                self.settle()
                stop.wait(IDLE_POLL)
        self.settle()

    def write_status(self) -> None:
        """Backlog for health checks and ``openacct relay --status``: one small JSON file."""
        b = self.backlog()
        self.metrics.backlog.set(b.count)
        self.metrics.oldest.set(b.oldest_seconds)
        self.metrics.unapplied.set(len(self._tasks))
        status = {"pid": os.getpid(), "at": time.time(), "backlog": b.count,
                  "oldest_seconds": round(b.oldest_seconds, 3), "shipped": self.shipped,
                  "unapplied_tasks": len(self._tasks)}
        log.info("spool backlog %d, oldest %.1f s, shipped %d, %d tasks not yet applied",
                 b.count, b.oldest_seconds, self.shipped, len(self._tasks))
        tmp = self.spool_dir / "relay.status.tmp"
        tmp.write_text(json.dumps(status))
        tmp.replace(self.spool_dir / "relay.status")


def applied_tasks(task_ids: list[str]) -> set[str]:
    """Which of these tasks a worker has applied (``shared.batches`` marks them)."""
    from sqlalchemy import select

    from shared.db import session_scope
    from shared.models import TaskDelivery

    with session_scope() as session:
        return set(session.scalars(select(TaskDelivery.task_id).where(
            TaskDelivery.task_id.in_(task_ids), TaskDelivery.completed_at.is_not(None))))
