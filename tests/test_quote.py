"""Quotes: a job's most it can cost, priced as the charger prices it, and whether its account can pay."""

from __future__ import annotations

from decimal import Decimal

import pytest

from openacct.shortcuts import charge, deposit, get_system
from shared.db import session_scope
from shared.models import ChargeMultiplier
from shared.rating.directory import Unresolved
from shared.rating.quote import quote

D = Decimal


@pytest.fixture
def funded(quickstart: None) -> None:
    deposit("phys", "10", start="2000-01-01")
    with session_scope() as s:
        s.add(ChargeMultiplier(system_id=get_system("cluster").id, kind="partition", name="big", multiplier=D("2")))


@pytest.mark.usefixtures("funded")
def test_a_quote_prices_cpus_times_the_time_limit_with_multipliers() -> None:
    with session_scope() as s:
        plain = quote(s, "cluster", "phys", minutes=120, cpus=16)
        big = quote(s, "cluster", "phys", minutes=120, cpus=16, partition="big")
    assert (plain.total, plain.lines[0].quantity, plain.available, plain.affordable) == (D("1.6"), D("32"), D("10"), True)
    assert big.total == D("3.2")


@pytest.mark.usefixtures("funded")
def test_what_is_already_charged_counts_against_a_quote() -> None:
    charge("phys", "cluster-core-hours", "150", user="tux")  # 7.50 of 10
    with session_scope() as s:
        q = quote(s, "cluster", "phys", minutes=60, cpus=60)  # 3.00 > 2.50 left
    assert (q.available, q.affordable) == (D("2.5"), False)


@pytest.mark.usefixtures("funded")
def test_a_quote_gives_the_chargers_reasons() -> None:
    with session_scope() as s, pytest.raises(Unresolved, match="unknown account 'nope'"):
        quote(s, "cluster", "nope", minutes=60, cpus=1)
    with session_scope() as s, pytest.raises(Unresolved, match="has no service for gpu use"):
        quote(s, "cluster", "phys", minutes=60, cpus=1, gpus=1)


@pytest.mark.usefixtures("funded")
def test_the_quote_command(cli) -> None:  # type: ignore[no-untyped-def]
    ok = cli("quote", "--system", "cluster", "--account", "phys", "--cpus", "16", "--time", "02:00:00", "--json")
    assert ok.code == 0 and ok.json()["total"] == "1.60" and ok.json()["affordable"] is True
    too_much = cli("quote", "--system", "cluster", "--account", "phys", "--cpus", "1000", "--time", "1-00:00:00")
    assert too_much.code == 1 and "CANNOT pay" in too_much.out
    bad = cli("quote", "--system", "cluster", "--account", "phys", "--time", "soon")
    assert bad.code != 0 and "bad --time 'soon'" in bad.err
