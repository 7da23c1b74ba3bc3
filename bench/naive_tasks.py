"""The baseline the ingest benchmark measures OpenAcct against: the same charger, unbatched.

One Celery task per job event and one database transaction per task, through the very code the
charger runs (``charge_events`` on a batch of one), so the difference measured is the batching.
"""

from __future__ import annotations

from services.charger.batch import charge_events
from shared.batches import RETRYABLE
from shared.celery_app import get_app
from shared.db import session_scope

app = get_app()


@app.task(name="bench.naive_charge", acks_late=True, autoretry_for=RETRYABLE, retry_backoff=0.1, max_retries=None)
def naive_charge(raw: str) -> None:
    with session_scope() as session:
        charge_events(session, [raw], source="naive")
