"""The relay's handling of the spool, against a real Redis."""

from __future__ import annotations

import base64
import json
import os
import time
from pathlib import Path
from typing import Any

import pytest
import redis as redis_client
from celery import Celery

from shared import spool
from shared.celery_app import configure
from shared.config import Settings
from shared.relay import Relay
from tests.events import job_completed, raw


def relay_for(redis_url: str, spool_dir: Path) -> Relay:
    app = Celery("relay-test")
    configure(app, Settings(broker_url=redis_url))
    return Relay(app, spool_dir, 100)


def queued(server) -> int:  # type: ignore[no-untyped-def]
    return redis_client.Redis(unix_socket_path=str(server.socket)).llen("charger")


def test_unreadable_entries_are_set_aside_and_the_rest_ships(redis, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    spool_dir = tmp_path / "spool"
    good = job_completed(1)
    spool.write(spool_dir, good["event_id"], raw(good))
    os.mkdir(spool_dir / "new" / "00000000000000000001-a-directory.json")
    os.mkfifo(spool_dir / "new" / "00000000000000000002-a-fifo.json")
    relay = relay_for(redis.url, spool_dir)
    assert relay.ship_once() == 1  # the log's event
    assert relay.ship_once() == 0  # the files of new/: neither can be read as an event
    assert queued(redis) == 1
    assert spool.pending(spool_dir, 10) == [] and spool.backlog(spool_dir)[0] == 0
    reject = spool_dir / "reject"
    assert {p.name for p in reject.iterdir()} == {
        "00000000000000000001-a-directory.raw", "00000000000000000001-a-directory.reason",
        "00000000000000000002-a-fifo.raw", "00000000000000000002-a-fifo.reason"}
    assert "unreadable spool entry" in (reject / "00000000000000000002-a-fifo.reason").read_text()


def test_a_spool_anyone_can_write_to_is_refused(tmp_path: Path) -> None:
    spool.ensure(tmp_path)
    assert oct(os.stat(tmp_path / "new").st_mode & 0o777) == "0o770"
    spool.check_safe(tmp_path)
    os.chmod(tmp_path / "new", 0o777)
    with pytest.raises(spool.UnsafeSpool, match="writable by every user"):
        spool.check_safe(tmp_path)


@pytest.mark.skipif(os.geteuid() != 0, reason="making a folder another user's takes root")
def test_a_spool_folder_another_user_made_is_refused(tmp_path: Path) -> None:
    spool.ensure(tmp_path)
    os.chown(tmp_path / "new", 65534, -1)  # nobody's
    with pytest.raises(spool.UnsafeSpool, match="belongs to uid 65534.*someone else made it"):
        spool.check_safe(tmp_path)


@pytest.mark.skipif(os.geteuid() != 0, reason="making a folder another user's takes root")
def test_a_spool_another_user_owns_or_could_replace_is_refused(tmp_path: Path) -> None:
    spool.ensure(tmp_path / "theirs")
    for folder in (tmp_path / "theirs", *(tmp_path / "theirs").iterdir()):
        os.chown(folder, 65534, 65534)  # nobody made the whole spool: every folder agrees, still not ours
    with pytest.raises(spool.UnsafeSpool, match="belongs to uid 65534, not to this user"):
        spool.check_safe(tmp_path / "theirs")
    above = tmp_path / "shared"
    spool.ensure(above / "spool")
    os.chmod(above, 0o777)  # anyone could rename our spool away and put theirs in its place
    with pytest.raises(spool.UnsafeSpool, match="above the spool, is writable by every user"):
        spool.check_safe(above / "spool")
    os.chmod(above, 0o1777)  # as /tmp: sticky, only the owner renames
    spool.check_safe(above / "spool")
    os.chown(above, 65534, -1)
    with pytest.raises(spool.UnsafeSpool, match="above the spool, belongs to uid 65534"):
        spool.check_safe(above / "spool")


def test_a_spool_folder_that_is_a_link_is_refused(tmp_path: Path) -> None:
    spool.ensure(tmp_path / "spool")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (tmp_path / "spool" / "new").rmdir()
    (tmp_path / "spool" / "new").symlink_to(elsewhere)
    with pytest.raises(spool.UnsafeSpool, match="is not a folder but a link"):
        spool.check_safe(tmp_path / "spool")


def test_the_spool_never_writes_through_a_link_left_in_its_place(tmp_path: Path) -> None:
    spool.ensure(tmp_path)
    target = tmp_path / "victim"
    target.write_text("keep")
    (tmp_path / "log" / f"current.{os.getpid()}.new").symlink_to(target)  # where the next log is made
    spool.append(str(tmp_path), b"{}")
    assert target.read_text() == "keep"


def _relay_of_250_events(redis, tmp_path: Path, **options: Any) -> tuple[Path, set[str], Relay, Any]:  # type: ignore[no-untyped-def]
    """250 job events spooled one by one, and a relay of batches of 100 whose workers have
    applied what the returned set holds."""
    spool_dir = tmp_path / "spool"
    for n in range(250):
        event = job_completed(n)
        spool.write(spool_dir, event["event_id"], raw(event))
    applied: set[str] = set()
    app = Celery("relay-test")
    configure(app, Settings(broker_url=redis.url))
    relay = Relay(app, spool_dir, 100, applied=lambda ids: applied & set(ids), **options)
    return spool_dir, applied, relay, redis_client.Redis(unix_socket_path=str(redis.socket))


def test_events_stay_spooled_until_applied_and_ship_again_if_a_broker_lost_them(redis, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """What a worker marks applied (the database's task_deliveries, here a set) lets the relay
    drop the events; a task never applied is published again after ``reship_after``."""
    spool_dir, applied, relay, client = _relay_of_250_events(redis, tmp_path, reship_after=0.5)

    def take() -> list[str]:  # what a worker would consume: the task ids, in order
        ids = []
        while (message := client.rpop("charger")) is not None:
            ids.append(json.loads(message)["headers"]["id"])
        return ids

    assert [relay.ship_batch() for _ in range(4)] == [100, 100, 50, 0]
    first = take()
    assert len(first) == 3 and spool.backlog(spool_dir)[0] == 250  # published, nothing applied yet
    applied.update(first[:2])
    assert relay.confirm() == 1
    assert spool.backlog(spool_dir)[0] == 50  # the applied prefix is let go of
    time.sleep(0.6)
    assert relay.confirm() == 1  # the third was lost by the broker: published again
    (again,) = take()
    assert again not in first
    # A relay restarted now ships again what was not applied, and nothing applied.
    restarted = Relay(relay.app, spool_dir, 100, applied=lambda ids: applied & set(ids))
    assert restarted.ship_batch() == 50
    take()
    applied.add(again)
    relay.confirm()
    assert spool.backlog(spool_dir)[0] == 0 and list((spool_dir / "log").iterdir()) == []


def test_a_batch_published_to_only_some_queues_is_kept_whole_and_published_again(redis, tmp_path: Path, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    """The charger's part goes out, the refunder's fails (the broker went away between the two):
    the charger's part being applied must not let the refund go."""
    spool_dir = tmp_path / "spool"
    job = job_completed(1)
    spool.write(spool_dir, job["event_id"], raw(job))
    spool.write(spool_dir, "refund:r1", json.dumps({"schema_version": 1, "kind": "refund.requested",
                                                    "event_id": "refund:r1"}).encode())
    applied: set[str] = set()
    app = Celery("relay-test")
    configure(app, Settings(broker_url=redis.url))
    relay = Relay(app, spool_dir, 100, applied=lambda ids: applied & set(ids), reship_after=3600)
    real_send = app.send_task

    def broker_gone_for_refunds(name, *args, **kwargs):  # type: ignore[no-untyped-def]
        if kwargs.get("queue") == "refunder":
            raise ConnectionError("broker went away")
        return real_send(name, *args, **kwargs)

    monkeypatch.setattr(app, "send_task", broker_gone_for_refunds)
    with pytest.raises(ConnectionError):
        relay.ship_batch()
    client = redis_client.Redis(unix_socket_path=str(redis.socket))
    (charger_message,) = client.lrange("charger", 0, -1)
    applied.add(json.loads(charger_message)["headers"]["id"])  # a worker applied the charger's part
    assert relay.confirm() == 0
    assert spool.backlog(spool_dir)[0] == 2  # nothing let go: the refund was never published
    monkeypatch.setattr(app, "send_task", real_send)
    assert relay.ship_batch() == 2  # the whole batch again; the charger drops its repeat
    assert client.llen("charger") == 2 and client.llen("refunder") == 1


def test_relay_once_refuses_a_spool_anyone_can_write_to_and_ships_nothing(cli, tmp_path: Path,  # type: ignore[no-untyped-def]
                                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    from shared.config import get_settings

    spool.ensure(tmp_path)
    spool.append(str(tmp_path), b'{"forged": true}')
    os.chmod(tmp_path / "log", 0o777)
    monkeypatch.setenv("OPENACCT_SPOOL_DIR", str(tmp_path))
    get_settings.cache_clear()
    try:
        result = cli("relay", "--once")
    finally:
        monkeypatch.undo()
        get_settings.cache_clear()
    assert result.code == 1
    assert result.err.strip() == (f"error: spool {tmp_path / 'log'} is writable by every user, who could forge events: "
                                  "chmod o-w it (the hooks' user and the relay's group need access, nobody else)")
    assert spool.backlog(tmp_path)[0] == 1  # still there, shipped nowhere


def test_an_event_goes_to_the_queue_its_kind_routes_to_as_parsing_it_would_say() -> None:
    """message_item reads an event only where a kind routed away from the charger could be in
    it: whatever the event, the queue is the one parsing it says."""
    from shared.celery_app import ROUTES
    from shared.relay import message_item

    def parsed_route(data: bytes) -> str:
        try:
            kind = json.loads(data.decode()).get("kind")
        except (ValueError, AttributeError, RecursionError):
            return "charger"
        return ROUTES.get(kind, "charger") if isinstance(kind, str) else "charger"

    job = json.loads(raw(job_completed(1)))
    datas = [raw(job_completed(1)), json.dumps({**job, "name": "refund.requested"}).encode(),
             b'{"kind":"refund.requested","id":1}', b'{"kind":"report.requested"}',
             b'{"kind":"re\\u0066und.requested"}', b'{"kind":"report\\u002erequested"}',
             b'{"kind":"job.completed","kind":"refund.requested"}', b'{"kind":"refund.requested","kind":"x"}',
             b'{"kind":["refund.requested"]}', b'["refund.requested"]', b'{"kind":"refund.requested"', b"",
             b'{"kind":"job.started","name":"a\\\\b"}', b'{"kind":"no.such.kind"}']
    for data in datas:
        assert message_item(data) == (parsed_route(data), data.decode()), data
    assert message_item(b"\xff\xfe") == ("charger", {"b64": "//4="})  # not UTF-8: the charger parks it


def test_the_relay_reports_the_backlog_the_spool_holds_without_reading_its_segments_again(redis, tmp_path: Path, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    """The relay knows what waits in the segments it read; what it reports is what reading the
    spool says, as it ships, as workers apply, and as hooks spool more."""
    spool_dir, applied, relay, client = _relay_of_250_events(redis, tmp_path)
    read_again: list[int] = []  # the size of each log read
    read_records = spool.read_records

    def reported() -> tuple[int, float]:
        """The relay's backlog at a fixed now, counting the logs it read for it."""
        monkeypatch.setattr(spool.time, "time_ns", lambda: 2_000_000_000_000_000_000)
        monkeypatch.setattr(spool, "read_records", lambda data: (read_again.append(len(data)), read_records(data))[1])
        ours = relay.backlog()
        monkeypatch.undo()
        return ours.count, ours.oldest_seconds

    def on_disk() -> tuple[int, float]:  # every segment read from disk
        monkeypatch.setattr(spool.time, "time_ns", lambda: 2_000_000_000_000_000_000)
        found = spool.backlog(spool_dir)
        monkeypatch.undo()
        return found

    assert relay.ship_batch() == 100  # the log is now a segment, read whole
    assert reported() == on_disk() and reported()[0] == 250
    for n in range(250, 260):  # hooks spool more meanwhile: a new log, read from disk
        event = job_completed(n)
        spool.write(spool_dir, event["event_id"], raw(event))
    read_again.clear()
    assert reported() == on_disk() and reported()[0] == 260
    assert len(read_again) == 2  # the new log alone, once for each report
    assert [relay.ship_batch() for _ in range(2)] == [100, 50]
    ids = []
    while (message := client.rpop("charger")) is not None:
        ids.append(json.loads(message)["headers"]["id"])
    applied.update(ids[:2])
    assert relay.confirm() == 1
    assert reported() == on_disk() and reported()[0] == 60  # the applied prefix let go of
    applied.update(ids)
    relay.confirm()
    assert reported() == on_disk() and reported()[0] == 10


def test_batches_travel_as_json_text_and_base64_ones_still_apply(redis, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """The relay's messages carry their events as JSON, not base64 over it (a third smaller,
    cheaper at both ends); a message queued by an older relay, base64, still decodes."""
    from kombu import Connection

    spool_dir = tmp_path / "spool"
    event = job_completed(1)
    spool.write(spool_dir, event["event_id"], raw(event))
    relay = relay_for(redis.url, spool_dir)
    assert relay.ship_once() == 1
    client = redis_client.Redis(unix_socket_path=str(redis.socket))
    message = json.loads(client.lindex("charger", 0))
    assert message["properties"]["body_encoding"] is None
    assert event["event_id"] in message["body"]  # the events readable as they are
    old = {**message, "body": base64.b64encode(message["body"].encode()).decode(),
           "properties": {**message["properties"], "body_encoding": "base64"}}
    client.lpush("charger", json.dumps(old))
    bodies = []
    with Connection(redis.url) as conn, conn.SimpleQueue("charger") as queue:
        for _ in range(2):
            got = queue.get(timeout=5)
            bodies.append(got.body)
            got.ack()
    assert bodies[0] == bodies[1] and event["event_id"].encode() in bodies[0]
