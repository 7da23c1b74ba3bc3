"""Parsing and formatting of money, quantities and rates: Decimal in, Decimal out, never float.

How amounts are shown, in every command, statement and report:

- to people (tables, text, HTML pages, alert messages): ``display``, to the center's
  ``money_places`` (default 2), rounded half to even, thousands grouped: ``-1,564.41``. Only the
  display is rounded: the ledger, ``--json`` and CSV keep the exact amount (``money_str``).
- signed as on a bank statement, wherever an amount is a movement of money (a transaction, a
  statement line): what it did to the account's available money, money in positive (deposits,
  refunds, releases, transfers in), money out negative (charges, holds, transfers out). A total
  named for what it counts (``charged``, ``refunded``, ``allocated``, "charge #12: 6.00") is its
  size, positive.
- quantities and rates are measures, not money: shown exactly, every value of a column to the
  same places (``measure``), so that a column lines up on the point.
"""

from __future__ import annotations

from collections.abc import Iterable
from decimal import ROUND_HALF_EVEN, Decimal, InvalidOperation

from shared.config import get_settings
from shared.errors import InvalidInput

# The shape of every stored number (shared.models' Money, Quantity and Rate columns are made of
# these; written here, so that what only formats or parses money needs no database layer):
# digits in all, and after the point for money and quantities, and for rates.
PRECISION = 24
MONEY_SCALE = 6
RATE_SCALE = 10
# NUMERIC(24, 6) holds 18 digits before the point; stay well inside it.
MAX_MONEY = Decimal("1e15")
# What the columns can hold at all: NUMERIC(24, 10) rates 14 digits, NUMERIC(24, 6) amounts 18.
MAX_RATE = Decimal(10) ** (PRECISION - RATE_SCALE)
MAX_STORED_MONEY = Decimal(10) ** (PRECISION - MONEY_SCALE)


def parse_decimal(
    value: object,
    what: str,
    *,
    scale: int = MONEY_SCALE,
    allow_zero: bool = False,
    allow_negative: bool = False,
    limit: Decimal = MAX_MONEY,
) -> Decimal:
    """A finite Decimal with at most ``scale`` places, or InvalidInput naming ``what``."""
    if isinstance(value, bool) or isinstance(value, float):
        raise InvalidInput(
            f"{what} must be a decimal string or Decimal, not {type(value).__name__} {value!r} "
            "(binary floats cannot hold amounts of money exactly)"
        )
    if isinstance(value, int):
        number = Decimal(value)
    elif isinstance(value, Decimal):
        number = value
    elif isinstance(value, str):
        try:
            number = Decimal(value.strip().replace("_", ""))
        except InvalidOperation:
            raise InvalidInput(f"{what} {value!r} is not a number") from None
    else:
        raise InvalidInput(f"{what} must be a number, not {type(value).__name__}")
    if not number.is_finite():
        raise InvalidInput(f"{what} must be a finite number, not {value!r}")
    # copy_abs, not abs(): abs() rounds to the context and overflows on values such as 1e1000000.
    if number.copy_abs() >= limit:
        raise InvalidInput(f"{what} {value!r} is too large (the limit is {limit:,.0f})")
    quantum = Decimal(1).scaleb(-scale)
    if number != number.quantize(quantum):
        raise InvalidInput(f"{what} {value!r} has more than {scale} decimal places")
    if number < 0 and not allow_negative:
        raise InvalidInput(f"{what} must not be negative, got {value!r}")
    if number == 0 and not allow_zero:
        raise InvalidInput(f"{what} must be greater than zero, got {value!r}")
    return number.quantize(quantum)


def parse_money(value: object, what: str = "amount", **kwargs: bool) -> Decimal:
    return parse_decimal(value, what, scale=MONEY_SCALE, **kwargs)


def parse_rate(value: object, what: str = "charge rate") -> Decimal:
    return parse_decimal(value, what, scale=RATE_SCALE, allow_zero=True, limit=MAX_RATE)


def money_str(value: Decimal) -> str:
    """Exact, without trailing zeros beyond the cents: 1000 -> '1000.00', 0.0617250 -> '0.061725'."""
    value = Decimal(value)
    cents = value.quantize(Decimal("0.01"))
    if cents == value:
        return f"{cents:f}"
    return f"{value.normalize():f}"


def display(amount: Decimal) -> str:
    """An amount of money as people read it: to ``money_places`` decimals, rounded half to even,
    thousands grouped. 1564.40728 -> '1,564.41', -0.168 -> '-0.17', 5000 -> '5,000.00'."""
    return grouped(amount, get_settings().money_places)


def measure(value: Decimal, places: int | None = None) -> str:
    """A quantity or a rate, exactly: to ``places`` decimals (at least those it needs; a column
    passes ``exact_places`` of all its values), thousands grouped. 120 -> '120', 0.0617250 -> '0.061725'."""
    return grouped(value, max(exact_places([value]), places or 0))


def exact_places(values: Iterable[Decimal]) -> int:
    """The fewest decimal places that show every one of ``values`` exactly."""
    return max((max(0, -int(Decimal(v).normalize().as_tuple().exponent)) for v in values), default=0)


def grouped(value: Decimal, places: int) -> str:
    """``value`` to ``places`` decimals, rounded half to even, thousands grouped; never '-0.00'."""
    rounded = Decimal(value).quantize(Decimal(1).scaleb(-places), ROUND_HALF_EVEN)
    return f"{rounded.copy_abs() if rounded == 0 else rounded:,f}"
