"""When the reporter last ran a task that beat schedules: the trace ``openacct health`` reads
to tell that beat is sending. Kept in task_deliveries under ``scheduled:<task>``, one row per
task counting its runs (no relay ever asks for such an id)."""

from __future__ import annotations

import datetime as dt

from sqlalchemy import func, select
from sqlalchemy.dialects.postgresql import insert
from sqlalchemy.orm import Session

from shared.models import TaskDelivery

PREFIX = "scheduled:"


def note_run(session: Session, task: str) -> None:
    stmt = insert(TaskDelivery).values(task_id=(PREFIX + task)[:64], completed_at=func.now())
    session.execute(stmt.on_conflict_do_update(
        index_elements=["task_id"], set_={"completed_at": func.now(), "deliveries": TaskDelivery.deliveries + 1}))


def last_run(session: Session) -> dt.datetime | None:
    """When the reporter last ran any scheduled task."""
    return session.scalar(select(func.max(TaskDelivery.completed_at))
                          .where(TaskDelivery.task_id.startswith(PREFIX, autoescape=True)))
