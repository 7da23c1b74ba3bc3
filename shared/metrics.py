"""Prometheus metrics of the long-running processes, defined here once, and how a process
serves them (``--metrics-port``).

Each kind of process makes its own metrics on first use (``batches()``, ``relay()``, …), so a
worker's page shows no relay gauges stuck at zero. A worker's batches run in Celery's prefork
children: there prometheus_client's multiprocess mode keeps each process's values in files of
one directory, which the worker's main process adds up at each scrape (see ``openacct worker``).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator
from functools import cache
from typing import TYPE_CHECKING

from prometheus_client import (
    REGISTRY,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    disable_created_metrics,
    start_http_server,
    values,
)
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.multiprocess import MultiProcessCollector
from prometheus_client.registry import Collector

if TYPE_CHECKING:
    from shared.batches import Outcome

log = logging.getLogger("openacct.metrics")

MULTIPROCESS_DIR = "PROMETHEUS_MULTIPROC_DIR"
# Events per batch: one hook's event up to the largest relay_batch_size.
BATCH_SIZES = (1, 10, 50, 100, 250, 500, 1000, 2000, 5000, 10_000, 20_000)
BATCH_SECONDS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)
DECISION_SECONDS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5)


class BatchMetrics:
    """What the workers did with the batches delivered to them (``shared.batches.run_batch``)."""

    def __init__(self) -> None:
        self.received = Counter("openacct_events_received", "Events delivered to a worker, counted at "
                                "each delivery (a batch retried counts again).", ["worker"])
        self.charged = Counter("openacct_events_charged", "Job events the charger charged.")
        self.refunded = Counter("openacct_events_refunded", "Refund requests the refunder applied.")
        self.duplicates = Counter("openacct_events_duplicate", "Events applied before, dropped by the inbox.",
                                  ["worker"])
        self.parked = Counter("openacct_events_parked", "Events parked as dead letters.", ["worker"])
        self.batch_size = Histogram("openacct_batch_events", "Events per batch delivered.", ["worker"],
                                    buckets=BATCH_SIZES)
        self.batch_seconds = Histogram("openacct_batch_duration_seconds", "Seconds a worker took over a batch "
                                       "it finished (applied or parked).", ["worker"], buckets=BATCH_SECONDS)

    def show(self, worker: str) -> None:
        """Make the worker's series exist at zero, so that rates work from its first batch."""
        for metric in (self.received, self.duplicates, self.parked, self.batch_size, self.batch_seconds):
            metric.labels(worker)

    def delivered(self, worker: str, events: int) -> None:
        self.received.labels(worker).inc(events)
        self.batch_size.labels(worker).observe(events)

    def finished(self, worker: str, outcome: Outcome, seconds: float) -> None:
        self.charged.inc(outcome.charged)
        if worker == "refunder":  # what the refunder records is a refund request applied
            self.refunded.inc(outcome.recorded)
        self.duplicates.labels(worker).inc(outcome.duplicates)
        self.parked.labels(worker).inc(outcome.parked)
        self.batch_seconds.labels(worker).observe(seconds)


class RelayMetrics:
    def __init__(self) -> None:
        self.shipped = Counter("openacct_relay_shipped_events", "Spooled events published to the broker.")
        self.republished = Counter("openacct_relay_republished_events", "Events published again because no "
                                   "worker applied them in time (a broker lost them, or the workers are away).")
        self.backlog = Gauge("openacct_relay_backlog_events", "Events waiting in the spool, at the relay's "
                             "last status report (every 10 s).")
        self.oldest = Gauge("openacct_relay_backlog_oldest_seconds", "Age of the oldest event waiting in "
                            "the spool, at the relay's last status report.")
        self.unapplied = Gauge("openacct_relay_unapplied_tasks", "Tasks published that no worker has applied yet.")


class AdmissionMetrics:
    def __init__(self) -> None:
        self.decisions = Counter("openacct_admission_decisions", "Admission requests answered, by answer.",
                                 ["decision"])
        self.seconds = Histogram("openacct_admission_decision_seconds", "Seconds from a request read to its "
                                 "answer.", buckets=DECISION_SECONDS)
        for decision in ("admit", "reject", "error"):
            self.decisions.labels(decision)


class BeatMetrics:
    def __init__(self) -> None:
        self.sent = Counter("openacct_beat_sent", "Scheduled tasks beat sent to the reporter.", ["task"])
        self.last_sent = Gauge("openacct_beat_last_sent_timestamp_seconds", "When beat last sent a task (Unix time).")


batches = cache(BatchMetrics)
relay = cache(RelayMetrics)
admission = cache(AdmissionMetrics)
beat = cache(BeatMetrics)


class HoldsOpen(Collector):
    """Holds with money still held, read from the database's open_holds at each scrape: several
    processes open, settle and expire holds, so no one process's count would be right. A small
    table (running jobs only) and a connection of its own, never the pool a prefork worker's
    children inherit."""

    @staticmethod
    def families(count: int | None = None, amount: float | None = None) -> list[GaugeMetricFamily]:
        return [GaugeMetricFamily("openacct_holds_open", "Holds with money still held.", value=count),
                GaugeMetricFamily("openacct_holds_open_amount", "Money still held by open holds.", value=amount)]

    def describe(self) -> list[GaugeMetricFamily]:
        """What it serves, without asking the database (registering asks this)."""
        return self.families()

    def collect(self) -> Iterator[GaugeMetricFamily]:
        import psycopg

        from shared.db import database_url

        url = database_url().replace("postgresql+psycopg://", "postgresql://")
        try:
            with psycopg.connect(url, connect_timeout=2, options="-c statement_timeout=2000") as conn:
                count, amount = conn.execute(
                    "SELECT count(*), coalesce(sum(remaining), 0) FROM open_holds").fetchone()  # type: ignore[misc]
        except psycopg.Error as exc:  # the series go missing from this scrape: alert on their absence
            log.warning("cannot read open holds for the metrics: %s", str(exc).strip().splitlines()[0])
            return
        yield from self.families(count, float(amount))


def serve(port: int, *collectors: Collector) -> None:
    """Serve /metrics on ``port`` from a thread of this process: this process's metrics, or under
    multiprocess mode every process's of the directory, and what ``collectors`` read at each scrape."""
    from shared.config import get_settings

    disable_created_metrics()  # a *_created series beside each one says nothing Prometheus needs
    registry: CollectorRegistry = REGISTRY
    if os.environ.get(MULTIPROCESS_DIR):
        if not values.ValueClass._multiprocess:
            raise RuntimeError(f"{MULTIPROCESS_DIR} was set after prometheus_client was imported: "
                               "the worker's children would count where nobody reads")
        registry = CollectorRegistry()
        MultiProcessCollector(registry)
    for collector in collectors:
        registry.register(collector)
    address = get_settings().metrics_address
    try:
        start_http_server(port, addr=address, registry=registry)
    except OSError as exc:
        from shared.errors import ConfigError

        raise ConfigError(f"cannot serve metrics on {address}:{port}: {exc.strerror}") from None
    log.info("metrics on http://%s:%d/metrics", address, port)
