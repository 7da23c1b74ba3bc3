"""The usage rollup against the ledger: the same rows however often a day is rolled up, and
reports whose totals are the ledger's."""

from __future__ import annotations

import datetime as dt
from decimal import Decimal

import pytest
from sqlalchemy import func, select, update

from openacct.shortcuts import deposit, refund
from services.charger.batch import charge_events
from services.reporter.usage import report, rollup
from shared.db import session_scope
from shared.models import Job, LedgerTransaction, UsageDaily
from tests.events import job_completed, raw

D = Decimal
UTC = dt.UTC
DAY1, DAY2 = dt.date(2026, 11, 20), dt.date(2026, 11, 21)
TODAY = dt.datetime.now(UTC).date()  # refunds count on the day they are made, as in the ledger


def end_on(day: dt.date, hour: int) -> dt.datetime:
    return dt.datetime.combine(day, dt.time(hour), UTC)


@pytest.fixture
def jobs(quickstart: None) -> None:
    deposit("phys", "1000", start="2026-01-01")
    deposit("chem", "1000", start="2026-01-01")
    events = [
        job_completed(1, user="tux", account="phys", cpus=10, seconds=3600, end=end_on(DAY1, 10)),
        job_completed(2, user="bob", account="phys", cpus=20, seconds=3600, end=end_on(DAY1, 11), partition="gpu"),
        job_completed(3, user="tux", account="chem", cpus=4, seconds=7200, end=end_on(DAY1, 12)),
        job_completed(4, user="tux", account="phys", cpus=2, seconds=3600, end=end_on(DAY2, 1)),
    ]
    with session_scope() as s:
        assert charge_events(s, [raw(e).decode() for e in events]).charged == 4
        bobs = s.scalar(select(LedgerTransaction).join(Job, Job.id == LedgerTransaction.job_id)
                        .where(LedgerTransaction.kind == "charge", Job.job_id == "2"))
    refund(bobs, "0.25")


def rows() -> list[tuple]:  # type: ignore[type-arg]
    with session_scope() as s:
        return sorted(tuple(getattr(r, c) for c in ("day", "project_id", "account_id", "user_id", "partition",
                                                     "jobs", "quantity", "charged", "refunded"))
                      for r in s.scalars(select(UsageDaily)))


@pytest.mark.usefixtures("jobs")
def test_rolling_a_day_up_again_gives_the_same_rows() -> None:
    with session_scope() as s:
        assert rollup(s, DAY1, DAY2) == 4  # phys/tux/batch, phys/bob/gpu, chem/tux, day 2 phys/tux
        assert rollup(s, DAY1, TODAY) == 5  # and today's refund
    first = rows()
    for _ in range(2):
        with session_scope() as s:
            rollup(s, DAY1, TODAY)
    assert rows() == first
    with session_scope() as s:
        total = s.scalar(select(func.sum(LedgerTransaction.amount)).where(LedgerTransaction.kind == "charge"))
        assert s.scalar(select(func.sum(UsageDaily.charged))) == total
        assert s.scalar(select(func.sum(UsageDaily.refunded))) == D("0.25")


@pytest.mark.usefixtures("jobs")
def test_reports_by_project_user_and_partition() -> None:
    with session_scope() as s:
        rollup(s, DAY1, TODAY)
        by_project = {r["project"]: (r["jobs"], r["charged"], r["net"]) for r in report(s, DAY1, TODAY, ["project"])}
        by_user_partition = {(r["user"], r["partition"]): r["charged"] for r in report(s, DAY1, DAY2, ["user", "partition"])}
        by_service_day = report(s, DAY2, DAY2, ["service", "day"])
        by_pi = {r["pi"]: r["net"] for r in report(s, DAY1, TODAY, ["pi"])}
    # core-hours at 0.05: phys 10 + 20 + 2 core-hours, chem 8
    assert by_project == {"phys": (3, D("1.6"), D("1.35")), "chem": (1, D("0.4"), D("0.4"))}
    assert by_user_partition == {("tux", "batch"): D("1.0"), ("bob", "gpu"): D("1")}
    assert [(r["service"], r["day"], r["quantity"]) for r in by_service_day] == [("cluster-core-hours", DAY2, D("2"))]
    assert by_pi == {"bob": D("1.35"), "sue": D("0.4")}
    with pytest.raises(ValueError, match="break usage down by"):
        with session_scope() as s:
            report(s, DAY1, DAY2, ["colour"])


@pytest.mark.usefixtures("jobs")
def test_the_usage_command(cli) -> None:  # type: ignore[no-untyped-def]
    assert cli("report", "rollup", "--from", "2026-11-20", "--to", "2026-11-21").code == 0
    result = cli("report", "usage", "--from", "2026-11-20", "--to", "2026-11-21", "--by", "project,user", "--format", "json")
    assert result.code == 0, result.err
    assert {(r["project"], r["user"]): r["charged"] for r in result.json()} == {
        ("phys", "bob"): "1.00", ("phys", "tux"): "0.60", ("chem", "tux"): "0.40"}
    csv_out = cli("report", "usage", "--from", "2026-11-20", "--to", "2026-11-20", "--by", "partition", "--format", "csv")
    assert csv_out.out.splitlines()[0] == "partition,jobs,charged,refunded,net"
    assert "want YYYY-MM-DD" in cli("report", "usage", "--from", "20 Nov", "--to", "2026-11-21").err


@pytest.mark.usefixtures("jobs")
def test_usage_by_job_size_and_the_html_page(cli) -> None:  # type: ignore[no-untyped-def]
    with session_scope() as s:
        rollup(s, DAY1, DAY2)
        by_size = {r["size"]: (r["jobs"], r["charged"]) for r in report(s, DAY1, DAY2, ["size"])}
    assert by_size == {"9-64": (2, D("1.5")), "2-8": (2, D("0.5"))}  # 10 and 20 CPUs; 4 and 2
    page = cli("report", "usage", "--from", "2026-11-20", "--to", "2026-11-21", "--by", "project,size",
               "--format", "html").out
    assert page.startswith("<!doctype html>") and page.count("<svg") == 1 and page.count("class=shares") == 2
    assert "<th>size</th>" in page and "9-64" in page


@pytest.mark.usefixtures("quickstart")
def test_a_job_with_two_services_counts_once_and_re_rating_shows() -> None:
    from openacct.shortcuts import create_service, get_service, grant_service_access
    from services.refunder.rerate import rerate

    gpu = create_service("cluster-gpu-hours", system="cluster", units="gpu-hours", charge_rate="1")
    grant_service_access(gpu, project="phys")
    deposit("phys", "1000", start="2026-01-01")
    with session_scope() as s:
        charge_events(s, [raw(job_completed(9, cpus=10, gpus=2, seconds=3600, end=end_on(DAY1, 9))).decode()])
    with session_scope() as s:
        rerate(s, get_service("cluster-gpu-hours"), end_on(DAY1, 0), end_on(DAY2, 0), discount=D("0.5"))
        rollup(s, DAY1, TODAY)
        (phys,) = report(s, DAY1, TODAY, ["project"])
    assert phys["jobs"] == 1  # one job, charged for core-hours and GPU-hours
    assert phys["charged"] == D("0.5") + D("2") - D("1")  # 10 core-hours at 0.05, 2 GPU-hours at 1, half off the GPUs


@pytest.mark.usefixtures("quickstart")
def test_usage_is_right_without_a_rollup(cli) -> None:  # type: ignore[no-untyped-def]
    """Right after charging, nothing rolled up: a day long past never rolled up, and today."""
    deposit("phys", "1000", start="2026-01-01")
    just_now = dt.datetime.now(UTC) - dt.timedelta(minutes=1)
    with session_scope() as s:  # 10 core-hours on DAY1, 4 just now: 0.50 and 0.20 at 0.05
        assert charge_events(s, [raw(job_completed(11, cpus=10, seconds=3600, end=end_on(DAY1, 10))).decode(),
                                 raw(job_completed(12, cpus=4, seconds=3600, end=just_now)).decode()]).charged == 2
    today = just_now.date().isoformat()
    asked = ("report", "usage", "--from", DAY1.isoformat(), "--to", today, "--by", "project,day")
    assert cli(*asked, "--format", "json").json() == [
        {"project": "phys", "day": DAY1.isoformat(), "jobs": 1, "charged": "0.50", "refunded": "0.00", "net": "0.50"},
        {"project": "phys", "day": today, "jobs": 1, "charged": "0.20", "refunded": "0.00", "net": "0.20"}]
    table = cli(*asked).out
    assert [[cell.strip() for cell in line.split("│")[1:-1]] for line in table.splitlines() if line.startswith("│")] == [
        ["phys", DAY1.isoformat(), "1", "0.50", "0.00", "0.50"], ["phys", today, "1", "0.20", "0.00", "0.20"]]
    # Rolled up, it says the same; and what is charged today after a rollup shows at once.
    assert cli("report", "rollup", "--from", DAY1.isoformat(), "--to", today).code == 0
    assert cli(*asked, "--format", "json").json()[0]["charged"] == "0.50"
    with session_scope() as s:
        charge_events(s, [raw(job_completed(13, cpus=2, seconds=3600, end=just_now)).decode()])
    assert [(r["day"], r["jobs"], r["charged"]) for r in cli(*asked, "--format", "json").json()] == [
        (DAY1.isoformat(), 1, "0.50"), (today, 2, "0.30")]


@pytest.mark.usefixtures("jobs")
def test_a_day_the_rollup_settled_is_read_from_it() -> None:
    """Cheap: a day rolled up after it ended, past the days rolled up again, comes from usage_daily,
    not from the ledger (the rollup is altered here to tell the two apart)."""
    with session_scope() as s:
        rollup(s, DAY1, DAY2)
        s.execute(update(UsageDaily).where(UsageDaily.day == DAY1).values(charged=UsageDaily.charged * 10))
        by_day = {r["day"]: r["charged"] for r in report(s, DAY1, TODAY, ["day"])}
    assert by_day[DAY1] == D("19")  # 1.90 in the ledger, ten times that in the altered rollup
    assert by_day[DAY2] == D("0.1")
