"""The charger's Celery task: thin, late-acked, retried while the database is away."""

from __future__ import annotations

from sqlalchemy.orm import configure_mappers

from services.charger.batch import charge_events
from shared.batches import RETRYABLE, run_batch
from shared.celery_app import get_app

app = get_app()
# The ORM's mappers are set up here, in the worker's parent, once: else each pool process would
# set them up again on its first batch (about 50 ms of CPU each).
configure_mappers()


@app.task(name="charger.process_batch", bind=True, autoretry_for=RETRYABLE, retry_backoff=True,
          retry_backoff_max=60, retry_jitter=True, max_retries=None)
def process_batch(self, events: list) -> dict[str, int]:  # type: ignore[no-untyped-def]
    return run_batch(self, events, charge_events, source="charger", pause_gc=True)
