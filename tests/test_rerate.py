"""Re-rating: charges priced again at the rate in effect, or with a discount; adjustments that
refer to each charge; a second run changes nothing; refunded charges are left alone."""

from __future__ import annotations

from decimal import Decimal

import pytest
from sqlalchemy import select

from openacct.shortcuts import balance, charge, deposit, get_service, refund, set_service_rate
from services.refunder.rerate import rerate
from shared import ledger
from shared.db import session_scope
from shared.errors import InvalidInput
from shared.models import LedgerTransaction
from shared.timestamps import parse_time

D = Decimal
OCT, NOV = parse_time("2026-10-01T00:00:00Z", "t"), parse_time("2026-11-01T00:00:00Z", "t")


@pytest.fixture
def october(quickstart: None) -> dict[str, LedgerTransaction]:
    deposit("phys", "1000", start="2026-01-01")
    deposit("chem", "1000", start="2026-01-01")
    return {
        "phys-a": charge("phys", "cluster-core-hours", "100", user="tux", effective_at="2026-10-03T10:00:00Z"),
        "phys-b": charge("phys", "cluster-core-hours", "300", user="tux", effective_at="2026-10-20T10:00:00Z"),
        "chem": charge("chem", "cluster-core-hours", "200", user="sue", effective_at="2026-10-10T10:00:00Z"),
        "phys-sept": charge("phys", "cluster-core-hours", "50", user="tux", effective_at="2026-09-20T10:00:00Z"),
    }


def run(**options: object):  # type: ignore[no-untyped-def]
    with session_scope() as s:
        return {r.project: r for r in rerate(s, get_service("cluster-core-hours"), OCT, NOV, **options)}


def adjustments() -> list[LedgerTransaction]:
    with session_scope() as s:
        return list(s.scalars(select(LedgerTransaction).where(LedgerTransaction.kind == "adjustment")
                              .order_by(LedgerTransaction.id)))


def test_a_rate_corrected_after_the_fact_is_applied_once(october) -> None:  # type: ignore[no-untyped-def]
    set_service_rate("cluster-core-hours", "0.04", effective_from="2026-10-15T00:00:00Z")  # from mid-October
    before = balance("phys").available
    first = run()
    assert (first["phys"].examined, first["phys"].changed, first["phys"].difference) == (2, 1, D("-3"))
    assert (first["chem"].examined, first["chem"].changed) == (1, 0)  # the 10th: still 0.05
    (adj,) = adjustments()
    assert (adj.refers_to_id, adj.details["delta"], adj.account_id) == (october["phys-b"].id, "-3.00", october["phys-b"].account_id)
    assert balance("phys").available == before + D("3")
    again = run()
    assert again["phys"].changed == 0 and len(adjustments()) == 1  # nothing left to change
    with session_scope() as s:
        assert ledger.verify(s) == []


def test_a_discount_for_one_project_and_a_dry_run(october) -> None:  # type: ignore[no-untyped-def]
    dry = run(projects=["chem"], discount=D("0.2"), dry_run=True)
    assert list(dry) == ["chem"] and dry["chem"].difference == D("-2")  # 200 x 0.05 = 10, less 20 %
    assert adjustments() == []
    done = run(projects=["chem"], discount=D("0.2"))
    assert done["chem"].difference == D("-2") and len(adjustments()) == 1
    assert run(projects=["chem"], discount=D("0.2"))["chem"].changed == 0
    # Without the discount the charge is priced back up to the full rate.
    assert run(projects=["chem"])["chem"].difference == D("2")
    assert balance("chem").charged == D("10")


def test_a_refunded_charge_is_left_alone(october) -> None:  # type: ignore[no-untyped-def]
    refund(october["phys-a"], "1")
    result = run(discount=D("0.5"))
    assert (result["phys"].refunded_skipped, result["phys"].changed) == (1, 1)


@pytest.mark.parametrize(("options", "message"), [
    ({"discount": D("1")}, "must be a fraction"), ({"projects": ["nope"]}, "no project named 'nope'"),
])
def test_bad_requests_are_refused(october, options, message) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(InvalidInput, match=message):
        run(**options)


def test_the_command(october, cli) -> None:  # type: ignore[no-untyped-def]
    result = cli("rerate", "--service", "cluster-core-hours", "--from", "2026-10-01", "--to", "2026-11-01",
                 "--discount", "0.1", "--dry-run", "--json")
    assert result.code == 0, result.err
    # 10 % off: money back to each project, positive as on its statement.
    assert {r["project"]: r["difference"] for r in result.json()} == {"chem": "1.00", "phys": "2.00"}
    assert adjustments() == []
    assert cli("rerate", "--service", "cluster-core-hours", "--from", "2026-10-01", "--to", "2026-11-01",
               "--discount", "x").code != 0


def test_a_refund_after_a_rerate_gives_back_the_rerated_price(october) -> None:  # type: ignore[no-untyped-def]
    run(projects=["chem"], discount=D("0.5"))  # chem's 10.00 charge now costs 5.00
    before = balance("chem").available
    refund(october["chem"], reason="job lost")
    assert balance("chem").available == before + D("5")  # not 10: that would create money
    with session_scope() as s:
        assert ledger.verify(s) == []


def test_changing_the_discount_back_and_forth_ends_at_the_last_one(october) -> None:  # type: ignore[no-untyped-def]
    for discount in ("0.2", "0", "0.2"):
        run(projects=["chem"], discount=D(discount))
    assert balance("chem").charged == D("8")
    assert [a.details["delta"] for a in adjustments()] == ["-2.00", "2.00", "-2.00"]
    with pytest.raises(InvalidInput, match="must be a fraction"):
        run(discount=D("NaN"))
