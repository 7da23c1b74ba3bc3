"""Alerts: each threshold once however often the task runs, delivered to a real SMTP server and
a real webhook, and tried again when delivery fails."""

from __future__ import annotations

import datetime as dt
import json
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, HTTPServer
from typing import Any

import pytest
from aiosmtpd.controller import Controller
from sqlalchemy import select

from openacct.shortcuts import charge, deposit, get_project
from services.reporter import alerts
from shared.config import Settings
from shared.db import session_scope
from shared.models import AlertSent
from tests.pipeline import free_port

UTC = dt.UTC


class Inbox:
    def __init__(self) -> None:
        self.messages: list[Any] = []

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:  # noqa: N802 - aiosmtpd's name
        self.messages.append(envelope)
        return "250 OK"


@pytest.fixture
def smtp() -> Iterator[tuple[str, Inbox]]:
    inbox = Inbox()
    port = free_port()  # the server is told its port (aiosmtpd checks it is up by connecting)
    controller = Controller(inbox, hostname="127.0.0.1", port=port)
    controller.start()
    yield f"smtp://127.0.0.1:{port}", inbox
    controller.stop()


@pytest.fixture
def webhook() -> Iterator[tuple[str, list[dict[str, Any]]]]:
    received: list[dict[str, Any]] = []

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:  # noqa: N802 - http.server's name
            received.append(json.loads(self.rfile.read(int(self.headers["Content-Length"]))))
            self.send_response(204)
            self.end_headers()

        def log_message(self, *_: Any) -> None:
            pass

    server = HTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_port}/alerts", received
    server.shutdown()


@pytest.fixture
def phys(quickstart: None) -> None:
    with session_scope() as s:
        get_project("phys").pi.email = "bob@example.org"
        s.flush()
    deposit("phys", "100", start="2026-01-01")


def run(settings: Settings) -> list[alerts.Alert]:
    with session_scope() as s:
        return alerts.send(s, settings, alerts.due(s, settings))


def use(money: str) -> None:
    charge("phys", "cluster-core-hours", str(int(float(money) / 0.05)), user="tux")


def sent_keys() -> list[str]:
    """The keys recorded as given (delivered, or passed over by a higher threshold)."""
    with session_scope() as s:
        return sorted(s.scalars(select(AlertSent.key).where(AlertSent.channels.not_in([alerts.SENDING, alerts.UNSENT]))))


@pytest.mark.usefixtures("phys")
def test_each_threshold_alerts_once_by_email_and_webhook(smtp, webhook) -> None:  # type: ignore[no-untyped-def]
    settings = Settings(smtp_url=smtp[0], alert_webhook_url=webhook[0], alert_from="hpc@example.org")
    assert run(settings) == []
    use("55")
    first = run(settings)
    assert [a.message for a in first] == [
        "Project phys has used 55% of its allocations (threshold 50%): 45.00 of 100.00 left."]
    for _ in range(3):
        assert run(settings) == []  # the task runs again and again: nothing more
    use("40")
    (second,) = run(settings)
    assert "used 95%" in second.message and "(threshold 90%)" in second.message
    assert run(settings) == []
    (inbox, hooks) = (smtp[1], webhook[1])
    assert [m.rcpt_tos for m in inbox.messages] == [["bob@example.org"], ["bob@example.org"]]
    assert inbox.messages[0].mail_from == "hpc@example.org"
    assert b"Subject: [OpenAcct] phys: allocation running low" in inbox.messages[0].content
    assert [h["message"] for h in hooks] == [a.message for a in (*first, second)]


@pytest.mark.usefixtures("phys")
def test_a_jump_past_several_thresholds_sends_the_highest_only() -> None:
    use("99")
    (alert,) = run(Settings())
    assert "(threshold 90%)" in alert.message
    assert [k.split(":")[2] for k in sent_keys()] == ["0.5", "0.9"]
    use("1")
    (full,) = run(Settings())
    assert "(threshold 100%)" in full.message
    assert run(Settings()) == []


@pytest.mark.usefixtures("phys")
def test_a_new_deposit_starts_a_new_round_of_thresholds() -> None:
    use("60")
    assert len(run(Settings())) == 1
    deposit("phys", "100")  # 60 of 200 used: under every threshold
    assert run(Settings()) == []
    use("50")  # 110 of 200
    (again,) = run(Settings())
    assert "used 55%" in again.message


@pytest.mark.usefixtures("quickstart")
def test_allocation_expiry_alerts_once_per_threshold() -> None:
    now = dt.datetime.now(UTC)
    deposit("chem", "10", start="2026-01-01", end=(now + dt.timedelta(days=5)).isoformat())
    (alert,) = run(Settings())
    assert alert.kind == "expiry" and "ends in 5 days" in alert.message
    assert run(Settings()) == []
    with session_scope() as s:
        later = alerts.due(s, Settings(), now + dt.timedelta(days=5, hours=1))
        (ended,) = alerts.send(s, Settings(), later)
    assert "has ended" in ended.message


@pytest.mark.usefixtures("phys")
def test_an_alert_that_cannot_be_delivered_is_tried_again(webhook) -> None:  # type: ignore[no-untyped-def]
    use("60")
    assert run(Settings(alert_webhook_url="http://127.0.0.1:9/nobody-listens")) == []
    assert sent_keys() == []  # not recorded: the next run tries again
    (alert,) = run(Settings(alert_webhook_url=webhook[0]))
    assert webhook[1][0]["key"] == alert.keys[0]


def test_alert_settings_are_checked() -> None:
    with pytest.raises(ValueError, match="fraction used"):
        Settings(alert_thresholds=[50])
    with pytest.raises(ValueError, match="smtp://"):
        Settings(smtp_url="mail.example.org")
    assert Settings(alert_expiry_days=[7, 30, 7]).alert_expiry_days == [30, 7]



@pytest.mark.usefixtures("phys")
def test_an_alert_one_channel_took_is_not_sent_again_when_another_failed(smtp) -> None:  # type: ignore[no-untyped-def]
    use("60")
    settings = Settings(smtp_url=smtp[0], alert_webhook_url="http://127.0.0.1:9/nobody-listens")
    assert len(run(settings)) == 1
    assert run(settings) == [] and len(smtp[1].messages) == 1  # mailed once; the webhook is not retried
    with session_scope() as s:
        (channels,) = s.scalars(select(AlertSent.channels).where(AlertSent.key.like("low:%:0.5:%")))
    assert channels == "log,email"


@pytest.mark.usefixtures("phys")
def test_an_address_that_could_bend_a_header_gets_no_mail(smtp) -> None:  # type: ignore[no-untyped-def]
    with session_scope() as s:
        get_project("phys").pi.email = "bob@example.org\nBcc: everyone@example.org"
        s.flush()
    use("60")
    assert len(run(Settings(smtp_url=smtp[0]))) == 1  # recorded and logged; nobody mailed
    assert smtp[1].messages == []


@pytest.mark.usefixtures("phys")
def test_a_password_is_never_sent_to_a_mail_server_without_starttls() -> None:
    from aiosmtpd.smtp import AuthResult

    inbox, logins = Inbox(), []

    def authenticator(server: Any, session: Any, envelope: Any, mechanism: str, data: Any) -> AuthResult:
        logins.append(data)  # what crossed the wire in the clear
        return AuthResult(success=True)

    port = free_port()
    controller = Controller(inbox, hostname="127.0.0.1", port=port, authenticator=authenticator,
                            auth_require_tls=False)  # a server that would take it without TLS
    controller.start()
    try:
        use("60")
        assert run(Settings(smtp_url=f"smtp://alerts:secret@127.0.0.1:{port}")) == []  # tried again next run
    finally:
        controller.stop()
    assert logins == [] and inbox.messages == []


@pytest.mark.usefixtures("phys")
def test_a_webhook_that_redirects_is_not_followed() -> None:
    reached: list[str] = []

    class Target(BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802 - http.server's name
            reached.append(self.path)
            self.send_response(204)
            self.end_headers()

        do_POST = do_GET  # noqa: N815

        def log_message(self, *_: Any) -> None:
            pass

    target = HTTPServer(("127.0.0.1", 0), Target)

    class Redirect(Target):
        def do_GET(self) -> None:  # noqa: N802
            self.send_response(302)
            self.send_header("Location", f"http://127.0.0.1:{target.server_port}/elsewhere")
            self.end_headers()

        do_POST = do_GET  # noqa: N815

    moved = HTTPServer(("127.0.0.1", 0), Redirect)
    for server in (target, moved):
        threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        use("60")
        assert run(Settings(alert_webhook_url=f"http://127.0.0.1:{moved.server_port}/moved")) == []
    finally:
        for server in (target, moved):
            server.shutdown()
    assert reached == []  # the redirect's target was never asked


@pytest.mark.usefixtures("phys")
def test_a_webhook_that_answers_a_byte_at_a_time_is_given_up_on_in_time(monkeypatch: pytest.MonkeyPatch) -> None:
    import time

    class Drip(BaseHTTPRequestHandler):
        def do_POST(self) -> None:  # noqa: N802 - http.server's name
            self.send_response(200)
            self.send_header("Content-Length", "100")
            self.end_headers()
            for _ in range(20):  # 100 bytes over 6 s, each well within a read's own timeout
                self.wfile.write(b"xxxxx")
                self.wfile.flush()
                time.sleep(0.3)

        def log_message(self, *_: Any) -> None:
            pass

    server = HTTPServer(("127.0.0.1", 0), Drip)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    monkeypatch.setattr(alerts, "TIMEOUT", 1)
    try:
        use("60")
        started = time.monotonic()
        assert run(Settings(alert_webhook_url=f"http://127.0.0.1:{server.server_port}/slow")) == []
        assert time.monotonic() - started < 3
    finally:
        server.shutdown()


def open_transactions() -> tuple[int, list[tuple[str, str]]]:
    """From a connection of its own: how many other sessions of the test database have a
    transaction open, and the alerts' rows as committed (FOR UPDATE NOWAIT: none may be locked)."""
    import os

    import psycopg

    with psycopg.connect(os.environ["OPENACCT_DATABASE_URL"], autocommit=True) as conn:
        (count,) = conn.execute(
            "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() "
            "AND pid <> pg_backend_pid() AND backend_type = 'client backend' AND xact_start IS NOT NULL").fetchone()
        rows = conn.execute("SELECT key, channels FROM alerts_sent WHERE channels <> '' ORDER BY key "
                            "FOR UPDATE NOWAIT").fetchall()
    return count, [(key.split(":")[2], channels) for key, channels in rows]


def test_no_transaction_is_open_while_an_alert_goes_out(center, monkeypatch: pytest.MonkeyPatch) -> None:  # type: ignore[no-untyped-def]
    """A mail server and a webhook that, while they take an alert, look at the database from a
    connection of their own: the alert's claim is committed, and the reporter holds no
    transaction open (one would keep its row locks and snapshot for up to 10 s a channel).
    Through the beat's task, then through a report request (a batch, whose transaction ends first)."""
    from services.reporter import tasks
    from shared import signing
    from shared.config import get_settings

    seen: list[tuple[str, int, list[tuple[str, str]]]] = []

    class Checking(Inbox):
        async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:  # noqa: N802
            seen.append(("email", *open_transactions()))
            return await super().handle_DATA(server, session, envelope)

    class Hook(BaseHTTPRequestHandler):
        def do_POST(self) -> None:  # noqa: N802 - http.server's name
            self.rfile.read(int(self.headers["Content-Length"]))
            seen.append(("webhook", *open_transactions()))
            self.send_response(204)
            self.end_headers()

        def log_message(self, *_: Any) -> None:
            pass

    inbox, port = Checking(), free_port()
    controller = Controller(inbox, hostname="127.0.0.1", port=port)
    hook = HTTPServer(("127.0.0.1", 0), Hook)
    controller.start()
    threading.Thread(target=hook.serve_forever, daemon=True).start()
    monkeypatch.setenv("OPENACCT_SMTP_URL", f"smtp://127.0.0.1:{port}")
    monkeypatch.setenv("OPENACCT_ALERT_WEBHOOK_URL", f"http://127.0.0.1:{hook.server_port}/alerts")
    get_settings.cache_clear()
    try:
        with session_scope():
            get_project("phys").pi.email = "bob@example.org"
        charge("phys", "cluster-core-hours", "12000", user="tux")  # 600 of 1000
        assert tasks.send_alerts.apply(args=[signing.seal("reporter.alerts", {})], throw=True).get() == 1
        charge("phys", "cluster-core-hours", "7000", user="tux")  # 950 of 1000
        request = json.dumps({"schema_version": 1, "kind": "report.requested", "event_id": "r:alerts",
                              "report": "alerts", "params": {}})
        tasks.process_batch.apply(args=[signing.seal("reporter.process_batch", [request])], throw=True).get()
    finally:
        controller.stop()
        hook.shutdown()
        monkeypatch.undo()
        get_settings.cache_clear()
    given = "log,email,webhook"
    assert seen == [("email", 0, [("0.5", "sending")]), ("webhook", 0, [("0.5", "sending")]),
                    ("email", 0, [("0.5", given), ("0.9", "sending")]),
                    ("webhook", 0, [("0.5", given), ("0.9", "sending")])]
    assert open_transactions() == (0, [("0.5", given), ("0.9", given)])
    assert len(inbox.messages) == 2


@pytest.mark.usefixtures("phys")
def test_a_claim_whose_run_died_mid_send_is_taken_over_once_its_lease_is_over(webhook, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    from sqlalchemy import update

    settings = Settings(alert_webhook_url=webhook[0])
    use("60")

    def killed(*_: Any) -> Any:
        raise SystemExit("the worker is stopped mid-send")

    with monkeypatch.context() as patch:
        patch.setattr(alerts, "deliver", killed)
        with pytest.raises(SystemExit):
            run(settings)
    with session_scope() as s:
        assert list(s.execute(select(AlertSent.key, AlertSent.channels)))[0][1] == alerts.SENDING  # the claim stayed
    assert run(settings) == [] and webhook[1] == []  # not sent twice in a row: the run may still be sending
    with session_scope() as s:
        s.execute(update(AlertSent).values(sent_at=AlertSent.sent_at - alerts.LEASE))
    (again,) = run(settings)  # the lease is over: the claim is taken and the alert goes out
    assert [h["key"] for h in webhook[1]] == [again.keys[0]]
    assert run(settings) == []
    with session_scope() as s:
        assert list(s.scalars(select(AlertSent.channels))) == ["log,webhook"]
