"""The Celery app every worker and the relay share, set up for at-least-once delivery.

Delivery is at-least-once and the effect exactly once: the workers are idempotent (inbox and
idempotency keys), so the broker may redeliver freely, and it must never drop. Hence late acks,
requeue when a worker dies, one message prefetched at a time, running tasks cancelled when the
broker connection is lost (their message comes back), a Redis visibility timeout longer than
any task may run, and on RabbitMQ publisher confirms and quorum queues with a delivery limit.
"""

from __future__ import annotations

import gc
from functools import lru_cache
from typing import Any

from celery import Celery
from celery.schedules import crontab
from celery.signals import (
    after_setup_logger,
    after_setup_task_logger,
    after_task_publish,
    beat_init,
    worker_init,
    worker_process_init,
)
from kombu import Queue

from shared import signing
from shared.config import Settings, get_settings

QUEUES = ("charger", "refunder", "reporter")
# Which queue each event kind goes to; anything unreadable goes to the charger, which parks it.
ROUTES = {"job.started": "charger", "job.completed": "charger",
          "refund.requested": "refunder", "report.requested": "reporter"}
TASKS = {"charger": "charger.process_batch", "refunder": "refunder.process_batch",
         "reporter": "reporter.process_batch"}


def broker_url(settings: Settings) -> str:
    """The configured broker, or the local instance's Redis (started if need be, and left
    running for the commands after this one: see shared/local_instance)."""
    if settings.broker_url:
        return settings.broker_url
    from shared import local_instance

    return local_instance.broker_url(settings.data_dir)


def is_amqp(url: str) -> bool:
    return url.startswith(("amqp://", "amqps://", "pyamqp://"))


def configure(app: Celery, settings: Settings) -> None:
    url = broker_url(settings)
    amqp = is_amqp(url)
    if amqp:
        # Quorum queues survive a broker node loss and count deliveries: a message delivered
        # more than max_deliveries times is dropped by RabbitMQ, so the workers park it first
        # (see shared.batches) one delivery earlier.
        queue_args = {"x-queue-type": "quorum", "x-delivery-limit": settings.max_deliveries + 1}
        transport_options: dict[str, Any] = {"confirm_publish": True}
    else:
        queue_args = {}
        transport_options = {
            "visibility_timeout": settings.broker_visibility_timeout,
            # Sweep for messages of dead workers often enough to matter with short timeouts.
            "unacked_restore_interval": max(1, min(10, settings.broker_visibility_timeout // 10)),
            "unacked_restore_throttle": 1,
            # Our messages are JSON text already: base64 on top made them a third bigger, and
            # cost the relay, Redis and the worker's main process (which decodes each twice)
            # 5-6 µs of CPU an event together. Messages already queued say their encoding.
            "body_encoding": None,
        }
    app.conf.update(
        broker_url=url,
        broker_connection_retry_on_startup=True,
        broker_transport_options=transport_options,
        task_queues=[Queue(name, routing_key=name, queue_arguments=queue_args) for name in QUEUES],
        task_routes={task: {"queue": queue, "routing_key": queue} for queue, task in TASKS.items()},
        task_default_queue="charger",
        task_serializer="json",
        accept_content=["json"],
        result_backend=None,
        task_ignore_result=True,
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        # A task killed at its hard time limit goes back to the queue; its transaction rolled back.
        task_acks_on_timeout=False,
        task_acks_on_failure=True,
        worker_prefetch_multiplier=1,
        worker_cancel_long_running_tasks_on_connection_loss=True,
        # A task may never outlive the visibility timeout, or Redis hands it to a second worker.
        task_time_limit=int(settings.broker_visibility_timeout * 0.8),
        task_soft_time_limit=int(settings.broker_visibility_timeout * 0.7),
        worker_hijack_root_logger=False,
        worker_send_task_events=True,
        task_send_sent_event=False,
        broker_pool_limit=4,
    )
    if amqp:
        app.conf.update(task_create_missing_queues=False, worker_detect_quorum_queues=True)
    if url.startswith("amqps://"):
        # kombu's default checks the broker's certificate but not that it names the broker: any
        # certificate the CAs signed would do. None: the URL's host name, checked.
        app.conf.broker_use_ssl = {"server_hostname": None}
    # What ``openacct beat`` (one instance per site) sends to the reporter, signed by beat's key.
    schedule = {"alerts": ("reporter.alerts", float(settings.alert_interval)),
                "expire-holds": ("reporter.expire_holds", float(settings.hold_expiry_interval)),
                "usage-rollup": ("reporter.rollup", cron(settings.rollup_schedule)),
                "monthly-statements": ("reporter.statements", cron(settings.statements_schedule))}
    if settings.reconcile_schedule:  # off unless configured: it needs sacct where the reporter runs
        schedule["slurm-reconcile"] = ("reporter.reconcile", cron(settings.reconcile_schedule))
    if settings.slurm_limits_schedule:  # likewise: it needs scontrol and sacctmgr there
        schedule["slurm-limits"] = ("reporter.slurm_limits", cron(settings.slurm_limits_schedule))
    app.conf.beat_schedule = {
        entry: {"task": task, "schedule": when, "kwargs": {"message": signing.seal(task, {})},
                "options": {"queue": "reporter", "routing_key": "reporter"}}
        for entry, (task, when) in schedule.items()}
    app.conf.task_routes.update({name: {"queue": "reporter", "routing_key": "reporter"}
                                 for name in ("reporter.alerts", "reporter.statements", "reporter.rollup",
                                              "reporter.expire_holds", "reporter.reconcile",
                                              "reporter.slurm_limits")})


def cron(line: str) -> crontab:
    """A cron line (minute hour day-of-month month day-of-week) as celery's schedule, whose
    arguments come in another order."""
    minute, hour, day_of_month, month_of_year, day_of_week = line.split()
    return crontab(minute=minute, hour=hour, day_of_month=day_of_month, month_of_year=month_of_year,
                   day_of_week=day_of_week)


@lru_cache(maxsize=1)
def get_app() -> Celery:
    app = Celery("openacct")
    configure(app, get_settings())
    return app


def consumers(timeout: float = 2.0) -> dict[str, list[str]]:
    """Each queue, with the workers that answer within ``timeout`` seconds that they consume it.
    By queue, not by the worker's name: ``celery worker -Q charger`` under any name is a charger."""
    replies = get_app().control.inspect(timeout=timeout).active_queues() or {}
    found: dict[str, list[str]] = {}
    for worker, queues in sorted(replies.items()):
        for name in {q.get("name") for q in queues or []} - {None}:
            found.setdefault(name, []).append(worker)
    return found


# What a worker answers from the broker when remote control is off: Flower's read-only questions
# and mingle's greeting. Every command that stops, reconfigures or burdens a worker is dropped.
READ_ONLY_COMMANDS = {"active", "active_queues", "clock", "heartbeat", "hello", "ping", "query_task",
                      "registered", "report", "reserved", "revoked", "scheduled", "stats"}


@worker_init.connect
def refuse_remote_control(sender: Any = None, **_: Any) -> None:
    """A message on the broker's control exchange needs no secret to send: unless the site lets
    them, the commands that would stop or change a worker are not there to run. Celery's own
    tasks (chord_unlock, …) take unsigned messages and OpenAcct uses none: they go too."""
    if sender is not None:
        for name in [n for n in sender.app.tasks if n.startswith("celery.")]:
            del sender.app.tasks[name]
    if get_settings().worker_remote_control:
        return
    from celery.worker.control import Panel

    for name in set(Panel.data) - READ_ONLY_COMMANDS:
        del Panel.data[name]


@worker_process_init.connect
def freeze_startup_objects(**_: Any) -> None:
    """What a process holds once started (modules, the app, the schema) lives as long as it:
    out of the collector's sight, it spares every batch a full collection over all of it."""
    gc.freeze()


@after_setup_logger.connect
@after_setup_task_logger.connect
def log_as_configured(logger: Any = None, **_: Any) -> None:
    """Celery sets up the worker's and beat's handlers; ``log_format = "json"`` makes them write
    JSON lines (the root logger's covers every line but the task logger's, which does not propagate)."""
    if logger is not None and get_settings().log_format == "json":
        from shared import logs

        logs.as_json(logger)


@beat_init.connect
def count_scheduled_sends(**_: Any) -> None:
    """In beat's process only: count what it sends, for ``openacct beat --metrics-port``."""
    after_task_publish.connect(_sent_by_beat, weak=False)


def _sent_by_beat(sender: str | None = None, **_: Any) -> None:
    import time

    from shared import metrics

    metrics.beat().sent.labels(sender or "").inc()
    metrics.beat().last_sent.set(time.time())
