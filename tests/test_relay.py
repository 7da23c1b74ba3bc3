"""The relay's handling of the spool, against a real Redis."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import redis as redis_client
from celery import Celery

from shared import spool
from shared.celery_app import configure
from shared.config import Settings
from shared.relay import Relay, check_spool_permissions
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
    assert relay.ship_once() == 1
    assert queued(redis) == 1
    assert spool.pending(spool_dir, 10) == []
    reject = spool_dir / "reject"
    assert {p.name for p in reject.iterdir()} == {
        "00000000000000000001-a-directory.raw", "00000000000000000001-a-directory.reason",
        "00000000000000000002-a-fifo.raw", "00000000000000000002-a-fifo.reason"}
    assert "unreadable spool entry" in (reject / "00000000000000000002-a-fifo.reason").read_text()


def test_a_spool_anyone_can_write_to_is_refused(tmp_path: Path) -> None:
    spool.ensure(tmp_path)
    assert oct(os.stat(tmp_path / "new").st_mode & 0o777) == "0o770"
    check_spool_permissions(tmp_path)
    os.chmod(tmp_path / "new", 0o777)
    with pytest.raises(SystemExit, match="writable by every user"):
        check_spool_permissions(tmp_path)
