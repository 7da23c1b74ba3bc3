"""The refunder's Celery task: thin, late-acked, retried while the database is away."""

from __future__ import annotations

import logging

from services.refunder.batch import refund_events
from shared import signing
from shared.batches import RETRYABLE, run_batch
from shared.celery_app import get_app
from shared.config import get_settings

app = get_app()
SLURM_LIMITS = "reporter.slurm_limits"
log = logging.getLogger("openacct.refunder")


@app.task(name="refunder.process_batch", bind=True, autoretry_for=RETRYABLE, retry_backoff=True,
          retry_backoff_max=60, retry_jitter=True, max_retries=None)
def process_batch(self, events: list) -> dict[str, int]:  # type: ignore[no-untyped-def]
    outcome = run_batch(self, events, refund_events, source="refunder")
    if outcome["transactions"] and get_settings().slurm_limits:
        ask_for_slurm_limits()
    return outcome


def ask_for_slurm_limits() -> None:
    """In limits mode, money refunded is money Slurm may let the account spend again: the
    reporter raises its limits now rather than at the next scheduled run (which catches up if
    this message is lost)."""
    if not signing.may_send(SLURM_LIMITS):
        log.warning("refunds applied, but this worker's signing key may not ask %s: Slurm's limits rise at "
                    "the next scheduled run", SLURM_LIMITS)
        return
    app.send_task(SLURM_LIMITS, kwargs={"message": signing.seal(SLURM_LIMITS, {})}, queue="reporter",
                  routing_key="reporter")
