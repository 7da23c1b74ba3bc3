"""``openacct relay``: ships spooled events to the broker, one spool host, one relay.

A batch of spool entries becomes one task message per queue, published with confirms where the
broker has them (RabbitMQ); entries are deleted only once every message of the batch is
published. If the relay dies between publish and delete, the batch is published again and the
workers' inbox drops the repeat. While the broker is away it backs off, and the spool grows.
"""

from __future__ import annotations

import base64
import json
import logging
import os
import stat
import threading
import time
from collections import defaultdict
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from celery import Celery

from shared import spool
from shared.celery_app import ROUTES, TASKS

log = logging.getLogger("openacct.relay")

IDLE_POLL = 0.2
# Batches taken from one listing of the spool: listing a spool of many thousand entries costs
# more than the entries themselves if it is done again for every batch.
BATCHES_PER_LISTING = 50
DELETE_THREADS = 4
MAX_BACKOFF = 30.0
REPORT_EVERY = 10.0


def message_item(raw: bytes) -> tuple[str, Any]:
    """The queue an event goes to, and how it travels: as text, or base64 if not UTF-8."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        return "charger", {"b64": base64.b64encode(raw).decode()}
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


def check_spool_permissions(spool_dir: Path) -> None:
    """Whoever can write the spool can put events in it: refuse to ship from a spool that
    anyone on the host can write to."""
    for part in (spool.NEW, spool.TMP):
        mode = os.stat(spool_dir / part).st_mode
        if mode & stat.S_IWOTH:
            raise SystemExit(f"spool {spool_dir / part} is writable by every user, who could forge "
                             "events: chmod o-w it (the relay and the hooks' user need access, nobody else)")


@dataclass
class Backlog:
    count: int
    oldest_seconds: float


class Relay:
    def __init__(self, app: Celery, spool_dir: Path, batch_size: int) -> None:
        self.app = app
        self.spool_dir = spool_dir
        self.batch_size = batch_size
        self.shipped = 0
        self._listed: list[str] = []  # spool entries listed and not yet shipped, oldest first
        self._next = 0
        # Deleting a shipped entry waits on the filesystem's journal far longer than reading it
        # (80 µs against 10 here): threads delete one batch, in parallel, while the next is
        # read and published.
        self._deleter = ThreadPoolExecutor(max_workers=DELETE_THREADS, thread_name_prefix="spool-delete")
        self._deleting: list[Future[None]] = []

    def ship_once(self) -> int:
        """Publish one batch of spooled events and delete it; returns how many left the spool."""
        shipped = self.ship_batch()
        self.settle()
        return shipped

    def settle(self) -> None:
        """Wait until every shipped entry is deleted."""
        for deleting in self._deleting:
            deleting.result()
        self._deleting.clear()

    def ship_batch(self) -> int:
        """Publish the next batch of spooled events; its entries are deleted in the background."""
        if self._next >= len(self._listed):
            self.settle()  # a new listing must not see entries already shipped
            self._listed = spool.pending(self.spool_dir, self.batch_size * BATCHES_PER_LISTING)
            self._next = 0
        paths = self._listed[self._next:self._next + self.batch_size]
        self._next += len(paths)
        if not paths:
            return 0
        by_queue: dict[str, list[Any]] = defaultdict(list)
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
            queue, item = message_item(raw)
            by_queue[queue].append(item)
            done.append(path)
        try:
            for queue, items in by_queue.items():
                self.app.send_task(TASKS[queue], args=[items], queue=queue, routing_key=queue,
                                   retry=True, retry_policy={"max_retries": 2, "interval_start": 0.2})
        except Exception:
            self._listed, self._next = [], 0  # list again once the broker is back
            raise
        step = -(-len(done) // DELETE_THREADS)
        self._deleting += [self._deleter.submit(_delete, done[i:i + step]) for i in range(0, len(done), step)]
        self.shipped += len(done)
        return len(done)

    def _set_aside(self, path: str, reason: str) -> None:
        try:
            spool.set_aside(self.spool_dir, path, reason, "relay")
        except OSError as exc:  # cannot even move it: say so; the other events still ship
            log.error("cannot set aside spool entry %s (%s): %s", path, reason, exc)

    def backlog(self) -> Backlog:
        return Backlog(*spool.backlog(self.spool_dir))

    def run(self, stop: threading.Event) -> None:
        spool.ensure(self.spool_dir)
        check_spool_permissions(self.spool_dir)
        backoff = 0.0
        last_report = 0.0
        while not stop.is_set():
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
            now = time.monotonic()
            if now - last_report >= REPORT_EVERY:
                self.write_status()
                last_report = now
            if shipped < self.batch_size:
                self.settle()
                stop.wait(IDLE_POLL)
        self.settle()

    def write_status(self) -> None:
        """Backlog for health checks and ``openacct relay --status``: one small JSON file."""
        b = self.backlog()
        status = {"pid": os.getpid(), "at": time.time(), "backlog": b.count,
                  "oldest_seconds": round(b.oldest_seconds, 3), "shipped": self.shipped}
        log.info("spool backlog %d, oldest %.1f s, shipped %d", b.count, b.oldest_seconds, self.shipped)
        tmp = self.spool_dir / "relay.status.tmp"
        tmp.write_text(json.dumps(status))
        tmp.replace(self.spool_dir / "relay.status")
