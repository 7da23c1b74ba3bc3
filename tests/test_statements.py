"""Statements against the ledger: every line adds up, and the closing balance is the ledger's
balance as of the end, for every project and period, allocations beginning and ending included."""

from __future__ import annotations

import datetime as dt
import json
from decimal import Decimal

import pytest

from openacct.shortcuts import balance, charge, create_account, deposit, refund, transfer
from services.reporter import render
from services.reporter.statements import INSTANT, month, statements
from shared.db import session_scope

D = Decimal
UTC = dt.UTC


def at(day: int, month_: int = 10) -> str:
    return dt.datetime(2026, month_, day, 12, tzinfo=UTC).isoformat()


@pytest.fixture
def history(quickstart: None) -> None:
    """Two projects through autumn 2026: a year's allocation, one that ends mid-October, one
    that begins mid-October, one for December; charges, a refund, a transfer between projects
    and a second account."""
    deposit("phys", "1000", start="2026-01-01", end="2027-01-01")
    deposit("phys", "200", start="2026-09-01", end=at(15))  # ends in the middle of October
    deposit("phys", "300", start=at(20), end="2027-01-01")  # begins in the middle of October
    deposit("chem", "500", start="2026-09-01")
    create_account("chem-gpu", project="chem")
    deposit("chem-gpu", "50", start="2026-12-01")  # deposited now, in force from December
    for day, quantity in ((3, "100"), (10, "400"), (16, "40"), (25, "10")):
        charge("phys", "cluster-core-hours", quantity, user="tux", effective_at=at(day))
    big = charge("chem", "cluster-core-hours", "2000", user="sue", effective_at=at(5))
    charge("chem", "cluster-core-hours", "300", user="sue", effective_at=at(2, 11))
    refund(big, "25", reason="node c03 failed")
    transfer("phys", "chem", "75")


@pytest.mark.usefixtures("history")
@pytest.mark.parametrize("period", ["2026-09", "2026-10", "2026-11", "2026-12"])
def test_every_statement_balances_and_closes_at_the_ledgers_balance(period: str) -> None:
    start, end = month(period)
    with session_scope() as s:
        found = statements(s, start, end)
    assert [st.project for st in found] == ["chem", "phys"]
    for st in found:
        assert st.balanced, st
        assert st.opening == balance(st.project, at=(start - INSTANT).isoformat()).available
        assert st.closing == balance(st.project, at=(end - INSTANT).isoformat()).available
        assert sum(line.amount for line in st.lines) == sum(st.activity.values())


@pytest.mark.usefixtures("history")
def test_october_for_phys_line_by_line() -> None:
    start, end = month("2026-10")
    with session_scope() as s:
        (st,) = statements(s, start, end, ["phys"])
    charges = [line.amount for line in st.lines if line.kind == "charge"]
    assert charges == [D("-5"), D("-20"), D("-2"), D("-0.5")]  # core-hours at 0.05
    assert st.opening == D("1200")  # the year's 1000 and September's 200
    # The 200 allocation ended on the 15th with 200 - 5 - 20 drawn first from it (it ends first).
    assert st.allocations_ended == D("-175")
    assert st.activity["deposit"] == D("300")  # a deposit counts from its allocation's start
    assert st.closing == st.opening + sum(st.activity.values()) - D("175")


@pytest.mark.usefixtures("history")
def test_a_deposit_for_a_later_allocation_appears_when_the_allocation_begins() -> None:
    with session_scope() as s:
        (november,) = statements(s, *month("2026-11"), ["chem"])
        (december,) = statements(s, *month("2026-12"), ["chem"])
    assert [line.kind for line in november.lines if line.account == "chem-gpu"] == []
    (later,) = [line for line in december.lines if line.kind == "deposit"]
    assert (later.account, later.amount, later.effective_at) == ("chem-gpu", D("50"), dt.datetime(2026, 12, 1, tzinfo=UTC))
    # The refund and the transfer are effective when made ("now"), which may fall in December too.
    assert december.activity["deposit"] == D("50")
    assert december.closing - november.closing == sum(december.activity.values()) + december.allocations_ended


@pytest.mark.usefixtures("history")
def test_statement_formats(cli) -> None:  # type: ignore[no-untyped-def]
    result = cli("statement", "phys", "--period", "2026-10", "--format", "json")
    assert result.code == 0, result.err
    (data,) = result.json()
    assert (data["opening"], data["closing"]) == ("1200.00", str(balance("phys", at=(month("2026-10")[1] - INSTANT).isoformat()).available.quantize(D("0.01"))))
    csv_out = cli("statement", "phys", "--period", "2026-10", "--format", "csv").out.splitlines()
    assert csv_out[0].startswith("project,effective_at") and "opening balance" in csv_out[1]
    assert "closing balance" in csv_out[-1]
    page = cli("statement", "phys", "--period", "2026-10", "--format", "html").out
    assert page.startswith("<!doctype html>") and "<svg" in page and "Closing balance" in page
    assert "http" not in page.replace("http://www.w3.org", "")  # self-contained: nothing fetched
    text = cli("statement", "--period", "2026-10", "--summary")
    assert text.code == 0 and "Opening balance" in text.out and "chem" in text.out
    bad = cli("statement", "phys", "--period", "2026-13")
    assert bad.code != 0 and "bad period '2026-13'" in bad.err
    assert "name it" in cli("statement", "--period", "2026-10", "--format", "html").err
    assert json.loads(cli("statement", "nobody", "--period", "2026-10", "--format", "json").out or "[]") == []


def test_a_month_is_its_first_instant_to_the_next_months() -> None:
    assert month("2026-12") == (dt.datetime(2026, 12, 1, tzinfo=UTC), dt.datetime(2027, 1, 1, tzinfo=UTC))
    with pytest.raises(ValueError, match="bad period"):
        month("October")
    assert render.SUMMARY[0][0] == "opening"


@pytest.mark.usefixtures("quickstart")
def test_an_allocation_that_ended_long_ago_does_not_appear() -> None:
    deposit("chem", "100", start="2020-01-01", end="2021-01-01")
    deposit("chem", "50", start="2026-01-01")
    with session_scope() as s:
        (st,) = statements(s, *month("2026-10"), ["chem"])
    assert (st.allocations_started, st.allocations_ended, st.opening, st.closing) == (0, 0, D("50"), D("50"))
    assert st.balanced


@pytest.mark.usefixtures("history")
def test_a_sent_statement_never_changes_and_a_late_charge_shows_next_month_as_late(db_connection) -> None:  # type: ignore[no-untyped-def]
    from sqlalchemy import text

    from services.reporter.statements import issue

    october, november = month("2026-10"), month("2026-11")
    with session_scope() as s:
        issue(s, *october, settle=0)  # October's statements went out
        [sent] = statements(s, *october, ["phys"])
    # Posted after they went out: a job's charge for October 30th that arrived late (this test is
    # one transaction, one now(): its posting time is moved past the cutoff, as a later one's is).
    late = charge("phys", "cluster-core-hours", "20", user="tux", effective_at=at(30))  # 1.00
    db_connection.execute(text("SET LOCAL session_replication_role = replica"))  # past the append-only rule
    db_connection.execute(text("UPDATE ledger_transactions SET created_at = created_at + interval '1 minute' "
                               "WHERE id = :id"), {"id": late.id})
    db_connection.execute(text("SET LOCAL session_replication_role = origin"))
    with session_scope() as s:
        [again] = statements(s, *october, ["phys"])
        [next_month] = statements(s, *november, ["phys"])
    assert again == sent  # to the last line
    [line] = [x for x in next_month.lines if x.transaction_id == late.id]
    assert line.late and line.amount == D("-1") and line.effective_at == dt.datetime.fromisoformat(at(30))
    assert next_month.opening == sent.closing and next_month.balanced
    assert next_month.closing == balance("phys", at=(november[1] - INSTANT).isoformat()).available
    assert "late posting" in render.to_csv(next_month) and "(late posting)" in render.to_html(next_month)


@pytest.mark.usefixtures("quickstart")
def test_a_statement_line_says_which_job_who_how_much_and_at_what_rate(cli) -> None:  # type: ignore[no-untyped-def]
    from openacct.shortcuts import get_service
    from services.charger.batch import charge_events
    from services.refunder.rerate import rerate
    from tests.events import job_completed, raw

    deposit("phys", "1000", start="2026-01-01")
    ended = dt.datetime(2026, 10, 15, 12, tzinfo=UTC)
    with session_scope() as s:  # 8 CPUs for 1.5 hours: 12 core-hours at 0.05
        assert charge_events(s, [raw(job_completed(4242, user="tux", cpus=8, seconds=5400, end=ended)).decode()]).charged == 1
        rerate(s, get_service("cluster-core-hours"), *month("2026-10"), discount=D("0.5"))  # made now: December
    with session_scope() as s:
        (st,) = statements(s, month("2026-10")[0], dt.datetime.now(UTC) + dt.timedelta(days=1), ["phys"])
    charged, rerated = (line for line in st.lines if line.kind in ("charge", "adjustment"))
    assert (charged.job, charged.user, charged.quantity, charged.units, charged.rate, charged.amount) == (
        "4242", "tux", D("12"), "core-hours", D("0.05"), D("-0.6"))
    # A re-rating is its charge's job's, by its user; its quantity and rate are the charge's, not its own.
    assert (rerated.job, rerated.user, rerated.service, rerated.quantity, rerated.units, rerated.rate, rerated.amount) == (
        "4242", "tux", "cluster-core-hours", None, None, None, D("0.3"))

    text = cli("statement", "phys", "--period", "2026-10").out
    (row,) = [line for line in text.splitlines() if "4242" in line]
    assert [cell.strip() for cell in row.split("│")[1:-1]] == [
        "2026-10-15 12:00:00 UTC", str(charged.transaction_id), "charge", "phys", "cluster-core-hours", "4242", "tux",
        "12", "core-hours", "0.05", "", "-0.60"]
    csv_rows = cli("statement", "phys", "--period", "2026-10", "--format", "csv").out.splitlines()
    assert csv_rows[0] == ("project,effective_at,transaction_id,kind,account,service,job,user,quantity,units,rate,"
                           "description,amount,late")
    assert csv_rows[2] == (f"phys,2026-10-15T12:00:00+00:00,{charged.transaction_id},charge,phys,cluster-core-hours,"
                           "4242,tux,12.00,core-hours,0.05,,-0.60,")
    (data,) = cli("statement", "phys", "--period", "2026-10", "--format", "json").json()
    assert {k: data["lines"][0][k] for k in ("job", "user", "quantity", "units", "rate", "amount")} == {
        "job": "4242", "user": "tux", "quantity": "12.00", "units": "core-hours", "rate": "0.05", "amount": "-0.60"}
    page = cli("statement", "phys", "--period", "2026-10", "--format", "html").out
    assert ("<td>4242</td><td>tux</td><td class=n>12</td><td>core-hours</td><td class=n>0.05</td>"
            "<td></td><td class=n>-0.60</td>") in page
