"""Low-balance and allocation-expiry alerts, each given once per threshold.

An alert's key says what it is about: ``low:<project>:<threshold>:<newest allocation in force>``
(a new deposit starts a new round of thresholds) or ``expiry:<allocation>:<days>``. Before an
alert goes out its key is claimed in ``alerts_sent`` in a short transaction of its own, committed
first: no transaction (nor the row it locks) stays open while a mail server or a webhook is
talked to, up to 10 s each. The outcome is recorded in a second short transaction: the channels
that took it or, when every one failed, the claim given up (``unsent``), and the alert is tried
again on the next run that finds it due. A claim whose run never recorded it (its worker died
mid-send) is taken over once ``LEASE`` has passed: the alert goes out again then, neither lost
nor sent twice in a row. So running the alert task any number of times, at once or not, gives
each alert once. When usage jumps past several thresholds at once, one alert (the highest) goes
out and the lower ones are claimed with it once it is given.
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
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from concurrent.futures import TimeoutError as FuturesTimeout
from dataclasses import dataclass, field
from decimal import Decimal
from email.message import EmailMessage
from urllib.parse import urlsplit

from sqlalchemy import ColumnElement, func, select, update
from sqlalchemy.dialects.postgresql import insert
from sqlalchemy.orm import Session

from shared import ledger
from shared.config import Settings
from shared.models import Account, AlertSent, Allocation, Project, User
from shared.money import display

log = logging.getLogger("openacct.alerts")
TIMEOUT = 10
EMAIL = re.compile(r"[^@\s,<>]+@[^@\s,<>]+")  # one plain address: nothing that could bend a header
# What ``alerts_sent.channels`` holds for an alert not given yet; once given it lists the channels
# that took it ("log" first), and a threshold passed over by a higher one holds "". ``sent_at`` is
# when the alert was claimed while it is SENDING, when it was given once it is.
SENDING = "sending"  # a run is delivering it: that run alone records the outcome
UNSENT = "unsent"  # owed, nobody delivering it: every channel failed, or a report request found it due
# A claim is its run's for this long: well past what one alert's delivery can take (10 s for each
# channel in all), so a slow run is not doubled by the next,
# and one that died mid-send (worker killed, time limit) is taken over by a later run.
LEASE = dt.timedelta(minutes=10)


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
                    f"(threshold {crossed[-1]:.0%}): {display(balance.available)} of "
                    f"{display(balance.allocated)} left."), keys, recipients))
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
                f"{display(allocation.amount)}) {when}, on {allocation.ends_at:%Y-%m-%d %H:%M} UTC."),
                [f"expiry:{allocation.id}:{d}" for d in crossed_days[::-1]], recipients))
    return alerts


def send(session: Session, settings: Settings, alerts: list[Alert]) -> list[Alert]:
    """Deliver each alert not given before, and record it; returns those delivered now.

    Each alert is claimed, then delivered with no transaction open, then its outcome recorded:
    ``send`` commits ``session`` before the first delivery, with whatever the caller did in it.
    """
    delivered = []
    for alert in alerts:
        claimed_at = _claim(session, alert)
        session.commit()  # no transaction, snapshot or row lock held while the network is slow
        if claimed_at is None:
            continue  # given before, or being sent by another run
        channels, failures = deliver(settings, alert)
        given = not (failures and channels == ["log"])
        if not given:
            log.error("alert for %s not delivered (%s); trying again on the next run", alert.project,
                      "; ".join(failures))
        _record(session, alert, claimed_at, channels if given else None)
        session.commit()
        if given:
            delivered.append(alert)
    return delivered


def owe(session: Session, alerts: list[Alert]) -> None:
    """Record ``alerts`` as owed (UNSENT), sending nothing, in the caller's transaction: for a
    caller inside a longer one (a report request applied with its batch), whose alerts then go
    out through ``send`` once that transaction is over. Those given before are left alone."""
    if alerts:
        session.execute(insert(AlertSent).values([
            {"key": a.keys[0], "project_id": a.project_id, "kind": a.kind, "message": a.message, "channels": UNSENT}
            for a in alerts]).on_conflict_do_nothing(index_elements=["key"]))


def _free() -> ColumnElement[bool]:
    """An existing claim a run may take: owed, or left SENDING by a run that is gone."""
    return (AlertSent.channels == UNSENT) | (
        (AlertSent.channels == SENDING) & (AlertSent.sent_at < func.clock_timestamp() - LEASE))


def _claim(session: Session, alert: Alert) -> dt.datetime | None:
    """Claim ``alert`` to deliver it: its key inserted as SENDING, or taken if ``_free``. Returns
    the claim's time, which tells it from a later run's, or None if it is not this run's to send."""
    # clock_timestamp, not now(): the moment of the claim, not of the transaction that made it.
    row = insert(AlertSent).values(key=alert.keys[0], project_id=alert.project_id, kind=alert.kind,
                                   message=alert.message, channels=SENDING, sent_at=func.clock_timestamp())
    claimed_at = session.scalar(row.on_conflict_do_update(
        index_elements=["key"], where=_free(),
        set_={"channels": SENDING, "sent_at": row.excluded.sent_at, "message": row.excluded.message},
    ).returning(AlertSent.sent_at))
    if claimed_at is None and session.scalar(
            select(AlertSent.channels).where(AlertSent.key == alert.keys[0])) not in (SENDING, UNSENT):
        _pass_over(session, alert)  # given before; the thresholds it passed over are claimed now too
    return claimed_at


def _record(session: Session, alert: Alert, claimed_at: dt.datetime, channels: list[str] | None) -> None:
    """The outcome of this run's claim: the channels that took the alert, or None when every one
    failed (the claim is given up: the next run that finds the alert due tries again)."""
    mine = update(AlertSent).where(AlertSent.key == alert.keys[0], AlertSent.channels == SENDING,
                                   AlertSent.sent_at == claimed_at)
    if channels is None:
        recorded = session.execute(mine.values(channels=UNSENT)).rowcount
    else:
        recorded = session.execute(mine.values(channels=",".join(channels), sent_at=func.clock_timestamp())).rowcount
        _pass_over(session, alert)
    if not recorded:  # the delivery outlasted LEASE and another run took the claim: it records its own
        log.warning("alert for %s (%s) was taken over by another run while this one sent it", alert.project,
                    alert.keys[0])


def _pass_over(session: Session, alert: Alert) -> None:
    """Claim the lower thresholds ``alert`` passed over, never to be sent on their own."""
    if len(alert.keys) > 1:
        row = insert(AlertSent).values([
            {"key": key, "project_id": alert.project_id, "kind": alert.kind, "message": alert.message}
            for key in alert.keys[1:]])
        session.execute(row.on_conflict_do_update(index_elements=["key"], where=_free(), set_={"channels": ""}))


def deliver(settings: Settings, alert: Alert) -> tuple[list[str], list[str]]:
    """Send by email (to the PI) and webhook, as configured: the channels that took it, and
    what went wrong with the others. One that failed is not tried again once another took the
    alert: a PI would rather miss the webhook than get the same email every quarter hour."""
    channels, failures = ["log"], []
    log.warning("alert for %s: %s", alert.project, alert.message)
    recipients = [r for r in alert.recipients if EMAIL.fullmatch(r)]
    if settings.smtp_url and recipients:
        try:
            _within(TIMEOUT, "the mail server", lambda: _email(settings, alert, recipients))
            channels.append("email")
        except Exception as exc:  # any failure of this channel, not just the network's
            failures.append(f"email: {type(exc).__name__}: {exc}")
    if settings.alert_webhook_url:
        try:
            _within(TIMEOUT, "the webhook", lambda: _webhook(settings.alert_webhook_url or "", alert))
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

    with _OPENER.open(request, timeout=TIMEOUT) as response:
        response.read(64 * 1024)


def _within(seconds: float, whom: str, exchange: Callable[[], None]) -> None:
    """The whole exchange within ``seconds``, not each read: a server dripping a byte at a time
    is no answer, and a claimed alert's lease must outlast its delivery. The thread is left to
    its socket's own timeout; nothing waits for it."""
    pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="alert")
    try:
        pool.submit(exchange).result(timeout=seconds)
    except FuturesTimeout:
        raise TimeoutError(f"{whom} took longer than {seconds} s to answer") from None
    finally:
        pool.shutdown(wait=False)
