"""Quantities, rates and multipliers, and the one function that prices them.

A job's quantity is exact (CPUs x seconds / 3600 is a fraction, not a 6-place decimal): it is
priced exactly and the money rounded once, half up to the ledger's 6 places. The quantity a
charge shows is rounded for display only, so a 2-second job of one CPU at 36 per core-hour costs
0.02, not 0.020016. Every path that prices (the charger, quotes, admission, re-rating, automatic
and requested refunds, reconcile) goes through ``price`` and ``share``.
"""

from __future__ import annotations

import datetime as dt
from bisect import bisect_right
from collections.abc import Iterable, Mapping
from decimal import Decimal
from fractions import Fraction
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from shared.errors import InvalidInput, NotFound
from shared.models import ServiceRate
from shared.money import MAX_STORED_MONEY, MONEY_SCALE, parse_decimal

Quantity = Decimal | Fraction
ONE = Decimal(1)
SECONDS_PER_HOUR = 3600
_SCALE = 10**MONEY_SCALE


def hours(count: int, seconds: int) -> Fraction:
    """``count`` of a resource (CPUs, GPUs, nodes) used for ``seconds``, in hours, exactly."""
    return Fraction(count * seconds, SECONDS_PER_HOUR)


def _ratio(value: Quantity | int) -> tuple[int, int]:
    """``value`` exactly, as numerator and (positive) denominator: what ``Fraction(value)`` holds,
    without building one (the charger prices thousands of charges per batch)."""
    if isinstance(value, (Decimal, Fraction, int)):  # a tuple: isinstance of a union is slower
        return value.as_integer_ratio()  # NaN and infinities raise as Fraction(value) does
    exact = Fraction(value)
    return exact.numerator, exact.denominator


def _rounded_ratio(numerator: int, denominator: int) -> Decimal:
    """numerator / denominator (denominator > 0) half up (away from zero) to 6 places, in integers:
    floor(|n| x 10^6 / d + 1/2) = (2 |n| 10^6 + d) // 2d, exactly as the Fraction it stands for."""
    units = (2 * _SCALE * abs(numerator) + denominator) // (2 * denominator)
    return Decimal(units if numerator >= 0 else -units).scaleb(-MONEY_SCALE)


def rounded(value: Quantity) -> Decimal:
    """Half up (away from zero) to the ledger's 6 places, from the exact value."""
    return _rounded_ratio(*_ratio(value))


def price(quantity: Quantity, rate: Decimal, multiplier: Decimal = ONE) -> Decimal:
    """quantity x rate x multiplier, exactly, rounded once: the price of every charge."""
    qn, qd = _ratio(quantity)
    rn, rd = _ratio(rate)
    mn, md = _ratio(multiplier)
    amount = _rounded_ratio(qn * rn * mn, qd * rd * md)
    if amount.copy_abs() >= MAX_STORED_MONEY:
        raise InvalidInput(f"amount {amount:.6E} is too large to record (the limit is {MAX_STORED_MONEY:,.0f}); "
                           "check the quantity and the rate")
    return amount


def share(amount: Decimal, fraction: Decimal) -> Decimal:
    """``fraction`` of ``amount``, rounded as prices are: a refund of a fraction, automatic or asked."""
    return price(amount, ONE, fraction)


def parse_fraction(value: object, what: str = "fraction") -> Decimal:
    """A fraction from 0 (excluded) to 1, such as 0.5: of a charge to refund."""
    fraction = parse_decimal(value, what, limit=Decimal(2))
    if fraction > 1:
        raise InvalidInput(f"{what} {value!r} is more than 1 (the whole)")
    return fraction


def charged_quantity(quantity: Decimal | None, details: Mapping[str, Any]) -> Quantity:
    """The exact quantity a charge was priced from: a job's count x elapsed seconds where the
    charge recorded them (its ``quantity`` column is rounded for display), else its quantity."""
    count, seconds = details.get("count"), details.get("elapsed_seconds")
    if isinstance(count, int) and isinstance(seconds, int):
        return hours(count, seconds)
    return quantity or Decimal(0)


# --------------------------------------------------------------------------- rates

RateTables = dict[int, tuple[list[dt.datetime], list[Decimal]]]  # service -> (starts, rates), in order


def rate_tables(session: Session, service_ids: Iterable[int]) -> RateTables:
    """Every rate of these services, for ``price_at``: one query for a whole batch."""
    tables: RateTables = {}
    for service_id, start, rate in session.execute(
        select(ServiceRate.service_id, ServiceRate.effective_from, ServiceRate.rate)
        .where(ServiceRate.service_id.in_(list(service_ids)))
        .order_by(ServiceRate.service_id, ServiceRate.effective_from)
    ):
        starts, rates = tables.setdefault(service_id, ([], []))
        starts.append(start)
        rates.append(rate)
    return tables


def rate_in(tables: RateTables, service_id: int, at: dt.datetime) -> Decimal | None:
    """The rate of a service in effect at ``at``; None where none is."""
    starts, rates = tables.get(service_id, ([], []))
    i = bisect_right(starts, at)
    return None if i == 0 else rates[i - 1]


def price_at(tables: RateTables, service_id: int, at: dt.datetime, quantity: Quantity,
             multiplier: Decimal) -> tuple[Decimal, Decimal] | None:
    """(rate, price) of ``quantity`` of a service at the rate in effect at ``at``; None where no
    rate is in effect then."""
    rate = rate_in(tables, service_id, at)
    return None if rate is None else (rate, price(quantity, rate, multiplier))


def rate_at(session: Session, service_id: int, at: dt.datetime, name: str = "") -> Decimal:
    """The rate of one service at ``at``, or NotFound saying which service and when."""
    rate = rate_in(rate_tables(session, [service_id]), service_id, at)
    if rate is None:
        raise NotFound(f"service {name or service_id!r} has no charge rate in effect at {at.isoformat()}")
    return rate
