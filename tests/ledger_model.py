"""The ledger's money rules as a plain in-memory model, for tests/test_ledger_simulator.py.

No database and no cleverness: accounts are names, allocations are numbered in the order they
were made (the ledger breaks ties by allocation id, which grows the same way), and charges and
holds are known by their idempotency keys. An operation either changes the model and returns
the amount of the transaction it writes (None where it writes none), or raises ``Refused`` with
the error the ledger must raise. A refused operation may leave the model half changed: apply
each to a copy (``apply``).

The rules:
- an allocation is in force from ``starts_at`` until (not including) ``ends_at``; what it has
  left is allocated - charged + refunded;
- a charge (and a re-pricing upwards) draws on the account's allocations in force at its time
  that have money left, the one ending first first (no end: last), each giving what it has, up
  to what is still due; the rest falls on the account itself (its own row, ``None``);
- what a charge gives back (a refund, a re-pricing downwards) comes off the slices that still
  carry it, the one first drawn last;
- a refund may return what the charge costs now less its refunds; a charge with a refund is not
  re-priced;
- available = allocated - charged + refunded over the allocations in force, + the own row's
  refunded - charged, - held; a hold fits within available (+ the credit limits in force);
- a transfer moves available money, each slice drawn from the source becoming an allocation of
  the target from now, ending when its source ends;
- a hold sets money aside on the account's own row; a release, an expiry or its job's end (a
  settle) gives back what it still holds;
- a key seen before with the same request gives the first result and changes nothing; with
  another request it is refused.
"""

from __future__ import annotations

import copy
import datetime as dt
import functools
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from decimal import ROUND_HALF_UP, Decimal
from typing import Any

from shared.errors import IdempotencyConflict, InsufficientFunds, InvalidInput, NotFound

ZERO = Decimal(0)
QUANTUM = Decimal("0.000001")
CLOCK_SKEW = dt.timedelta(minutes=10)  # how far ahead of the clock a charge may be dated
HOLD_LIMITS = ("available", "credit", "none")

OWN = None  # the slice of a charge that no allocation covered: the account's own row


def round_money(value: Decimal) -> Decimal:
    return value.quantize(QUANTUM, rounding=ROUND_HALF_UP)


class Refused(Exception):
    """The ledger must refuse the request with ``error`` (or a subclass of it)."""

    def __init__(self, error: type[Exception], why: str) -> None:
        super().__init__(f"{error.__name__}: {why}")
        self.error = error


@dataclass
class Allocation:
    number: int  # order of creation, across accounts
    account: str
    allocated: Decimal
    starts_at: dt.datetime
    ends_at: dt.datetime | None
    credit_limit: Decimal = ZERO
    charged: Decimal = ZERO
    refunded: Decimal = ZERO

    @property
    def left(self) -> Decimal:
        return self.allocated - self.charged + self.refunded

    def in_force(self, at: dt.datetime) -> bool:
        return self.starts_at <= at and (self.ends_at is None or at < self.ends_at)

    def draw_order(self) -> tuple[bool, dt.datetime | None, int]:
        return (self.ends_at is None, self.ends_at, self.number)


@dataclass
class OwnRow:
    charged: Decimal = ZERO
    refunded: Decimal = ZERO
    held: Decimal = ZERO


@dataclass
class Charge:
    account: str
    effective_at: dt.datetime
    price: Decimal  # what it costs now: its amount, as re-priced since
    refunded: Decimal = ZERO
    # What each slice (an allocation's number, or OWN) still carries of it, in the order the
    # slices were first drawn.
    carried: dict[int | None, Decimal] = field(default_factory=dict)

    @property
    def refundable(self) -> Decimal:
        return self.price - self.refunded


@dataclass
class Hold:
    account: str
    remaining: Decimal
    expires_at: dt.datetime | None


@dataclass(frozen=True)
class Balance:
    allocated: Decimal
    charged: Decimal
    refunded: Decimal
    held: Decimal
    credit_limit: Decimal

    @property
    def available(self) -> Decimal:
        return self.allocated - self.charged + self.refunded - self.held


def idempotent(method: Callable[..., Decimal | None]) -> Callable[..., Decimal | None]:
    """The first argument is the key: a key seen with this request gives its first result and
    changes nothing; seen with another request, it is refused. A request that writes nothing
    (None) leaves its key unused."""

    @functools.wraps(method)
    def once(self: Ledger, key: str | None, *args: Any) -> Decimal | None:
        request = (method.__name__, args)
        if key is not None and key in self.done:
            first, result = self.done[key]
            if first != request:
                raise Refused(IdempotencyConflict, f"key {key!r} was used by {first}")
            return result
        result = method(self, key, *args)
        if key is not None and result is not None:
            self.done[key] = (request, result)
        return result

    return once


class Ledger:
    def __init__(self, now: dt.datetime, rates: list[tuple[dt.datetime, Decimal]], accounts: list[str]) -> None:
        self.now = now
        self.rates = sorted(rates)  # (effective from, rate)
        self.allocations: list[Allocation] = []
        self.own = {name: OwnRow() for name in accounts}
        self.charges: dict[str, Charge] = {}  # by key
        self.holds: dict[str, Hold] = {}  # by key
        self.done: dict[str, tuple[tuple[Any, ...], Decimal]] = {}  # key -> (request, result)
        self.written: Counter[str] = Counter()  # transactions written, by kind

    # ------------------------------------------------------------------ reading

    def allocations_of(self, account: str) -> list[Allocation]:
        return [a for a in self.allocations if a.account == account]

    def balance(self, account: str, at: dt.datetime) -> Balance:
        live = [a for a in self.allocations_of(account) if a.in_force(at)]
        own = self.own[account]
        return Balance(
            allocated=sum((a.allocated for a in live), ZERO),
            charged=sum((a.charged for a in live), own.charged),
            refunded=sum((a.refunded for a in live), own.refunded),
            held=own.held,
            credit_limit=sum((a.credit_limit for a in live), ZERO),
        )

    def rate_at(self, at: dt.datetime) -> Decimal | None:
        rates = [rate for start, rate in self.rates if start <= at]
        return rates[-1] if rates else None

    # ------------------------------------------------------------------ moving money

    def _draw(self, account: str, amount: Decimal, at: dt.datetime) -> list[tuple[Allocation | None, Decimal]]:
        """Split ``amount`` over the allocations in force at ``at``, the first to end first;
        the rest on the account's own row (None)."""
        slices: list[tuple[Allocation | None, Decimal]] = []
        rest = amount
        for allocation in sorted(self.allocations_of(account), key=Allocation.draw_order):
            if rest > 0 and allocation.left > 0 and allocation.in_force(at):
                take = min(allocation.left, rest)
                slices.append((allocation, take))
                rest -= take
        if rest > 0:
            slices.append((None, rest))
        return slices

    def _charge_slices(self, charge: Charge, amount: Decimal) -> None:
        for allocation, take in self._draw(charge.account, amount, charge.effective_at):
            if allocation is None:
                self.own[charge.account].charged += take
            else:
                allocation.charged += take
            slice_ = OWN if allocation is None else allocation.number
            charge.carried[slice_] = charge.carried.get(slice_, ZERO) + take

    def _give_back(self, charge: Charge, amount: Decimal, bucket: str) -> None:
        """Take ``amount`` off the slices carrying ``charge``, the one first drawn last:
        into ``refunded``, or (a re-pricing) out of ``charged``."""
        rest = amount
        for slice_ in reversed(list(charge.carried)):
            take = min(charge.carried[slice_], rest)
            if take <= 0:
                continue
            charge.carried[slice_] -= take
            rest -= take
            row: Allocation | OwnRow = self.own[charge.account] if slice_ is OWN else self.allocations[slice_]
            if bucket == "refunded":
                row.refunded += take
            else:
                row.charged -= take
        assert rest == 0, "a charge's slices carry what it costs less its refunds"

    def _new_allocation(self, account: str, amount: Decimal, starts_at: dt.datetime, ends_at: dt.datetime | None,
                        credit_limit: Decimal = ZERO) -> None:
        self.allocations.append(Allocation(len(self.allocations), account, amount, starts_at, ends_at, credit_limit))

    def _expire(self, accounts: list[str]) -> None:
        for hold in self.holds.values():
            if hold.account in accounts and hold.remaining > 0 and hold.expires_at is not None \
                    and hold.expires_at <= self.now:
                self.own[hold.account].held -= hold.remaining
                hold.remaining = ZERO
                self.written["release"] += 1

    # ------------------------------------------------------------------ operations

    @idempotent
    def deposit(self, key: str, account: str, amount: Decimal, starts_at: dt.datetime,
                ends_at: dt.datetime | None, credit_limit: Decimal) -> Decimal:
        self._new_allocation(account, amount, starts_at, ends_at, credit_limit)
        self.written["deposit"] += 1
        return amount

    @idempotent
    def charge(self, key: str, account: str, quantity: Decimal, effective_at: dt.datetime) -> Decimal:
        if effective_at > self.now + CLOCK_SKEW:
            raise Refused(InvalidInput, "effective time in the future")
        rate = self.rate_at(effective_at)
        if rate is None:
            raise Refused(NotFound, "no rate in effect then")
        price = round_money(quantity * rate)
        self.charges[key] = charge = Charge(account, effective_at, price)
        self._charge_slices(charge, price)
        self.written["charge"] += 1
        return price

    @idempotent
    def refund(self, key: str, charge_key: str, amount: Decimal | None, fraction: Decimal | None) -> Decimal | None:
        """``amount``, or ``fraction`` of what the charge costs now, or (neither) all that is
        left to refund."""
        charge = self.charges[charge_key]
        if fraction is not None:
            amount = round_money(fraction * charge.price)
            if amount == 0:
                return None
        elif amount is None:
            amount = charge.refundable
        if amount > charge.refundable or charge.refundable == 0:
            raise Refused(InvalidInput, f"{amount} is more than the {charge.refundable} left to refund")
        self._give_back(charge, amount, "refunded")
        charge.refunded += amount
        self.written["refund"] += 1
        return amount

    @idempotent
    def reprice(self, key: str | None, charge_key: str, price: Decimal) -> Decimal | None:
        charge = self.charges[charge_key]
        if charge.refunded > 0:
            raise Refused(InvalidInput, "a refunded charge is not re-priced")
        delta = price - charge.price
        if delta == 0:
            return None
        if delta < 0:
            self._give_back(charge, -delta, "charged")
        else:
            self._charge_slices(charge, delta)
        charge.price = price
        self.written["adjustment"] += 1
        return abs(delta)

    @idempotent
    def transfer(self, key: str, source: str, target: str, amount: Decimal) -> Decimal:
        if amount > self.balance(source, self.now).available:
            raise Refused(InsufficientFunds, f"{amount} is more than {source} has available")
        for allocation, take in self._draw(source, amount, self.now):
            assert allocation is not None, "available money is in allocations"
            allocation.allocated -= take
            self._new_allocation(target, take, self.now, allocation.ends_at)
        self.written["transfer"] += 1
        return amount

    @idempotent
    def hold(self, key: str, account: str, amount: Decimal, limit: str, fit: bool,
             expires_at: dt.datetime | None) -> Decimal | None:
        """Refused where ``amount`` is more than ``limit`` allows, or with ``fit`` cut to what
        it allows (None when that is nothing). The account's expired holds go first."""
        self._expire([account])
        if limit != "none":
            balance = self.balance(account, self.now)
            room = balance.available + (balance.credit_limit if limit == "credit" else ZERO)
            if fit and amount > room:
                amount = max(room, ZERO)
                if amount == 0:
                    return None
            if amount > room:
                raise Refused(InsufficientFunds, f"{amount} is more than the {room} a hold may take")
        self.own[account].held += amount
        self.holds[key] = Hold(account, amount, expires_at)
        self.written["hold"] += 1
        return amount

    @idempotent
    def release(self, key: str, hold_key: str, amount: Decimal | None) -> Decimal:
        hold = self.holds[hold_key]
        amount = hold.remaining if amount is None else amount
        if amount > hold.remaining or hold.remaining == 0:
            raise Refused(InvalidInput, f"{amount} is more than the {hold.remaining} still held")
        hold.remaining -= amount
        self.own[hold.account].held -= amount
        self.written["release"] += 1
        return amount

    def settle(self, hold_key: str) -> None:
        """Its job ended: what the hold still holds is given back (a release, where any is)."""
        hold = self.holds[hold_key]
        if hold.remaining > 0:
            self.own[hold.account].held -= hold.remaining
            hold.remaining = ZERO
            self.written["release"] += 1

    def expire_holds(self, accounts: list[str]) -> None:
        self._expire(accounts)

    def advance(self, by: dt.timedelta) -> None:
        self.now += by


def apply(model: Ledger, operation: Callable[[Ledger], Decimal | None]) -> tuple[Ledger, Decimal | None | Refused]:
    """The model after ``operation`` (unchanged where it is refused), and its outcome."""
    trial = copy.deepcopy(model)
    try:
        return trial, operation(trial)
    except Refused as refused:
        return model, refused
