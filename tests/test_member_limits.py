"""Per-member spending limits: what counts against a cap (charges less refunds in the period,
and open holds), admission control's real decision refusing the job that would pass it (and no
other member's), the month resetting it, and what ``openacct limit`` and ``balance`` print."""

from __future__ import annotations

import datetime as dt
import threading
from decimal import Decimal

import pytest
from sqlalchemy import Connection, select, text

from openacct.shortcuts import (
    charge,
    create_account,
    deposit,
    get_project,
    get_user,
    grant_service_access,
    refund,
)
from services.admission.decide import AdmissionRequest, Decision, decide
from services.charger.batch import charge_events
from shared import member_limits, roles
from shared.config import Settings
from shared.db import new_session, session_scope
from shared.errors import InvalidInput, NotFound
from shared.member_limits import MemberUse
from shared.models import Job
from shared.rating.jobs import REFUSED
from tests.conftest import Cli
from tests.events import job_completed, raw
from tests.test_admission import ask, held, request, set_policy

D = Decimal
UTC = dt.UTC
COST = D("0.30")  # request(): 6 CPUs for 60 minutes of cluster-core-hours at 0.05
OVER = ("the spending limit of user 'tux' in project 'phys' (per month) cannot cover this job: "
        "it may cost up to 0.30 (60 min limit)")

quick = pytest.mark.usefixtures("quickstart")


def cap(user: str, amount: str, period: str = "month", project: str = "phys") -> MemberUse:
    with session_scope() as s:
        return member_limits.set_limit(s, get_project(project), user, amount, period, actor="test")


def use(user: str = "tux", project: str = "phys", at: dt.datetime | None = None) -> MemberUse:
    with session_scope() as s:
        [found] = member_limits.uses(s, get_project(project), user_id=get_user(user).id, at=at)
        return found


def as_user(req: AdmissionRequest, user: str) -> AdmissionRequest:
    return AdmissionRequest(**{**req.model_dump(), "user": user})


def core_hours(quantity: str, *, user: str = "tux", account: str = "phys", at: dt.datetime | None = None):  # type: ignore[no-untyped-def]
    """A charge at 0.05 a core-hour (8 -> 0.40)."""
    return charge(account, "cluster-core-hours", quantity, user=user, effective_at=at)


@quick
def test_a_cap_is_set_replaced_and_refused_when_it_makes_no_sense() -> None:
    set_now = cap("tux", "1")
    assert (set_now.cap, set_now.spent, set_now.left, set_now.period, set_now.actor) == (D(1), 0, D(1), "month", "test")
    assert set_now.since == member_limits.month(dt.datetime.now(UTC))[0] and set_now.since.day == 1
    assert cap("tux", "2.50", "allocation").cap == D("2.50") and use().period == "allocation"  # replaced
    assert cap("tux", "0").cap == 0  # nothing that costs money
    with pytest.raises(NotFound, match="user 'sue' is not a member of project 'phys'"):
        cap("sue", "1")
    with pytest.raises(NotFound, match="user 'nobody' is not a member of project 'phys'"):  # no tell
        cap("nobody", "1")
    with pytest.raises(InvalidInput, match="period 'week' is not one of month, allocation"):
        cap("tux", "1", "week")
    with pytest.raises(InvalidInput, match="must not be negative"):
        cap("tux", "-1")
    with session_scope() as s:
        member_limits.clear_limit(s, get_project("phys"), "tux")
        assert member_limits.uses(s) == []
        with pytest.raises(NotFound, match="user 'tux' has no spending limit in project 'phys'"):
            member_limits.clear_limit(s, get_project("phys"), "tux")


@quick
def test_charges_less_refunds_and_open_holds_count_in_the_project_only() -> None:
    deposit("phys", "10", start="2000-01-01")
    deposit("chem", "10", start="2000-01-01")
    cap("tux", "5")
    assert ask(request(1)).held == COST
    assert (use().held, use().charged, use().spent) == (COST, 0, COST)
    core_hours("8")  # 0.40, by hand
    core_hours("100", user="bob")  # another member's: not tux's
    core_hours("100", account="chem")  # tux's, in another project
    assert (use().charged, use().spent, use().left) == (D("0.40"), D("0.70"), D("4.30"))
    # The job ends: its charge for actual use (30 of its 60 minutes) takes the hold's place.
    end = dt.datetime.now(UTC).replace(microsecond=0) - dt.timedelta(minutes=1)
    event = job_completed(2, cpus=6, seconds=1800, end=end)
    started = AdmissionRequest(**{**request(2).model_dump(), "start_time": dt.datetime.fromisoformat(event["start_time"]),
                                  "submit_time": dt.datetime.fromisoformat(event["submit_time"])})
    assert ask(started).held == COST
    with session_scope() as s:
        charge_events(s, [raw(event).decode()])
    assert (use().held, use().charged) == (COST, D("0.55"))  # job 1's hold; 0.40 + 0.15
    txn = core_hours("2")  # 0.10
    refund(txn, "0.04")
    assert use().charged == D("0.61")


@quick
def test_a_job_that_would_pass_the_cap_is_refused_and_no_other_member_is() -> None:
    deposit("phys", "10", start="2000-01-01")
    cap("tux", "0.50")
    start = dt.datetime.now(UTC).replace(microsecond=0)
    first = ask(request(1, start=start))
    assert first.admit and first.held == COST
    second = ask(request(2))  # 0.30 held + 0.30 > 0.50
    assert (second.admit, second.policy, second.reason, second.cost) == (False, "reject", OVER, COST)
    assert held() == COST  # nothing held for it
    with session_scope() as s:  # it never ran: the record of its requeue charges nothing
        [job] = s.scalars(select(Job).where(Job.job_id == "2")).all()
        assert (job.state, job.charge_policy) == ("PENDING", REFUSED)
    # bob, in the same project, has no cap: the project's money is his to spend.
    assert ask(as_user(request(3), "bob")).held == COST
    # A job of tux's within what is left (2 CPUs: 0.10) is held and starts.
    small = ask(request(4, cpus=2))
    assert (small.admit, small.held) == (True, D("0.10"))
    assert (use().spent, use().left) == (D("0.40"), D("0.10"))
    # The first job's prolog asking again is admitted again, holding once, though the cap is full.
    again = ask(request(1, start=start))
    assert again.admit and again.hold_id == first.hold_id and held() == 2 * COST + D("0.10")
    # A cap of 0 lets nothing that costs money run.
    cap("bob", "0")
    assert not ask(as_user(request(5), "bob")).admit


@quick
def test_allow_and_notify_start_a_job_past_the_cap_saying_so() -> None:
    deposit("phys", "10", start="2000-01-01")
    cap("tux", "0.10")
    set_policy("phys", "allow")
    allowed = ask(request(1))
    assert (allowed.admit, allowed.held) == (True, COST)
    assert allowed.reason == f"{OVER}; started under policy allow, held 0.30 of 'phys' for at most 60 min"
    set_policy("phys", "notify")
    assert ask(request(2)).reason.startswith(f"{OVER}; started under policy notify")
    assert use().left == D("-0.50")  # what it passed the cap by


@quick
def test_refunds_give_room_back() -> None:
    deposit("phys", "10", start="2000-01-01")
    cap("tux", "0.50")
    txn = core_hours("8")  # 0.40
    assert ask(request(1)).reason == OVER
    refund(txn)
    assert use().spent == 0
    assert ask(request(2)).admit


@quick
def test_the_month_resets_it_and_the_allocation_does_not() -> None:
    deposit("phys", "10", start="2000-01-01")
    this_month = member_limits.month(dt.datetime.now(UTC))[0]
    last_month = this_month - dt.timedelta(days=1)
    cap("tux", "0.50")
    old = core_hours("8", at=last_month)  # 0.40, last month
    assert use().charged == 0 and ask(request(1)).admit
    assert use(at=last_month).charged == D("0.40")
    # A refund counts in its charge's period: this month's 0.30 held stays what it was.
    refund(old)
    assert (use().spent, use(at=last_month).charged) == (COST, 0)
    core_hours("8", at=last_month)
    cap("tux", "0.50", "allocation")  # since the allocation began (2000): last month counts
    assert use().since == dt.datetime(2000, 1, 1, tzinfo=UTC) and use().until is None
    assert (use().charged, use().spent) == (D("0.40"), D("0.70"))
    assert not ask(request(2)).admit


@quick
def test_the_admission_role_decides_under_a_cap(db_connection: Connection) -> None:
    deposit("phys", "10", start="2000-01-01")
    cap("tux", "0.50")
    roles.apply(db_connection)
    db_connection.execute(text("SET LOCAL ROLE openacct_admission"))
    assert ask(request(1)).admit and ask(request(2)).reason == OVER
    db_connection.execute(text("RESET ROLE"))
    db_connection.execute(text("SET LOCAL ROLE openacct_charger"))  # reads caps, sets none
    with pytest.raises(Exception, match="permission denied for table member_limits"):
        cap("tux", "100")


def test_two_jobs_of_a_member_at_once_on_two_accounts_cannot_both_fit(center) -> None:  # type: ignore[no-untyped-def]
    """The cap spans the project's accounts: a decision under it locks them all, so a second one
    on another account of the project waits for the first and counts what it held."""
    create_account("phys-b", project="phys")
    grant_service_access("cluster-core-hours", account="phys-b")
    deposit("phys-b", "1000", start="2000-01-01")
    cap("tux", "0.50")
    first = new_session()
    try:
        assert decide(first, request(1), Settings()).admit  # not committed yet
        second: list[Decision] = []
        other = threading.Thread(target=lambda: second.append(ask(request(2, account="phys-b"))))
        other.start()
        other.join(1.0)
        assert other.is_alive() and second == []  # waiting on the project's accounts
        first.commit()
    finally:
        first.close()
    other.join(30)
    assert [d.reason for d in second] == [OVER]


def _row(out: str, user: str) -> list[str]:
    [line] = [line for line in out.splitlines() if f" {user} " in line]
    return [cell.strip() for cell in line.strip().strip("│").split("│")]


def test_limit_list_and_balance_print_cap_spent_and_left_exactly(cli: Cli) -> None:
    assert cli("deposit", "phys", "10", "--start", "2000-01-01").code == 0
    assert cli("limit", "set", "phys", "tux", "10").out == "tux may spend 10.00 per month in phys: 0.00 spent, 10.00 left\n"
    core_hours("24.5")  # 1.225
    since = member_limits.month(dt.datetime.now(UTC))[0].date().isoformat()
    listed = cli("limit", "list")
    assert _row(listed.out, "tux") == ["phys", "tux", "month", since, "10.00", "1.22", "8.78"]  # half to even
    assert [line.split() for line in listed.out.splitlines()[:4] if "cap" in line] == [
        ["┃", "project", "┃", "user", "┃", "period", "┃", "since", "┃", "cap", "┃", "spent", "┃", "left", "┃"]]
    [exact] = cli("limit", "list", "phys", "--json").json()
    assert {k: exact[k] for k in ("user", "period", "cap", "charged", "held", "spent", "left")} == {
        "user": "tux", "period": "month", "cap": "10.00", "charged": "1.225", "held": "0.00", "spent": "1.225",
        "left": "8.775"}
    assert exact["set_by"].startswith("cli")
    balance = cli("balance", "phys")
    assert "member limits" in balance.out and _row(balance.out, "tux") == ["tux", "month", since, "10.00", "1.22", "8.78"]
    assert cli("balance", "phys", "--json").json()["limits"] == [exact]
    assert "limits" not in cli("balance", "chem", "--json").json()  # none set there
    assert "member limits" not in cli("balance", "chem").out
    refused = cli("limit", "set", "phys", "sue", "1")
    assert refused.code != 0 and "user 'sue' is not a member of project 'phys'" in refused.err
    assert cli("limit", "clear", "phys", "tux").out == "tux has no spending limit in phys\n"
    assert cli("limit", "list", "--json").json() == []
    assert "has no spending limit" in cli("limit", "clear", "phys", "tux").err
    # A cap is the membership's: removing the member removes it.
    cli("limit", "set", "phys", "tux", "1", "--period", "allocation")
    assert cli("member", "remove", "phys", "tux").code == 0
    assert cli("limit", "list", "--json").json() == []
