"""``price`` and ``rounded`` work in integers (the charger prices thousands of charges a batch):
they must give exactly what the Fraction arithmetic they replaced gave, for every input, sign,
scale and size, half-way cases and refusals included. The reference below is that code as it was."""

from __future__ import annotations

import random
from decimal import Decimal
from fractions import Fraction

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from shared.errors import InvalidInput
from shared.models import MONEY_SCALE
from shared.money import MAX_STORED_MONEY
from shared.rating.price import ONE, hours, price, rounded, share

_SCALE = 10**MONEY_SCALE
_HALF = Fraction(1, 2)


def reference_rounded(value: Decimal | Fraction) -> Decimal:
    exact = Fraction(value)
    units = int(abs(exact) * _SCALE + _HALF)
    return Decimal(units if exact >= 0 else -units).scaleb(-MONEY_SCALE)


def reference_price(quantity: Decimal | Fraction, rate: Decimal, multiplier: Decimal = ONE) -> Decimal:
    amount = reference_rounded(Fraction(quantity) * Fraction(rate) * Fraction(multiplier))
    if amount.copy_abs() >= MAX_STORED_MONEY:
        raise InvalidInput(f"amount {amount:.6E} is too large to record (the limit is {MAX_STORED_MONEY:,.0f}); "
                           "check the quantity and the rate")
    return amount


def outcome(f, *args):  # type: ignore[no-untyped-def]
    """What a call gives: its value with its exact digits and exponent, or its exception."""
    try:
        value = f(*args)
    except Exception as exc:  # noqa: BLE001 - the same refusal is part of "the same"
        return ("raised", type(exc), str(exc))
    return ("value", value.as_tuple(), str(value))


decimals = st.decimals(allow_nan=False, allow_infinity=False, places=None,
                       min_value=Decimal("-1e12"), max_value=Decimal("1e12")) | st.builds(
    lambda digits, exponent, negative: Decimal((int(negative), tuple(int(d) for d in str(digits)), exponent)),
    st.integers(0, 10**30), st.integers(-30, 12), st.booleans())
fractions = st.builds(Fraction, st.integers(-(10**20), 10**20), st.integers(1, 10**9))
quantities = decimals | fractions | st.builds(hours, st.integers(0, 10_000_000), st.integers(0, 400 * 86400))


@settings(max_examples=4000, deadline=None)
@given(quantities)
def test_rounded_is_the_fractions_rounding(value: Decimal | Fraction) -> None:
    assert outcome(rounded, value) == outcome(reference_rounded, value)


@settings(max_examples=4000, deadline=None)
@given(quantities, decimals, decimals)
def test_price_is_the_fractions_price(quantity: Decimal | Fraction, rate: Decimal, multiplier: Decimal) -> None:
    assert outcome(price, quantity, rate, multiplier) == outcome(reference_price, quantity, rate, multiplier)
    assert outcome(share, rate, multiplier) == outcome(reference_price, rate, ONE, multiplier)


def test_many_job_shaped_prices_and_every_half_way_case() -> None:
    rnd = random.Random(16)
    rates = [Decimal("36"), Decimal("0.0617250"), Decimal("1.5"), Decimal("0.000001"), Decimal("-2.25"),
             Decimal("123456.789012"), Decimal("0"), Decimal("-0"), Decimal("7E+3"), Decimal("1E-20")]
    multipliers = [ONE, Decimal("0.5"), Decimal("1.25"), Decimal("2"), Decimal("0.333333"), Decimal("1E+1")]
    for _ in range(50_000):
        quantity = hours(rnd.randint(0, 4096), rnd.randint(0, 400 * 86400))
        rate, multiplier = rnd.choice(rates), rnd.choice(multipliers)
        assert outcome(price, quantity, rate, multiplier) == outcome(reference_price, quantity, rate, multiplier)
        assert outcome(rounded, quantity) == outcome(reference_rounded, quantity)
    for units in range(-3000, 3000):  # exactly half a millionth, both signs: away from zero
        half = Fraction(2 * units + 1, 2 * _SCALE)
        assert rounded(half) == reference_rounded(half)
        assert rounded(Decimal(2 * units + 1).scaleb(-7)) == reference_rounded(Decimal(2 * units + 1).scaleb(-7))
    assert rounded(Fraction(1, 2 * _SCALE)) == Decimal("0.000001")
    assert rounded(Fraction(-1, 2 * _SCALE)) == Decimal("-0.000001")
    assert price(hours(1, 2), Decimal(36)) == Decimal("0.02")  # docs/ledger.md: not 0.020016


@pytest.mark.parametrize("bad", [Decimal("NaN"), Decimal("sNaN"), Decimal("Infinity"), Decimal("-Infinity")])
def test_what_cannot_be_priced_is_refused_as_before(bad: Decimal) -> None:
    assert outcome(rounded, bad) == outcome(reference_rounded, bad)
    assert outcome(price, bad, Decimal(1)) == outcome(reference_price, bad, Decimal(1))
    assert outcome(price, Fraction(1, 3), bad) == outcome(reference_price, Fraction(1, 3), bad)
    assert outcome(rounded, bad)[0] == "raised"


def test_too_large_is_refused_with_the_same_reason() -> None:
    huge = MAX_STORED_MONEY * 10
    assert outcome(price, huge, Decimal(1)) == outcome(reference_price, huge, Decimal(1))
    assert outcome(price, Decimal("-0.0000005") + MAX_STORED_MONEY, ONE) == \
        outcome(reference_price, Decimal("-0.0000005") + MAX_STORED_MONEY, ONE)
    with pytest.raises(InvalidInput):
        price(huge, Decimal(1))
