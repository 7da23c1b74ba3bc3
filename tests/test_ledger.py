"""The ledger's rules, each against a real PostgreSQL inside a rolled-back transaction."""

from __future__ import annotations

import datetime as dt
from decimal import Decimal

import pytest
from sqlalchemy import Connection, func, select, text
from sqlalchemy.exc import DBAPIError

from openacct.shortcuts import (
    balance,
    charge,
    create_account,
    deposit,
    get_account,
    record_job,
    record_transaction,
    refund,
    set_service_rate,
    transfer,
)
from shared import ledger
from shared.db import session_scope
from shared.errors import IdempotencyConflict, InsufficientFunds, InvalidInput, NotFound
from shared.models import AccountBalance, LedgerEntry, LedgerTransaction

pytestmark = pytest.mark.usefixtures("quickstart")

D = Decimal
SERVICE = "cluster-core-hours"
UTC = dt.UTC


def ago(**delta: float) -> dt.datetime:
    return dt.datetime.now(UTC) - dt.timedelta(**delta)


def rows(model: type) -> int:
    with session_scope() as s:
        return s.scalar(select(func.count()).select_from(model))


def verify() -> list[ledger.Mismatch]:
    with session_scope() as s:
        return ledger.verify(s)


def test_balance_adds_up_exactly() -> None:
    deposit("phys", "1000")
    charge("phys", SERVICE, "100", user="tux")  # 5.00
    c = charge("phys", SERVICE, "12.345", user="bob")  # 0.61725 -> 0.617250
    refund(c, "0.2")
    b = balance("phys")
    assert (b.allocated, b.charged, b.refunded, b.held) == (D("1000"), D("5.617250"), D("0.2"), D(0))
    assert b.available == D("994.582750")
    assert b.as_dict() == {"name": "phys", "allocated": "1000.00", "charged": "5.61725",
                           "refunded": "0.20", "held": "0.00", "available": "994.58275",
                           "credit_limit": "0.00"}
    assert verify() == []


def test_charge_uses_the_rate_in_effect_when_the_use_happened() -> None:
    deposit("phys", "1000", start=ago(days=30))
    set_service_rate(SERVICE, "0.08", effective_from=ago(days=10))
    old = charge("phys", SERVICE, "10", effective_at=ago(days=20))
    new = charge("phys", SERVICE, "10", effective_at=ago(days=1))
    assert (old.rate, old.amount) == (D("0.05"), D("0.5"))
    assert (new.rate, new.amount) == (D("0.08"), D("0.8"))


def test_computed_amounts_round_half_up_to_six_places() -> None:
    deposit("phys", "10")
    txn = charge("phys", SERVICE, "0.00001")  # 0.0000005 -> 0.000001
    assert txn.amount == D("0.000001")


def test_same_key_same_request_returns_the_first_and_writes_nothing() -> None:
    funded = deposit("phys", "100", key="dep-1")
    first = charge("phys", SERVICE, "10", user="tux", key="job-42")
    before = (rows(LedgerTransaction), rows(LedgerEntry))
    again = charge("phys", SERVICE, "10", user="tux", key="job-42")
    assert again.id == first.id
    assert (rows(LedgerTransaction), rows(LedgerEntry)) == before
    assert deposit("phys", "100", key="dep-1").id == funded.id
    assert balance("phys").allocated == D("100")


def test_same_key_other_request_is_refused_clearly() -> None:
    deposit("phys", "100")
    charge("phys", SERVICE, "10", key="k")
    with pytest.raises(IdempotencyConflict, match="idempotency key 'k' was already used by charge"):
        charge("phys", SERVICE, "11", key="k")
    with pytest.raises(IdempotencyConflict):
        deposit("phys", "10", key="k")
    assert balance("phys").charged == D("0.5")


def test_partial_refunds_never_exceed_the_charge() -> None:
    deposit("phys", "100")
    c = charge("phys", SERVICE, "100")  # 5.00
    refund(c, "2")
    refund(c, "2.5")
    with pytest.raises(InvalidInput, match="has 0.50 left to refund"):
        refund(c, "0.51")
    last = refund(c)  # the rest
    assert last.amount == D("0.5") and last.refers_to_id == c.id
    with pytest.raises(InvalidInput, match="has 0.00 left"):
        refund(c, "0.01")
    assert balance("phys").available == D("100")
    assert verify() == []


def test_refund_of_something_not_a_charge_is_refused() -> None:
    d = deposit("phys", "100")
    with pytest.raises(InvalidInput, match="is a deposit, not a charge"):
        refund(d)
    with pytest.raises(NotFound, match="no transaction #999999"):
        refund(999999)


def test_refund_goes_back_to_the_allocations_the_charge_drew_from() -> None:
    short = deposit("phys", "3", end=dt.datetime.now(UTC) + dt.timedelta(days=10))
    long_ = deposit("phys", "100", end=dt.datetime.now(UTC) + dt.timedelta(days=300))
    c = charge("phys", SERVICE, "100")  # 5.00: 3 from the allocation ending first, 2 from the next
    slices = [(e.allocation_id, e.amount) for e in c.entries]
    short_alloc, long_alloc = short.details["allocation_id"], long_.details["allocation_id"]
    assert slices == [(short_alloc, D("3")), (long_alloc, D("2"))]
    r = refund(c, "2.5")  # the last slice first: 2 back to the long one, 0.5 to the short one
    assert sorted((e.allocation_id, e.amount) for e in r.entries) == sorted(
        [(long_alloc, D("2")), (short_alloc, D("0.5"))]
    )


def test_charges_beyond_all_allocations_are_owed_by_the_account() -> None:
    deposit("phys", "1")
    c = charge("phys", SERVICE, "100")  # 5.00
    assert [(e.allocation_id is None, e.amount) for e in c.entries] == [(False, D("1")), (True, D("4"))]
    assert balance("phys").available == D("-4")


def test_allocation_dates_are_honoured() -> None:
    deposit("phys", "100", start=ago(days=60), end=ago(days=30))  # expired
    deposit("phys", "50", start=dt.datetime.now(UTC) + dt.timedelta(days=1))  # not yet
    deposit("phys", "10", start=ago(days=1))
    assert balance("phys").allocated == D("10")
    # What was charged against the expired allocation left with it.
    assert balance("phys", at=ago(days=45)).allocated == D("100")


def test_as_of_balance_reads_the_journal_as_it_stood() -> None:
    deposit("phys", "100", start=ago(days=10))
    charge("phys", SERVICE, "20", effective_at=ago(days=5))  # 1.00
    charge("phys", SERVICE, "40", effective_at=ago(days=1))  # 2.00
    assert balance("phys", at=ago(days=3)).charged == D("1")
    assert balance("phys", at=dt.datetime.now(UTC)).charged == D("3")
    assert balance("phys").charged == D("3")


def test_transfer_moves_available_money_and_keeps_its_expiry() -> None:
    end = dt.datetime(2030, 1, 1, tzinfo=UTC)
    deposit("phys", "100", end=end)
    with pytest.raises(InsufficientFunds, match="has 100.00 available"):
        transfer("phys", "chem", "100.01")
    t = transfer("phys", "chem", "40")
    assert (balance("phys").available, balance("chem").available) == (D("60"), D("40"))
    with session_scope() as s:
        target = [e for e in s.get_one(LedgerTransaction, t.id).entries if e.amount > 0]
        assert [e.account_id for e in target] == [get_account("chem").id]
        from shared.models import Allocation

        assert s.get_one(Allocation, target[0].allocation_id).ends_at == end
    with pytest.raises(InvalidInput, match="to itself"):
        transfer("phys", "phys", "1")
    assert verify() == []


def test_held_money_cannot_be_spent_twice() -> None:
    deposit("phys", "10", credit_limit="5")
    with session_scope() as s:
        account = get_account("phys")
        h = ledger.hold(s, account, "12")
        with pytest.raises(InsufficientFunds, match="has -2.00 available and a credit limit of 5.00"):
            ledger.hold(s, account, "3.01")
        ledger.hold(s, account, "3")
        with pytest.raises(InsufficientFunds):
            transfer("phys", "chem", "1")
        ledger.release(s, h, "2")
        with pytest.raises(InvalidInput, match="has 10.00 still held"):
            ledger.release(s, h, "10.01")
        ledger.release(s, h)
    b = balance("phys")
    assert (b.held, b.available, b.credit_limit) == (D("3"), D("7"), D("5"))
    assert verify() == []


def test_adjustments_correct_a_bucket() -> None:
    deposit("phys", "100")
    c = charge("phys", SERVICE, "100")
    record_transaction("adjustment", "phys", amount="-1.25", bucket="charged", refers_to=c.id,
                       description="re-rated at 0.0375")
    assert balance("phys").charged == D("3.75")
    with pytest.raises(InvalidInput, match="not 'held'"):
        record_transaction("adjustment", "phys", amount="1", bucket="held")
    assert verify() == []


@pytest.mark.parametrize(
    ("amount", "message"),
    [
        (0.1, "not float"),
        ("abc", "is not a number"),
        ("NaN", "finite"),
        ("-Infinity", "finite"),
        ("-5", "must not be negative"),
        ("0", "greater than zero"),
        ("1.0000001", "more than 6 decimal places"),
        ("1e16", "too large"),
        (None, "must be a number"),
    ],
)
def test_bad_amounts_are_refused_with_the_value(amount: object, message: str) -> None:
    with pytest.raises(InvalidInput, match=message):
        deposit("phys", amount)
    assert rows(LedgerTransaction) == 0


def test_bad_deposit_dates_are_refused() -> None:
    with pytest.raises(InvalidInput, match="is not after its start"):
        deposit("phys", "1", start="2026-10-01", end="2026-09-01")
    with pytest.raises(InvalidInput, match="not a date or time"):
        deposit("phys", "1", end="next tuesday")


def test_future_charges_are_refused() -> None:
    deposit("phys", "1")
    with pytest.raises(InvalidInput, match="in the future"):
        charge("phys", SERVICE, "1", effective_at=dt.datetime.now(UTC) + dt.timedelta(days=1))


def test_charges_need_access_and_membership() -> None:
    from openacct.shortcuts import create_user, revoke_service_access

    create_user("eve")
    deposit("phys", "10")
    with pytest.raises(InvalidInput, match="user 'eve' is not a member of project 'phys'"):
        charge("phys", SERVICE, "1", user="eve")
    revoke_service_access(SERVICE, project="phys")
    with pytest.raises(InvalidInput, match="account 'phys' has no access to service"):
        charge("phys", SERVICE, "1")
    with pytest.raises(NotFound, match="no account or project named 'nosuch'"):
        charge("nosuch", SERVICE, "1")


def test_project_balance_sums_its_accounts() -> None:
    from openacct.shortcuts import grant_service_access

    create_account("phys-gpu", project="phys")
    grant_service_access(SERVICE, account="phys-gpu")
    deposit("phys", "100")
    deposit("phys-gpu", "50")
    charge("phys-gpu", SERVICE, "100")
    assert balance("phys").available == D("145")
    assert balance("phys-gpu").available == D("45")


def test_job_charges_link_the_job() -> None:
    deposit("phys", "100")
    job = record_job("cluster", "1234", submit_time=ago(hours=3), user="tux", account="phys",
                     start_time=ago(hours=2), end_time=ago(hours=1), cpus=8, state="COMPLETED")
    again = record_job("cluster", "1234", submit_time=job.submit_time, exit_code=0)
    assert again.id == job.id and again.cpus == 8 and again.exit_code == 0
    c = charge("phys", SERVICE, "8", user="tux", job=job, key="cluster:1234")
    assert c.job_id == job.id
    with pytest.raises(InvalidInput, match="end time is before its start"):
        record_job("cluster", "99", submit_time=ago(hours=3), start_time=ago(hours=1), end_time=ago(hours=2))


def test_verify_reports_a_tampered_running_total(db_connection: Connection) -> None:
    deposit("phys", "100")
    charge("phys", SERVICE, "10")
    db_connection.execute(
        text("UPDATE account_balances SET charged = charged + 1 WHERE account_id = :a"),
        {"a": get_account("phys").id},
    )
    problems = verify()
    assert len(problems) == 1
    assert "charged journal 0.50 vs balance 1.50" in str(problems[0])


def test_ledger_rows_cannot_be_rewritten(db_connection: Connection) -> None:
    deposit("phys", "100")
    for statement in ("UPDATE ledger_transactions SET amount = 1", "DELETE FROM ledger_entries"):
        savepoint = db_connection.begin_nested()
        with pytest.raises(DBAPIError, match="append-only"):
            db_connection.execute(text(statement))
        savepoint.rollback()
    assert balance("phys").allocated == D("100")
    assert rows(AccountBalance) == 1


def test_an_expired_account_takes_no_new_money_or_use() -> None:
    from openacct.shortcuts import grant_service_access

    create_account("phys-2019", project="phys", expires_at="2020-01-01")
    grant_service_access(SERVICE, account="phys-2019")
    with pytest.raises(InvalidInput, match="account 'phys-2019' expired on 2020-01-01"):
        deposit("phys-2019", "10")
    with pytest.raises(InvalidInput, match="expired on 2020-01-01"):
        charge("phys-2019", SERVICE, "1")
    assert rows(LedgerTransaction) == 0


def test_a_typo_in_free_states_is_refused() -> None:
    from pydantic import ValidationError

    from shared.config import Settings

    with pytest.raises(ValidationError, match="unknown job state.*NODEFAIL"):
        Settings(free_states=["NODEFAIL"])
    assert Settings(free_states=["node_fail", "timeout"]).free_states == ["NODE_FAIL", "TIMEOUT"]


@pytest.mark.parametrize("args", [
    (1, 2, Decimal("1.500000"), Decimal("1"), 3, 4, dt.datetime(2026, 1, 1, 12, tzinfo=dt.timezone(dt.timedelta(hours=2)))),
    (7, 8, Decimal("0E-6"), Decimal("2.50"), None, None, None),
])
def test_the_chargers_request_hash_is_the_ledgers(args: tuple) -> None:  # type: ignore[type-arg]
    """The charger's spelled-out fingerprint must equal the generic one, or a charge replayed
    through the other path would be refused as a different request."""
    from shared.ledger import _request_hash, charge_request_hash

    names = ("account", "service", "quantity", "multiplier", "user", "job", "effective_at")
    assert charge_request_hash(*args) == _request_hash("charge", dict(zip(names, args, strict=True)))


@pytest.mark.parametrize(("args", "digest"), [
    ((1, 2, Decimal("1.500000"), Decimal("1.00"), 3, 4, dt.datetime(2026, 12, 6, 23, 38, 7, tzinfo=dt.UTC)),
     "6163c9345358d0f9a777eb856a1b35db6e096defa23d3b3b9804b2095e5d0f82"),
    ((1, 2, Decimal("0.000001"), Decimal("2.5"), None, None,
      dt.datetime(2026, 12, 7, 1, 38, 7, 250000, tzinfo=dt.timezone(dt.timedelta(hours=2)))),
     "eeeed93a455ad4875e9cf0d27bf7898b3dd19586ec05bc77e197bfcbe0f53ead"),
])
def test_a_request_hash_never_changes_from_one_version_to_the_next(args: tuple, digest: str) -> None:  # type: ignore[type-arg]
    """The ledger keeps each request's fingerprint: a replay after an upgrade is compared with what
    an older OpenAcct wrote. These digests were written by the code of 2026-12-06 (21ea708), so a
    faster way of computing them must give the very same bytes."""
    from shared.ledger import _request_hash, charge_request_hash

    assert charge_request_hash(*args) == digest
    assert _request_hash("refund", {"charge": 7, "amount": Decimal("10.50"), "at": dt.datetime(2026, 1, 1, tzinfo=dt.UTC)}) \
        == "6c408ccdd206250a1284a5fbd8816cd63082190fe388960ca97a76b44c77965e"
