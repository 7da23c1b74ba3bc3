"""The spool's log: concurrent hooks appending while the relay rotates, and torn records."""

from __future__ import annotations

import multiprocessing
import os
import zlib
from pathlib import Path

from shared import spool

WRITERS, EACH = 6, 300


def _write_many(spool_dir: str, writer: int) -> None:
    for n in range(EACH):
        spool.write(spool_dir, f"w{writer}-{n}", f'{{"writer": {writer}, "n": {n}}}'.encode())


def test_every_event_appended_while_the_log_rotates_is_in_exactly_one_segment(tmp_path: Path) -> None:
    spool_dir = str(tmp_path / "spool")
    spool.ensure(spool_dir)
    context = multiprocessing.get_context("fork")
    writers = [context.Process(target=_write_many, args=(spool_dir, w)) for w in range(WRITERS)]
    for w in writers:
        w.start()
    seen: list[bytes] = []
    torn: list[tuple[int, bytes]] = []

    def drain() -> None:
        spool.rotate(spool_dir)
        for segment in spool.segments(spool_dir):
            records, broken = spool.read_records(Path(segment).read_bytes())
            seen.extend(data for _, data in records)
            torn.extend(broken)
            os.unlink(segment)

    while any(w.is_alive() for w in writers):
        drain()  # rotating as fast as it can: the worst case for the writers
    for w in writers:
        w.join()
        assert w.exitcode == 0
    drain()
    assert torn == []
    expected = {f'{{"writer": {w}, "n": {n}}}'.encode() for w in range(WRITERS) for n in range(EACH)}
    assert len(seen) == len(expected) and set(seen) == expected
    assert spool.backlog(spool_dir) == (0, 0.0)


def test_a_torn_record_is_set_apart_and_the_records_after_it_are_read(tmp_path: Path) -> None:
    whole = [spool.frame(b'{"a": 1}'), spool.frame(b'{"b": "\\nOA1 not a header"}'), spool.frame(b"x" * 100)]
    torn = whole[2][:40]  # a crash mid-append: the next hook appends after the partial record
    data = whole[0] + whole[1] + torn + whole[2]
    records, broken = spool.read_records(data)
    assert [r for _, r in records] == [b'{"a": 1}', b'{"b": "\\nOA1 not a header"}', b"x" * 100]
    assert [(offset, raw) for offset, raw in broken] == [(len(whole[0]) + len(whole[1]), torn)]


def test_a_record_whose_bytes_changed_is_not_read_as_an_event(tmp_path: Path) -> None:
    record = bytearray(spool.frame(b'{"cpus": 4}'))
    record[-3] = ord("9")  # {"cpus": 9}: the checksum no longer matches
    records, broken = spool.read_records(bytes(record))
    assert records == [] and len(broken) == 1
    assert zlib.crc32(b'{"cpus": 9}') != zlib.crc32(b'{"cpus": 4}')


def test_a_log_this_user_may_not_append_to_falls_back_to_a_file_of_its_own(tmp_path, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    """A log created by another user with a strict umask: the event still goes in, as a file."""
    spool_dir = tmp_path / "spool"
    spool.write(spool_dir, "first", b'{"n": 1}')

    def refused(*_: object) -> str:
        raise PermissionError(13, "Permission denied", str(spool_dir / "log" / "current"))

    monkeypatch.setattr(spool, "append", refused)
    where = spool.write(spool_dir, "second", b'{"n": 2}')
    assert where.startswith(str(spool_dir / "new"))
    assert spool.pending_events(spool_dir) == [b'{"n": 1}', b'{"n": 2}']


def test_events_spooled_together_are_framed_as_each_would_be_alone(tmp_path: Path, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    datas = [b'{"kind":"job.completed"}\n', b"", "caf\u00e9 \u2603".encode(), b"\nOA1 not a record", b"x" * 70_000]
    monkeypatch.setattr(spool.time, "time_ns", lambda: 1_765_000_000_123_456_789)
    assert spool._frames(datas) == b"".join(spool.frame(data) for data in datas)
    monkeypatch.undo()
    spool.write_many(tmp_path, [(str(n), data) for n, data in enumerate(datas)])
    assert spool.pending_events(tmp_path) == datas
