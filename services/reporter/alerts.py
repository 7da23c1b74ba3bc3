"""Low-balance and allocation-expiry alerts, each given once per threshold.

An alert's key says what it is about: ``low:<project>:<threshold>:<newest allocation in force>``
(a new deposit starts a new round of thresholds) or ``expiry:<allocation>:<days>``. The key is
claimed (``INSERT … ON CONFLICT DO NOTHING``) in the transaction that delivers the alert, so
running the alert task any number of times gives each alert once; a delivery that fails rolls
its claim back and is tried again on the next run. When usage jumps past several thresholds at
once, one alert (the highest) goes out and the lower ones are claimed with it.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import re
import smtplib
import ssl
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from concurrent.futures import TimeoutError as FuturesTimeout
from dataclasses import dataclass, field
from decimal import Decimal
from email.message import EmailMessage
from urllib.parse import urlsplit

from sqlalchemy import func, select
from sqlalchemy.dialects.postgresql import insert
from sqlalchemy.orm import Session

from shared import ledger
from shared.config import Settings
from shared.models import Account, AlertSent, Allocation, Project, User
from shared.money import money_str

log = logging.getLogger("openacct.alerts")
TIMEOUT = 10
EMAIL = re.compile(r"[^@\s,<>]+@[^@\s,<>]+")  # one plain address: nothing that could bend a header


@dataclass
class Alert:
    project: str
    project_id: int
    kind: str  # "low_balance" or "expiry"
    message: str
    keys: list[str]  # the first is the alert itself; the rest are thresholds it passed over
    recipients: list[str] = field(default_factory=list)


def due(session: Session, settings: Settings, now: dt.datetime | None = None) -> list[Alert]:
    """The alerts whose thresholds are crossed now, sent or not (``send`` skips those sent)."""
    now = now or ledger.now()
    alerts: list[Alert] = []
    projects = session.execute(
        select(Project, User.email).join(User, User.id == Project.pi_id).where(Project.active).order_by(Project.name)
    ).all()
    for project, email in projects:
        recipients = [email] if email else []
        balance = ledger.project_balance(session, project, now)
        newest = session.scalar(
            select(func.max(Allocation.id)).join(Account, Account.id == Allocation.account_id)
            .where(Account.project_id == project.id, Allocation.starts_at <= now,
                   (Allocation.ends_at.is_(None)) | (Allocation.ends_at > now)))
        if balance.allocated > 0 and newest is not None:
            used = (balance.allocated - balance.available) / balance.allocated
            crossed = [t for t in settings.alert_thresholds if used >= Decimal(str(t))]
            if crossed:
                keys = [f"low:{project.id}:{t:g}:{newest}" for t in reversed(crossed)]
                alerts.append(Alert(project.name, project.id, "low_balance", (
                    f"Project {project.name} has used {used:.0%} of its allocations "
                    f"(threshold {crossed[-1]:.0%}): {money_str(balance.available)} of "
                    f"{money_str(balance.allocated)} left."), keys, recipients))
        ending = session.execute(
            select(Allocation, Account.name).join(Account, Account.id == Allocation.account_id)
            .where(Account.project_id == project.id, Allocation.starts_at <= now, Allocation.ends_at.is_not(None),
                   Allocation.ends_at > now - dt.timedelta(days=1))
            .order_by(Allocation.ends_at)
        ).all()
        for allocation, account in ending:
            left = allocation.ends_at - now
            crossed_days = [d for d in settings.alert_expiry_days if left <= dt.timedelta(days=d)]
            if not crossed_days:
                continue
            when = "has ended" if left <= dt.timedelta(0) else f"ends in {max(1, round(left.total_seconds() / 86400))} days"
            alerts.append(Alert(project.name, project.id, "expiry", (
                f"Allocation #{allocation.id} of account {account} (project {project.name}, "
                f"{money_str(allocation.amount)}) {when}, on {allocation.ends_at:%Y-%m-%d %H:%M} UTC."),
                [f"expiry:{allocation.id}:{d}" for d in crossed_days[::-1]], recipients))
    return alerts


def send(session: Session, settings: Settings, alerts: list[Alert]) -> list[Alert]:
    """Deliver each alert not given before, and record it; returns those delivered now."""
    delivered = []
    for alert in alerts:
        try:
            with session.begin_nested():
                claimed = session.scalars(
                    insert(AlertSent).values([
                        {"key": key, "project_id": alert.project_id, "kind": alert.kind, "message": alert.message}
                        for key in alert.keys])
                    .on_conflict_do_nothing(index_elements=["key"]).returning(AlertSent.key)
                ).all()
                if alert.keys[0] not in claimed:
                    continue  # given before; the thresholds it passed over are claimed now too
                channels, failures = deliver(settings, alert)
                if failures and channels == ["log"]:
                    raise Undelivered("; ".join(failures))  # rolls the claim back: tried again next run
                session.execute(AlertSent.__table__.update().where(AlertSent.key == alert.keys[0])
                                .values(channels=",".join(channels)))
        except Undelivered as exc:
            log.error("alert for %s not delivered (%s); trying again on the next run", alert.project, exc)
            continue
        delivered.append(alert)
    return delivered


class Undelivered(Exception):
    """Every channel configured for an alert failed."""


def deliver(settings: Settings, alert: Alert) -> tuple[list[str], list[str]]:
    """Send by email (to the PI) and webhook, as configured: the channels that took it, and
    what went wrong with the others. One that failed is not tried again once another took the
    alert: a PI would rather miss the webhook than get the same email every quarter hour."""
    channels, failures = ["log"], []
    log.warning("alert for %s: %s", alert.project, alert.message)
    recipients = [r for r in alert.recipients if EMAIL.fullmatch(r)]
    if settings.smtp_url and recipients:
        try:
            _email(settings, alert, recipients)
            channels.append("email")
        except Exception as exc:  # any failure of this channel, not just the network's
            failures.append(f"email: {type(exc).__name__}: {exc}")
    if settings.alert_webhook_url:
        try:
            _webhook(settings.alert_webhook_url, alert)
            channels.append("webhook")
        except Exception as exc:
            failures.append(f"webhook: {type(exc).__name__}: {exc}")
    return channels, failures


def _email(settings: Settings, alert: Alert, recipients: list[str]) -> None:
    message = EmailMessage()
    message["From"] = settings.alert_from
    message["To"] = ", ".join(recipients)
    message["Subject"] = f"[OpenAcct] {alert.project}: " + (
        "allocation running low" if alert.kind == "low_balance" else "allocation ending")
    message.set_content(alert.message + "\n")
    url = urlsplit(settings.smtp_url or "")
    tls = ssl.create_default_context()
    host, port = url.hostname or "localhost", url.port or (465 if url.scheme == "smtps" else 25)
    smtp = smtplib.SMTP_SSL(host, port, timeout=TIMEOUT, context=tls) if url.scheme == "smtps" \
        else smtplib.SMTP(host, port, timeout=TIMEOUT)
    with smtp:
        if url.scheme == "smtp":
            smtp.ehlo()
            if smtp.has_extn("starttls"):
                smtp.starttls(context=tls)
                smtp.ehlo()
            elif url.username:  # a password is never sent in the clear
                raise smtplib.SMTPNotSupportedError(
                    f"{host} offers no STARTTLS: the password is not sent in the clear (use smtps://)")
        if url.username:
            smtp.login(url.username, url.password or "")
        smtp.send_message(message)


class _NoRedirects(urllib.request.HTTPRedirectHandler):
    """A webhook answers where it was configured, or not at all: a redirect could send the
    alert (and the next ones) anywhere."""

    def redirect_request(self, req, fp, code, msg, headers, newurl):  # type: ignore[no-untyped-def]
        raise urllib.error.HTTPError(req.full_url, code, f"redirect to {newurl} refused", headers, fp)


_OPENER = urllib.request.build_opener(_NoRedirects)


def _webhook(url: str, alert: Alert) -> None:
    body = json.dumps({"project": alert.project, "kind": alert.kind, "key": alert.keys[0],
                       "message": alert.message}).encode()
    request = urllib.request.Request(url, data=body, method="POST", headers={"Content-Type": "application/json"})

    def exchange() -> None:
        with _OPENER.open(request, timeout=TIMEOUT) as response:
            response.read(64 * 1024)

    # TIMEOUT for the whole exchange, not per read: a server dripping a byte at a time is no answer.
    # The thread is left to its socket's own timeout; nothing waits for it.
    pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="webhook")
    try:
        pool.submit(exchange).result(timeout=TIMEOUT)
    except FuturesTimeout:
        raise TimeoutError(f"the webhook took longer than {TIMEOUT} s to answer") from None
    finally:
        pool.shutdown(wait=False)
