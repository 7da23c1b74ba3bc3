"""The baseline the ingest benchmark measures OpenAcct against: what a first version would do.

One Celery task per job event, one database transaction per task, names looked up and the charge
written row by row through the same ledger, so the difference measured is the batching alone.
"""

from __future__ import annotations

from decimal import Decimal

from openacct import shortcuts as sc
from shared import ledger
from shared.celery_app import get_app
from shared.db import session_scope
from shared.events import JobCompleted, parse_event
from shared.models import ProcessedEvent

app = get_app()
app.conf.task_routes = {"bench.naive_charge": {"queue": "naive", "routing_key": "naive"}}


@app.task(name="bench.naive_charge", acks_late=True)
def naive_charge(raw: str) -> None:
    event = parse_event(raw)
    assert isinstance(event, JobCompleted)
    with session_scope() as session:
        if session.get(ProcessedEvent, event.event_id) is not None:
            return
        session.add(ProcessedEvent(event_id=event.event_id, kind=event.kind))
        account, user = sc.get_account(event.account), sc.get_user(event.user)
        job = sc.record_job(event.system, event.job_id, submit_time=event.submit_time, user=user,
                            account=account, start_time=event.start_time, end_time=event.end_time,
                            cpus=event.cpus, state=event.state)
        quantity = (Decimal(event.cpus or 0) * Decimal(event.elapsed_seconds) / 3600).quantize(Decimal("0.000001"))
        ledger.charge(session, account, sc.get_service("cluster-core-hours"), quantity, user=user, job=job,
                      effective_at=event.end_time, key=f"{event.event_id}/cpu")
