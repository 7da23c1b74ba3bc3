"""What the charger's faster paths must keep: each test here fails on a way the speed-ups
could have gone wrong (issue 16: the charger's CPU per event)."""

from __future__ import annotations

import datetime as dt
import gc
import json
from decimal import Decimal

import pytest
from sqlalchemy import Connection, text

from services.charger.batch import charge_events
from shared import bulk, inbox
from shared.batches import gc_paused
from shared.db import session_scope
from shared.events import EventRejected, parse_event
from shared.jobs import JOB_KEY, _order, job_key
from shared.models import ChargeMultiplier, LedgerTransaction, ProcessedEvent, System
from tests.events import job_completed, raw


def test_job_key_spelled_out_follows_job_key_columns() -> None:
    job = {column: f"value of {column}" for column in JOB_KEY}
    assert job_key(job) == tuple(job[c] for c in JOB_KEY)
    assert job_key({}) == (None,) * len(JOB_KEY)
    assert _order(job) == tuple((True, job[c]) for c in JOB_KEY)
    assert _order({"job_id": "7"}) == tuple((c == "job_id", "7" if c == "job_id" else None) for c in JOB_KEY)


@pytest.mark.parametrize("when", ["0001-01-01T00:30:00+01:00", "9999-12-31T23:30:00-01:00"])
def test_a_time_utc_cannot_hold_is_refused_with_the_reason(when: str) -> None:
    """The bounds are checked in UTC (converted first, for speed): a time whose conversion
    overflows must be refused as implausible, not crash the batch."""
    event = json.loads(raw(job_completed(1)))
    event["end_time"] = when
    with pytest.raises(EventRejected, match=r"end_time: is not a plausible time \(before 1990 or in the future\)"):
        parse_event(json.dumps(event))


def test_times_with_offsets_are_kept_as_the_same_instant_in_utc() -> None:
    event = json.loads(raw(job_completed(1)))
    end = dt.datetime.fromisoformat(event["end_time"])
    event["end_time"] = end.astimezone(dt.timezone(dt.timedelta(hours=-7))).isoformat()
    parsed = parse_event(json.dumps(event))
    assert parsed.end_time == end and parsed.end_time.tzinfo is dt.UTC  # type: ignore[union-attr]


def test_gc_paused_gives_the_collector_back_even_on_error_and_keeps_it_off_if_it_was() -> None:
    assert gc.isenabled()
    with pytest.raises(RuntimeError), gc_paused():
        assert not gc.isenabled()
        with gc_paused():  # nested: the inner one does not turn it back on
            pass
        assert not gc.isenabled()
        raise RuntimeError
    assert gc.isenabled()
    gc.disable()
    try:
        with gc_paused():
            pass
        assert not gc.isenabled()  # a site that runs with it off keeps it off
    finally:
        gc.enable()


def test_binary_lookups_see_what_the_session_has_not_flushed_yet(db_connection: Connection) -> None:
    """The inbox and the ledger look keys up on the raw connection: pending ORM rows must be
    flushed first, as a query through the session would."""
    with session_scope() as s:
        s.add(ProcessedEvent(event_id="job.completed:pending", kind="job.completed"))
        assert inbox.applied(s, ["job.completed:pending", "job.completed:other"]) == {"job.completed:pending"}
        assert bulk.select_where_any(s, ProcessedEvent.__table__, ("event_id", "kind"), "event_id",
                                     {"job.completed:pending"}, also={"kind": "job.completed"}) == \
            [("job.completed:pending", "job.completed")]
        assert bulk.select_where_any(s, ProcessedEvent.__table__, ("event_id",), "event_id",
                                     ["job.completed:pending"], also={"kind": ["refund.requested"]}) == []


def test_claim_keeps_one_row_per_id_and_says_which_it_claimed(db_connection: Connection) -> None:
    with session_scope() as s:
        assert inbox.claim(s, [("b", "job.completed"), ("a", "job.started"), ("b", "job.completed")]) == {"a", "b"}
        assert inbox.claim(s, [("a", "job.started"), ("c", "job.completed")]) == {"c"}
        assert inbox.claim(s, []) == set()
        assert inbox.applied(s, ["a", "b", "c", "d"]) == {"a", "b", "c"}


@pytest.mark.usefixtures("quickstart")
def test_each_partition_and_qos_of_a_batch_is_priced_with_its_own_multipliers() -> None:
    """The multipliers are worked out once per (partition, QoS) and batch: two pairs in one batch
    must not share them."""
    from openacct.shortcuts import deposit

    deposit("phys", "1000", start="2000-01-01")
    with session_scope() as s:
        system = s.query(System).filter_by(name="cluster").one()
        s.add_all([ChargeMultiplier(system_id=system.id, kind="partition", name="gpu", multiplier=Decimal("2.5")),
                   ChargeMultiplier(system_id=system.id, kind="qos", name="low", multiplier=Decimal("0.5"))])
    events = [raw(job_completed(9001, partition="batch", cpus=4, seconds=3600)),
              raw(job_completed(9002, partition="gpu", cpus=4, seconds=3600)),
              raw(job_completed(9003, partition="gpu", qos="low", cpus=4, seconds=3600)),
              raw(job_completed(9004, partition="batch", qos="low", cpus=4, seconds=3600))]
    with session_scope() as s:
        assert charge_events(s, events).charged == 4
    with session_scope() as s:
        found = {t.details["event_id"]: t for t in s.query(LedgerTransaction).filter_by(kind="charge")}
        by_job = {json.loads(e)["job_id"]: found[json.loads(e)["event_id"]] for e in events}
    rate = Decimal("0.05")  # the quick start's core-hour rate
    for job_id, multiplier, partition, qos in [("9001", "1", "1", "1"), ("9002", "2.5", "2.5", "1"),
                                               ("9003", "1.25", "2.5", "0.5"), ("9004", "0.5", "1", "0.5")]:
        charge = by_job[job_id]
        assert charge.amount == 4 * rate * Decimal(multiplier), job_id
        shown = (Decimal(charge.details["partition_multiplier"]), Decimal(charge.details["qos_multiplier"]))
        assert shown == (Decimal(partition), Decimal(qos)), job_id


STRINGS = ["plain", 'quote"d', "back\\slash", "back\\n, a backslash and an n", "new\nline", "tab\t", "\x01",
           "é ünïcödé ☃", "null", "NULL", "", " spaced ", "{braces},", "NaN", None]


@pytest.mark.parametrize("strings", [STRINGS[:4] + STRINGS[7:], STRINGS], ids=["as-a-literal", "with-control-characters"])
def test_bulk_arrays_write_and_find_every_value_as_given(db_connection: Connection, strings: list[str | None]) -> None:
    """Numbers, text and JSON go as array literals written by json.dumps and str.join: every
    value must come back as it was, quotes, backslashes, NULLs and control characters included."""
    from sqlalchemy import BigInteger, Column, DateTime, MetaData, Numeric, String, Table, text
    from sqlalchemy.dialects.postgresql import JSONB

    table = Table("bulk_probe", MetaData(), Column("n", BigInteger), Column("s", String(64)),
                  Column("d", Numeric(24, 6)), Column("t", DateTime(timezone=True)), Column("j", JSONB))
    count = len(strings)
    now = dt.datetime(2026, 12, 6, 12, 0, tzinfo=dt.UTC)
    columns = {
        "n": [None if i % 3 == 0 else (-1) ** i * 2**62 // (i + 1) for i in range(count)],
        "s": strings,
        "d": [Decimal(i) / 7 if i % 2 else Decimal("-12345678.5") for i in range(count)],
        "t": [now + dt.timedelta(microseconds=i) for i in range(count)],
        "j": [None if s is None else json.dumps({"s": s}) for s in strings],
    }
    with session_scope() as s:
        s.execute(text("CREATE TEMP TABLE bulk_probe (n bigint, s varchar(64), d numeric(24, 6), "
                       "t timestamptz, j jsonb) ON COMMIT DROP"))
        bulk.insert_columns(s, table, columns)
        rows = s.execute(text("SELECT n, s, d, t, j FROM bulk_probe ORDER BY t")).all()
        assert [r.n for r in rows] == columns["n"]
        assert [r.s for r in rows] == strings
        assert [r.d for r in rows] == [d.quantize(Decimal("0.000001")) for d in columns["d"]]
        assert [r.j for r in rows] == [None if s is None else {"s": s} for s in strings]
        present = [x for x in strings if x is not None]
        found = bulk.select_where_any(s, table, ("s",), "s", present + ["absent"])
        assert sorted(r[0] for r in found) == sorted(present)
        assert len(bulk.select_where_any(s, table, ("n",), "n", [n for n in columns["n"] if n is not None])) == \
            sum(n is not None for n in columns["n"])
        # any_of, through SQLAlchemy, sends the same literals
        from sqlalchemy import select

        assert sorted(s.scalars(select(table.c.s).where(bulk.any_of(table.c.s, present + ["absent"])))) == sorted(present)
        assert sorted(s.scalars(select(table.c.n).where(bulk.any_of(table.c.n, columns["n"])))) == \
            sorted(n for n in columns["n"] if n is not None)


@pytest.mark.parametrize("rows", [1, 14, 3])
def test_bulk_json_documents_given_as_dicts_are_written_in_order(db_connection: Connection, rows: int) -> None:
    """Also documents that Python finds equal and JSON does not ({"n": 1}, {"n": True}, {"n": 1.0}):
    each row keeps its own."""
    from sqlalchemy import Column, Integer, MetaData, Table, text
    from sqlalchemy.dialects.postgresql import JSONB

    table = Table("bulk_documents", MetaData(), Column("n", Integer), Column("j", JSONB))
    documents = ([{"n": 1}, {"n": True}, {"n": 1.0}] if rows == 3 else
                 [{"s": s, "n": i, "nested": {"list": [i, None, "x"]}} for i, s in enumerate(STRINGS[:-1])][:rows])
    with session_scope() as s:
        s.execute(text("CREATE TEMP TABLE bulk_documents (n int, j jsonb) ON COMMIT DROP"))
        bulk.insert_columns(s, table, {"n": list(range(len(documents))), "j": documents})
        assert s.execute(text("SELECT j FROM bulk_documents ORDER BY n")).scalars().all() == documents
        if rows == 3:  # as text: to == they are all one
            assert s.execute(text("SELECT j::text FROM bulk_documents ORDER BY n")).scalars().all() == \
                ['{"n": 1}', '{"n": true}', '{"n": 1.0}']


def test_every_time_of_every_event_is_checked_however_it_is_typed() -> None:
    """The times an event's one validator checks are found from the fields' types: a time in a
    union or an annotation must be found too, or it would go unchecked."""
    from typing import Annotated, Optional

    from pydantic import Field

    from shared.events import Event, JobCompleted, JobStarted, RefundRequested, ReportRequested

    assert JobCompleted._times == ("emitted_at", "submit_time", "start_time", "end_time")
    assert JobStarted._times == ("emitted_at", "submit_time", "start_time")
    assert RefundRequested._times == ("emitted_at", "submit_time")
    assert ReportRequested._times == ("emitted_at",)

    class Later(Event):
        kind: str = "later"
        a: Annotated[dt.datetime, Field(description="a")] | None = None
        b: Optional[Annotated[dt.datetime, Field(description="b")]] = None  # noqa: UP045 - the old spelling too
        c: dt.datetime | int = 0
        d: int = 0

    assert Later._times == ("emitted_at", "a", "b", "c")
    with pytest.raises(ValueError, match="b: must carry a time zone"):
        Later(schema_version=1, event_id="x", b=dt.datetime(2026, 1, 1))  # type: ignore[call-arg]


@pytest.mark.usefixtures("quickstart")
def test_each_batch_reads_the_refused_runs_by_their_own_index(db_connection: Connection, query_plans: list[str]) -> None:
    """The charger asks every batch which of its jobs admission control refused. Without an index
    of their own, PostgreSQL read every job of the system to answer (migration 0017)."""
    from shared.models import REFUSED_RUN
    from shared.rating.directory import Directory
    from shared.rating.jobs import refused_runs

    db_connection.execute(text(
        "INSERT INTO jobs (system_id, job_id, submit_time, charge_policy) SELECT s.id, g::text, now(), "
        "CASE WHEN g % 1000 = 0 THEN :refused ELSE 'charged for elapsed time' END "
        "FROM systems s, generate_series(1, 20000) g"), {"refused": REFUSED_RUN})
    db_connection.execute(text("ANALYZE jobs"))
    events = [parse_event(raw(job_completed(n))) for n in range(1500, 3500)]  # a batch's worth
    with session_scope() as s:
        found = refused_runs(s, Directory.load(s, events), events)
    assert sorted(key[1] for key in found) == ["2000", "3000"]
    plan = next(p for p in query_plans if "charge_policy" in p and "FROM jobs" in p)
    assert "ix_jobs_refused_runs" in plan, plan
