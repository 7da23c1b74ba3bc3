"""The money bugs an audit found, each with the scenario that found it and the figures expected,
and the rules that keep their whole class out: each against a real PostgreSQL."""

from __future__ import annotations

import datetime as dt
import threading
from decimal import Decimal

import pytest
from sqlalchemy import Engine, select, text

from openacct.shortcuts import (
    balance,
    charge,
    create_service,
    deposit,
    get_account,
    get_service,
    grant_service_access,
    record_transaction,
    refund,
    transfer,
)
from services.charger.batch import charge_events
from services.refunder.batch import refund_events
from services.refunder.rerate import rerate
from shared import ledger
from shared.db import session_scope
from shared.errors import AlreadyRefunded, InvalidInput
from shared.event_id import job_event_id
from shared.models import AccountBalance, Job, LedgerTransaction, ParkedEvent, ResourceService
from shared.rating.price import hours, price
from tests.events import job_completed, raw

D = Decimal
UTC = dt.UTC
SERVICE = "cluster-core-hours"  # 0.05 per core-hour: 2000 core-hours cost 100
A_END, B_END = dt.datetime(2027, 1, 1, tzinfo=UTC), dt.datetime(2028, 1, 1, tzinfo=UTC)


def verify() -> list[ledger.Mismatch]:
    with session_scope() as s:
        return ledger.verify(s)


def remaining(deposit_txn: LedgerTransaction) -> Decimal:
    """What an allocation has left: what was put in, less what was charged, plus refunds."""
    with session_scope() as s:
        row = s.scalar(select(AccountBalance).where(AccountBalance.allocation_id == deposit_txn.details["allocation_id"]))
        return row.allocated - row.charged + row.refunded


def own_row(account: str) -> Decimal:
    """The account's own row: what no allocation covered (never positive)."""
    with session_scope() as s:
        row = s.scalar(select(AccountBalance).where(AccountBalance.account_id == get_account(account).id,
                                                    AccountBalance.allocation_id.is_(None)))
        return D(0) if row is None else row.allocated - row.charged + row.refunded


def rerate_all(discount: str) -> None:
    with session_scope() as s:
        rerate(s, get_service(SERVICE), dt.datetime(2000, 1, 1, tzinfo=UTC), dt.datetime.now(UTC) + dt.timedelta(days=1),
               discount=D(discount))


# -- 1. re-rate down, then refund ------------------------------------------------------------------


@pytest.mark.usefixtures("quickstart")
def test_a_charge_rerated_down_then_refunded_gives_each_allocation_back_no_more_than_it_gave() -> None:
    a = deposit("phys", "30", start="2026-01-01", end=A_END)
    b = deposit("phys", "70", start="2026-01-01", end=B_END)
    c = charge("phys", SERVICE, "2000")  # 100: 30 from A (ending first), 70 from B
    assert (remaining(a), remaining(b)) == (0, 0)
    rerate_all("0.6")  # now costs 40: the 60 goes back to the slices the charge drew, B (drawn last) first
    assert (remaining(a), remaining(b)) == (0, 60)
    refund(c)  # the 40 it still costs: 10 that B still carries, 30 of A
    assert (remaining(a), remaining(b)) == (30, 70)
    assert balance("phys", at="2027-06-01T00:00:00Z").available == D("70")  # A has ended: B's 70, not 100
    assert verify() == []


@pytest.mark.usefixtures("quickstart")
def test_when_the_largest_slice_was_owed_by_the_account_its_own_row_never_turns_positive() -> None:
    deposit("phys", "30", start="2026-01-01", end=A_END)
    c = charge("phys", SERVICE, "2000")  # 100: 30 from the allocation, 70 owed by the account
    assert own_row("phys") == D("-70")
    rerate_all("0.6")  # -60: off the debt first
    assert own_row("phys") == D("-10")
    refund(c)
    assert own_row("phys") == 0 and balance("phys").available == D("30")
    transfer("phys", "chem", "30")  # once a bare AssertionError
    assert balance("phys").available == 0 and verify() == []


# -- 2. a refund and a re-rate at the same time ----------------------------------------------------


def _race(first, second) -> list[BaseException | object]:  # type: ignore[no-untyped-def]
    """Run ``first`` in a transaction that takes the account's lock and waits; start ``second``
    meanwhile (it must wait for the lock), then let ``first`` commit."""
    outcomes: list[BaseException | object] = [None, None]
    holding, done = threading.Event(), threading.Event()

    def one() -> None:
        with session_scope() as s:
            outcomes[0] = first(s)
            holding.set()
            done.wait(2)  # the second has started and is waiting for the lock by then

    def two() -> None:
        holding.wait(10)
        try:
            with session_scope() as s:
                outcomes[1] = second(s)
        except Exception as exc:  # noqa: BLE001 - the outcome is the assertion's
            outcomes[1] = exc

    threads = [threading.Thread(target=one), threading.Thread(target=two)]
    for t in threads:
        t.start()
    holding.wait(10)
    done.set()
    for t in threads:
        t.join(30)
    return outcomes


def test_a_refund_racing_a_rerate_never_gives_back_more_than_the_charge_costs(center: Engine) -> None:
    c = charge("phys", SERVICE, "2000")  # 100 of the 1000 deposited
    _, late = _race(lambda s: ledger.refund(s, s.get_one(LedgerTransaction, c.id)),
                    lambda s: ledger.reprice(s, s.get_one(LedgerTransaction, c.id), "50"))
    assert isinstance(late, AlreadyRefunded)  # refunded in full meanwhile: not re-priced under it
    assert balance("phys").available == D("1000") and verify() == []

    c = charge("chem", SERVICE, "2000")
    _race(lambda s: ledger.reprice(s, s.get_one(LedgerTransaction, c.id), "50"),
          lambda s: ledger.refund(s, s.get_one(LedgerTransaction, c.id)))
    assert balance("chem").available == D("1000")  # the refund gave back 50, what it costs now
    assert verify() == []


def test_two_rerates_at_once_apply_one_after_the_other(center: Engine) -> None:
    c = charge("phys", SERVICE, "2000")  # 100
    _race(lambda s: ledger.reprice(s, s.get_one(LedgerTransaction, c.id), "80"),
          lambda s: ledger.reprice(s, s.get_one(LedgerTransaction, c.id), "50"))
    with session_scope() as s:
        assert ledger.carried(s, s.get_one(LedgerTransaction, c.id)).price == D("50")  # the last, not 30
    assert balance("phys").available == D("950") and verify() == []


# -- 3. a completion without a start time ----------------------------------------------------------


@pytest.mark.usefixtures("quickstart")
def test_a_completion_without_a_start_never_borrows_another_jobs_start() -> None:
    deposit("phys", "100000", start="2000-01-01")
    long_ago = dt.datetime.now(UTC) - dt.timedelta(days=30)
    started = job_completed(77, cpus=64, end=long_ago + dt.timedelta(hours=1))  # job 77, another submit time
    started.update(kind="job.started")
    for key in ("end_time", "state", "exit_code"):
        started.pop(key)
    started["event_id"] = job_event_id("job.started", "cluster", "77", None, None,
                                       int(dt.datetime.fromisoformat(started["submit_time"]).timestamp()))
    cancelled = job_completed(77, cpus=64, state="CANCELLED")  # the id reused; never started
    cancelled.pop("start_time")
    with session_scope() as s:
        charge_events(s, [raw(started).decode()])
    with session_scope() as s:
        charge_events(s, [raw(cancelled).decode()])
    assert balance("phys").charged == 0
    with session_scope() as s:
        [parked] = s.scalars(select(ParkedEvent)).all()
        assert parked.reason.startswith("no start time for job 77")
    assert verify() == []


# -- 6. a fraction refunded after a re-rate ---------------------------------------------------------


def test_a_fraction_of_a_rerated_charge_is_a_fraction_of_what_it_costs_now(center: Engine) -> None:
    c = charge("phys", SERVICE, "2000")  # 100
    rerate_all("0.5")  # 50
    with session_scope() as s:
        refund_events(s, [raw({"schema_version": 1, "kind": "refund.requested", "event_id": "refund-half",
                               "transaction_id": c.id, "fraction": "0.5", "reason": "half",
                               "requester": "admin"}).decode()])
        [given] = s.scalars(select(LedgerTransaction).where(LedgerTransaction.kind == "refund")).all()
        assert given.amount == D("25")
    assert verify() == []


# -- 7. rounding once ------------------------------------------------------------------------------


@pytest.mark.usefixtures("quickstart")
def test_a_two_second_job_is_priced_from_its_exact_quantity_and_rounded_once() -> None:
    create_service("fast-core-hours", system="cluster", units="core-hours", charge_rate="36")
    deposit("phys", "10", start="2000-01-01")
    assert price(hours(1, 2), D(36)) == D("0.02")  # hours rounded to 6 places first gave 0.020016
    with session_scope() as s:
        s.add(ResourceService(system_id=get_service(SERVICE).system_id, resource="cpu",
                              service_id=get_service("fast-core-hours").id))
    grant_service_access("fast-core-hours", project="phys")
    with session_scope() as s:
        charge_events(s, [raw(job_completed(5, cpus=1, seconds=2)).decode()])
        [c] = s.scalars(select(LedgerTransaction).where(LedgerTransaction.kind == "charge")).all()
        assert (c.quantity, c.amount) == (D("0.000556"), D("0.02"))


@pytest.mark.usefixtures("quickstart")
def test_the_automatic_and_the_requested_refunds_of_a_fraction_round_alike(monkeypatch: pytest.MonkeyPatch) -> None:
    from shared.config import get_settings

    deposit("phys", "10", start="2000-01-01")
    monkeypatch.setenv("OPENACCT_REFUND_STATES", '{"PREEMPTED": 0.5}')
    get_settings.cache_clear()
    try:
        with session_scope() as s:  # 1 CPU for 3 s at 0.05: 0.000042 (0.0000416…), half is 0.000021
            charge_events(s, [raw(job_completed(6, cpus=1, seconds=3, state="PREEMPTED")).decode(),
                              raw(job_completed(7, cpus=1, seconds=3)).decode()])
    finally:
        monkeypatch.undo()
        get_settings.cache_clear()
    with session_scope() as s:
        automatic = s.scalar(select(LedgerTransaction.amount).where(LedgerTransaction.kind == "refund"))
        other = s.scalar(select(LedgerTransaction).join(Job, Job.id == LedgerTransaction.job_id)
                         .where(Job.job_id == "7", LedgerTransaction.kind == "charge"))
        asked = ledger.refund_share(s, other, "0.5")
        assert automatic == asked.amount == price(D("0.000042"), D(1), D("0.5"))


# -- also found ------------------------------------------------------------------------------------


@pytest.mark.usefixtures("quickstart")
def test_an_adjustment_may_refer_only_to_a_charge_of_its_own_account() -> None:
    deposit("phys", "100")
    deposit("chem", "100")
    c = charge("chem", SERVICE, "100")
    with pytest.raises(InvalidInput, match="may refer only to a charge of account 'phys'"):
        record_transaction("adjustment", "phys", amount="-1", bucket="charged", refers_to=c.id)
    with pytest.raises(InvalidInput, match="names the allocation it corrects"):
        record_transaction("adjustment", "phys", amount="5", bucket="allocated")  # money that never expires
    with pytest.raises(InvalidInput, match="re-prices a charge: name it"):  # slices that add up to nothing
        record_transaction("adjustment", "phys", amount="-70", bucket="charged")
    assert balance("chem").charged == D("5") and verify() == []


@pytest.mark.usefixtures("quickstart")
def test_a_manual_refund_of_a_charge_dated_by_a_clock_running_ahead_takes_effect_with_it() -> None:
    deposit("phys", "100", start="2000-01-01")
    ahead = dt.datetime.now(UTC) + dt.timedelta(seconds=60)  # a node's clock, within the skew allowed
    c = charge("phys", SERVICE, "100", effective_at=ahead)
    r = refund(c)
    assert r.effective_at == c.effective_at and balance("phys").available == D("100")


# -- the rules that keep each class out: the database refuses, verify names the row -------------------


@pytest.mark.usefixtures("quickstart")
def test_the_database_refuses_a_running_total_that_breaks_a_rule_of_money(db_connection) -> None:  # type: ignore[no-untyped-def]
    a = deposit("phys", "70")
    with pytest.raises(Exception, match="the allocation would hold more than was put into it"):
        db_connection.execute(text("UPDATE account_balances SET refunded = refunded + 1 WHERE allocation_id = :a"),
                              {"a": a.details["allocation_id"]})


def _entry(db_connection, txn: int, account: int, allocation: int | None, bucket: str, amount: str) -> None:  # type: ignore[no-untyped-def]
    """An entry as a bug would write it, its running total with it: past the balance rules'
    trigger (as the tables' owner could), so that only verify can tell."""
    params = {"t": txn, "a": account, "l": allocation, "b": bucket, "x": D(amount)}
    db_connection.execute(text("SET LOCAL session_replication_role = replica"))
    db_connection.execute(text("INSERT INTO ledger_entries (transaction_id, account_id, allocation_id, bucket, amount, "
                               "effective_at) VALUES (:t, :a, :l, :b, :x, now())"), params)
    db_connection.execute(text("INSERT INTO account_balances (account_id, allocation_id, " + bucket + ") "
                               "VALUES (:a, :l, :x) ON CONFLICT (account_id, allocation_id) DO UPDATE SET "
                               f"{bucket} = account_balances.{bucket} + excluded.{bucket}"), params)
    db_connection.execute(text("SET LOCAL session_replication_role = origin"))


def _txn(db_connection, kind: str, account: int, amount: str, refers_to: int | None = None,  # type: ignore[no-untyped-def]
         job: int | None = None, service: int | None = None) -> int:
    return db_connection.execute(text(
        "INSERT INTO ledger_transactions (kind, idempotency_key, request_hash, amount, account_id, refers_to_id, "
        "job_id, service_id, effective_at) VALUES (:k, gen_random_uuid()::text, '', :x, :a, :r, :j, :s, now()) "
        "RETURNING id"), {"k": kind, "x": D(amount), "a": account, "r": refers_to, "j": job, "s": service}).scalar()


@pytest.mark.usefixtures("quickstart")
def test_verify_names_every_row_written_the_way_the_bugs_wrote_them(db_connection) -> None:  # type: ignore[no-untyped-def]
    a = deposit("phys", "30", start="2026-01-01", end=A_END)
    b = deposit("phys", "70", start="2026-01-01", end=B_END)
    deposit("chem", "100")
    c = charge("phys", SERVICE, "2000")  # A 30, B 70
    phys, chem = get_account("phys").id, get_account("chem").id
    alloc_a, alloc_b = a.details["allocation_id"], b.details["allocation_id"]
    assert verify() == []

    # Bug 1: the re-rate's whole -60 on B, then the refund back to the original slices.
    adj = _txn(db_connection, "adjustment", phys, "60", refers_to=c.id)
    _entry(db_connection, adj, phys, alloc_b, "charged", "-60")
    ref = _txn(db_connection, "refund", phys, "40", refers_to=c.id)
    _entry(db_connection, ref, phys, alloc_b, "refunded", "10")
    _entry(db_connection, ref, phys, alloc_a, "refunded", "30")
    # ...then a second refund, as the racing refund and re-rate of bug 2 or the fraction of bug 6 gave.
    over = _txn(db_connection, "refund", phys, "60", refers_to=c.id)
    _entry(db_connection, over, phys, alloc_b, "refunded", "60")
    # An adjustment of another account's charge, and money put on the account's own row.
    foreign = _txn(db_connection, "adjustment", chem, "1", refers_to=c.id)
    _entry(db_connection, foreign, chem, None, "charged", "-1")
    # Bugs 4 and 5: a job charged twice, and a hold left open on a job that ended.
    with session_scope() as s:
        job = s.scalar(text("INSERT INTO jobs (system_id, job_id, submit_time, end_time, account_id) "
                            "SELECT system_id, '4', now() - interval '1 hour', now(), :a FROM services LIMIT 1 "
                            "RETURNING id"), {"a": phys})
    for _ in range(2):
        _txn(db_connection, "charge", phys, "0", job=job, service=get_service(SERVICE).id)
    hold = _txn(db_connection, "hold", phys, "1", job=job)
    _entry(db_connection, hold, phys, None, "held", "1")
    db_connection.execute(text("INSERT INTO open_holds (hold_id, account_id, job_id, remaining) VALUES (:h, :a, :j, 1)"),
                          {"h": hold, "a": phys, "j": job})

    found = "\n".join(map(str, verify()))
    assert f"allocation #{alloc_b} of account #{phys}: holds 130.000000, more than the 70.000000 put into it" in found
    assert f"charge #{c.id}: allocation #{alloc_b} was given back 60.000000 more than the charge drew from it" in found
    assert f"charge #{c.id}: refunds total 100.00, more than its 39.00" in found
    assert f"adjustment #{foreign}: refers to charge #{c.id} of account #{phys}, not to a charge of its own" in found
    assert f"account #{chem} (its own row): is 1.000000" in found
    assert f"job #{job}: 2 charges for service #{get_service(SERVICE).id}" in found
    assert f"hold #{hold}: is still open, but its job #{job} ended at" in found


@pytest.mark.usefixtures("quickstart")
def test_a_row_a_bug_left_broken_keeps_its_account_working_but_is_never_made_worse(db_connection) -> None:  # type: ignore[no-untyped-def]
    deposit("phys", "100")
    charge("phys", SERVICE, "4000")  # 200: 100 from the allocation, 100 owed by the account itself
    phys = get_account("phys").id
    db_connection.execute(text("SET LOCAL session_replication_role = replica"))  # as the old bug left it
    db_connection.execute(text("UPDATE account_balances SET refunded = charged + 5 WHERE account_id = :a "
                               "AND allocation_id IS NULL"), {"a": phys})
    db_connection.execute(text("SET LOCAL session_replication_role = origin"))
    with session_scope() as s:  # a hold and its release touch the broken row and leave it no worse
        ledger.release(s, ledger.hold(s, get_account("phys"), "1", limit="none"))
    with pytest.raises(Exception, match="the row of what no allocation covered would be positive"):
        db_connection.execute(text("UPDATE account_balances SET refunded = refunded + 1 WHERE account_id = :a "
                                   "AND allocation_id IS NULL"), {"a": phys})
