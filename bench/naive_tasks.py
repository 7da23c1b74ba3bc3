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


# -- the textbook design ------------------------------------------------------------------
# What a reader would write first: a task per event; in one transaction, look up the account
# and the rate, record the job (its event id unique, so a repeat does nothing), write the charge
# and take it off a balance column. Its own three tables, with none of the ledger's checks,
# entries, inbox or triggers: less work per event than OpenAcct does, so the ratio errs in the
# baseline's favour.
TEXTBOOK_SCHEMA = """
CREATE TABLE IF NOT EXISTS textbook_jobs (event_id text PRIMARY KEY, job_id text NOT NULL,
    account text NOT NULL, username text NOT NULL, cpus int NOT NULL, seconds int NOT NULL);
CREATE TABLE IF NOT EXISTS textbook_charges (id bigserial PRIMARY KEY,
    event_id text NOT NULL REFERENCES textbook_jobs, account text NOT NULL, amount numeric NOT NULL,
    created_at timestamptz NOT NULL DEFAULT now());
CREATE TABLE IF NOT EXISTS textbook_balances (account text PRIMARY KEY, balance numeric NOT NULL);
INSERT INTO textbook_balances VALUES ('phys', 100000000), ('chem', 100000000) ON CONFLICT DO NOTHING;
"""


@app.task(name="bench.textbook_charge", acks_late=True, autoretry_for=RETRYABLE, retry_backoff=0.1,
          max_retries=None)
def textbook_charge(raw: str) -> None:
    import datetime as dt
    import json
    from decimal import Decimal

    from sqlalchemy import text

    from shared.db import engine

    event = json.loads(raw)
    seconds = int((dt.datetime.fromisoformat(event["end_time"])
                   - dt.datetime.fromisoformat(event["start_time"])).total_seconds())
    with engine().begin() as conn:
        rate = conn.execute(text("SELECT r.rate FROM service_rates r JOIN services s ON s.id = r.service_id "
                                 "WHERE s.name = 'cluster-core-hours' ORDER BY r.effective_from DESC LIMIT 1")).scalar_one()
        new = conn.execute(text("INSERT INTO textbook_jobs VALUES (:e, :j, :a, :u, :c, :s) ON CONFLICT DO NOTHING "
                                "RETURNING event_id"), {"e": event["event_id"], "j": event["job_id"],
                                                        "a": event["account"], "u": event["user"],
                                                        "c": event["cpus"], "s": seconds}).first()
        if new is None:
            return  # a repeat: charged once
        amount = (Decimal(event["cpus"] * seconds) / 3600 * rate).quantize(Decimal("0.000001"))
        conn.execute(text("INSERT INTO textbook_charges (event_id, account, amount) VALUES (:e, :a, :m)"),
                     {"e": event["event_id"], "a": event["account"], "m": amount})
        conn.execute(text("UPDATE textbook_balances SET balance = balance - :m WHERE account = :a"),
                     {"m": amount, "a": event["account"]})
