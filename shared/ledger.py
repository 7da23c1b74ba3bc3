"""The ledger: the only code that writes ledger rows.

Every operation here
- is idempotent by key: the same key with the same request returns the first transaction and
  writes nothing; the same key with another request raises ``IdempotencyConflict``;
- locks the accounts it touches (in id order, so two transfers cannot deadlock) before it reads
  what it checks, so concurrent writers on one account never lose an update or overdraw a check;
- writes one ``ledger_transactions`` row, its ``ledger_entries`` and the matching running totals
  in ``account_balances`` (added up by the database from the entries), all in the caller's
  database transaction.

Money lives in allocations. A charge draws on the allocations in force at its effective time,
the one ending first first; what no allocation covers is owed by the account itself
(``allocation_id`` NULL) and stays owed until it is refunded. Balances:
``available = allocated - charged + refunded - held``, counting only allocations in force.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import uuid
from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from decimal import Decimal
from fractions import Fraction
from typing import Any

from sqlalchemy import and_, case, delete, func, or_, select, text, update
from sqlalchemy.dialects.postgresql import insert
from sqlalchemy.orm import Session, aliased

from shared import bulk
from shared.errors import AlreadyRefunded, IdempotencyConflict, InsufficientFunds, InvalidInput
from shared.models import (
    BUCKETS,
    Account,
    AccountBalance,
    Allocation,
    Job,
    LedgerEntry,
    LedgerTransaction,
    OpenHold,
    Project,
    Service,
    User,
)
from shared.money import money_str, parse_money
from shared.rating.price import parse_fraction, price_at, rate_at, rate_tables, share
from shared.timestamps import CLOCK_SKEW

ZERO = Decimal(0)


def now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


# --------------------------------------------------------------------------- idempotency


def _plain(value: Any) -> str:
    if isinstance(value, Decimal):
        return format(value.normalize(), "f")
    if isinstance(value, dt.datetime):
        # a time in UTC already (the charger's every one) is written as it is: the same text
        return (value if value.tzinfo is dt.UTC else value.astimezone(dt.UTC)).isoformat()
    return repr(value)


def _request_hash(kind: str, request: dict[str, Any]) -> str:
    """A fingerprint of what was asked, independent of how numbers and times were written."""
    canonical = "\x1f".join([kind, *(f"{k}={_plain(request[k])}" for k in sorted(request))])
    return hashlib.sha256(canonical.encode()).hexdigest()


def _replay(session: Session, key: str, request_hash: str) -> LedgerTransaction | None:
    """The transaction already written under ``key``, if its request was this one."""
    txn = session.scalar(select(LedgerTransaction).where(LedgerTransaction.idempotency_key == key))
    if txn is None:
        return None
    if txn.request_hash != request_hash:
        raise IdempotencyConflict(
            f"idempotency key {key!r} was already used by {txn.kind} #{txn.id} of "
            f"{money_str(txn.amount)} with different details; use a new key for a new request"
        )
    return txn


def _check_key(key: str | None) -> str:
    if key is None:
        return f"auto:{uuid.uuid4()}"
    if not isinstance(key, str) or not key.strip():
        raise InvalidInput("idempotency key must be a non-empty string")
    if len(key) > 200:
        raise InvalidInput(f"idempotency key is {len(key)} characters long; the limit is 200")
    return key


# --------------------------------------------------------------------------- writing


def _lock_then_replay(session: Session, key: str, digest: str, *accounts: Account) -> LedgerTransaction | None:
    """Lock the accounts, then look for the key again: a writer with the same key may have
    committed while we waited, and it must win before we create anything (an allocation)."""
    _lock_accounts(session, *accounts)
    return _replay(session, key, digest)


def _lock_accounts(session: Session, *accounts: Account | int) -> None:
    """Serialize the ledger's writers per account, in id order so that two cannot deadlock.

    FOR NO KEY UPDATE, not FOR UPDATE: it excludes the other writers, which is all it is for,
    and not the KEY SHARE locks that rows referencing the account by a foreign key take."""
    ids = sorted({a if isinstance(a, int) else a.id for a in accounts})
    if ids:  # the owner takes the locks (migration 0011): the workers may not UPDATE accounts
        session.execute(text("SELECT openacct_lock_accounts(CAST(:ids AS integer[]))"), {"ids": ids})


def lock_accounts(session: Session, *accounts: Account | int) -> None:
    """Lock these accounts as the ledger's writers do, for a decision that reads their money and
    must see it stand still until the transaction ends (a member's spending limit, counted over
    every account of a project: shared/member_limits.py)."""
    _lock_accounts(session, *accounts)


@dataclass(frozen=True)
class _Entry:
    account_id: int
    allocation_id: int | None
    bucket: str
    amount: Decimal


def _write(
    session: Session,
    *,
    kind: str,
    key: str,
    request_hash: str,
    amount: Decimal,
    account: Account,
    effective_at: dt.datetime,
    entries: Sequence[_Entry],
    **columns: Any,
) -> LedgerTransaction:
    """Insert the transaction unless its key exists, then its entries (the database adds them to
    the running totals: migration 0011)."""
    inserted = session.execute(
        insert(LedgerTransaction)
        .values(
            kind=kind,
            idempotency_key=key,
            request_hash=request_hash,
            amount=amount,
            account_id=account.id,
            effective_at=effective_at,
            **columns,
        )
        .on_conflict_do_nothing(index_elements=["idempotency_key"])
        .returning(LedgerTransaction.id)
    ).scalar()
    if inserted is None:  # a concurrent writer with the same key committed first
        existing = _replay(session, key, request_hash)
        assert existing is not None
        return existing

    # One statement: the database takes a transaction's entries whole or not at all (migration 0011).
    bulk.insert_rows(session, LedgerEntry.__table__, [
        {"transaction_id": inserted, "account_id": e.account_id, "allocation_id": e.allocation_id,
         "bucket": e.bucket, "amount": e.amount, "effective_at": effective_at}
        for e in entries])
    session.flush()
    return session.get_one(LedgerTransaction, inserted)


def _in_force(at: dt.datetime | Any):
    return and_(
        Allocation.starts_at <= at, or_(Allocation.ends_at.is_(None), Allocation.ends_at > at)
    )


def _check_open(account: Account, at: dt.datetime) -> None:
    if not account.active:
        raise InvalidInput(f"account {account.name!r} is not active")
    if account.expires_at is not None and at >= account.expires_at:
        raise InvalidInput(f"account {account.name!r} expired on {account.expires_at.isoformat()}")


def _effective(at: dt.datetime | None) -> dt.datetime:
    if at is None:
        return now()
    if at.tzinfo is None:
        raise InvalidInput(f"effective time {at.isoformat()} has no time zone")
    if at > now() + CLOCK_SKEW:
        raise InvalidInput(f"effective time {at.isoformat()} is in the future")
    return at


def deposit(
    session: Session,
    account: Account,
    amount: object,
    *,
    starts_at: dt.datetime | None = None,
    ends_at: dt.datetime | None = None,
    credit_limit: object = 0,
    key: str | None = None,
    description: str = "",
    actor: str = "",
) -> LedgerTransaction:
    """Fund ``account`` with a new allocation of ``amount``, in force from ``starts_at``
    (default now) until ``ends_at`` (default: no end)."""
    amount = parse_money(amount)
    credit_limit = parse_money(credit_limit, "credit limit", allow_zero=True)
    key = _check_key(key)
    request = {"account": account.id, "amount": amount, "starts_at": starts_at,
               "ends_at": ends_at, "credit_limit": credit_limit}
    digest = _request_hash("deposit", request)
    for name, value in (("start", starts_at), ("end", ends_at)):
        if value is not None and value.tzinfo is None:
            raise InvalidInput(f"allocation {name} {value.isoformat()} has no time zone")
    starts_at = starts_at or now()
    if ends_at is not None and ends_at <= starts_at:
        raise InvalidInput(
            f"allocation end {ends_at.isoformat()} is not after its start {starts_at.isoformat()}"
        )
    _check_open(account, now())

    if (done := _lock_then_replay(session, key, digest, account)) is not None:
        return done
    allocation = Allocation(
        account_id=account.id, amount=amount, credit_limit=credit_limit,
        starts_at=starts_at, ends_at=ends_at,
    )
    session.add(allocation)
    session.flush()
    return _write(
        session, kind="deposit", key=key, request_hash=digest, amount=amount, account=account,
        effective_at=starts_at, description=description, actor=actor,
        details={"allocation_id": allocation.id},
        entries=[_Entry(account.id, allocation.id, "allocated", amount)],
    )


def charge_request_hash(
    account_id: int, service_id: int, quantity: Decimal, multiplier: Decimal,
    user_id: int | None, job_id: int | None, effective_at: dt.datetime | None,
) -> str:
    # _request_hash("charge", {...}) spelled out, keys in sorted order: the charger computes
    # thousands per batch.
    canonical = (f"charge\x1faccount={account_id!r}\x1feffective_at={_plain(effective_at)}\x1fjob={job_id!r}"
                 f"\x1fmultiplier={_plain(multiplier)}\x1fquantity={_plain(quantity)}"
                 f"\x1fservice={service_id!r}\x1fuser={user_id!r}")
    return hashlib.sha256(canonical.encode()).hexdigest()


@dataclass(slots=True)
class ChargeRequest:
    """One charge for ``charge_many``: quantities already validated, the time already known."""

    key: str
    request_hash: str
    account_id: int
    service_id: int
    quantity: Decimal
    effective_at: dt.datetime
    multiplier: Decimal = Decimal(1)
    # What ``quantity`` (rounded to 6 places for the record) was measured as, where it is a
    # fraction: a job's CPUs x seconds / 3600. The price is computed from it.
    exact_quantity: Fraction | None = None
    user_id: int | None = None
    job_id: int | None = None
    details: dict[str, Any] = field(default_factory=dict)
    description: str = ""
    actor: str = ""


@dataclass
class ChargeResult:
    transactions: dict[str, int]  # key -> transaction id, new or replayed
    refused: dict[str, str]  # key -> why


def charge(
    session: Session,
    account: Account,
    service: Service,
    quantity: object,
    *,
    user: User | None = None,
    job: Job | None = None,
    multiplier: object = 1,
    effective_at: dt.datetime | None = None,
    key: str | None = None,
    description: str = "",
    details: dict[str, Any] | None = None,
    actor: str = "",
) -> LedgerTransaction:
    """Charge ``quantity`` units of ``service`` at the rate in effect at ``effective_at``.

    Use has already happened, so a charge is recorded even when it overdraws the account; it is
    holds (admission control) that keep jobs from starting without funds.
    """
    quantity = parse_money(quantity, "quantity", allow_zero=True)
    multiplier = parse_money(multiplier, "multiplier", allow_zero=True)
    key = _check_key(key)
    user_id, job_id = (user.id if user else None), (job.id if job else None)
    digest = charge_request_hash(account.id, service.id, quantity, multiplier, user_id, job_id, effective_at)
    if (done := _replay(session, key, digest)) is not None:
        return done
    at = _effective(effective_at)
    _check_open(account, at)
    rate_at(session, service.id, at, service.name)  # a clear NotFound before anything is locked
    result = charge_many(session, [ChargeRequest(
        key=key, request_hash=digest, account_id=account.id, service_id=service.id,
        quantity=quantity, effective_at=at, multiplier=multiplier, user_id=user_id,
        job_id=job_id, details=details or {}, description=description, actor=actor,
    )])
    if key in result.refused:
        raise IdempotencyConflict(result.refused[key])
    return session.get_one(LedgerTransaction, result.transactions[key])


@dataclass
class _Bucket:
    """An allocation's money still unspent, as a batch of charges draws on it."""

    id: int
    starts_at: dt.datetime
    ends_at: dt.datetime | None
    remaining: Decimal

    def in_force(self, at: dt.datetime) -> bool:
        return self.starts_at <= at and (self.ends_at is None or at < self.ends_at)


def _draw(buckets: Iterable[_Bucket], amount: Decimal, at: dt.datetime) -> list[tuple[_Bucket | None, Decimal]]:
    """Split ``amount`` over the allocations in force at ``at``, the first to end first, taking
    it from their remainders; what none covers falls on the account itself (None)."""
    slices: list[tuple[_Bucket | None, Decimal]] = []
    rest = amount
    for bucket in buckets:
        if rest == 0:
            break
        if bucket.remaining > 0 and bucket.in_force(at):
            take = min(bucket.remaining, rest)
            bucket.remaining -= take
            slices.append((bucket, take))
            rest -= take
    if rest > 0:
        slices.append((None, rest))
    return slices


def _buckets(session: Session, account_ids: list[int]) -> dict[int, list[_Bucket]]:
    left = AccountBalance.allocated - AccountBalance.charged + AccountBalance.refunded
    found: dict[int, list[_Bucket]] = defaultdict(list)
    for account_id, alloc_id, starts, ends, remaining in session.execute(
        select(Allocation.account_id, Allocation.id, Allocation.starts_at, Allocation.ends_at, left)
        .join(AccountBalance, AccountBalance.allocation_id == Allocation.id)
        .where(Allocation.account_id.in_(account_ids))
        .order_by(Allocation.ends_at.asc().nulls_last(), Allocation.id)
    ):
        found[account_id].append(_Bucket(alloc_id, starts, ends, remaining))
    return found


def _conflict_message(key: str, txn_id: int) -> str:
    return (f"idempotency key {key!r} was already used by transaction #{txn_id} with different "
            "details; use a new key for a new request")


def charge_many(session: Session, requests: Sequence[ChargeRequest], *, settles: Sequence[int] = ()) -> ChargeResult:
    """Write many charges with a handful of statements: the charger's path, one call per batch.

    Each request is rated at its effective time and drawn on its account's allocations in
    force then, the one ending first first, in the order given; what no allocation covers is
    owed by the account. A key seen before with the same request is replayed, with another
    request refused; nothing is written for either. ``settles``: the jobs whose holds the
    caller releases next in this transaction, whose accounts are locked with the charges'
    (all in one order, or two batches could deadlock).
    """
    result = ChargeResult({}, {})
    holding = [row[0] for row in bulk.select_where_any(session, OpenHold.__table__, ("account_id",), "job_id", settles)] \
        if settles else []
    if not requests:
        _lock_accounts(session, *holding)
        return result
    by_key = {r.key: r for r in requests}
    if len(by_key) != len(requests):
        raise InvalidInput("a batch of charges names one idempotency key twice")
    rates = rate_tables(session, {r.service_id for r in requests})
    priced: list[tuple[ChargeRequest, Decimal, Decimal]] = []
    for r in requests:
        found = price_at(rates, r.service_id, r.effective_at,
                         r.quantity if r.exact_quantity is None else r.exact_quantity, r.multiplier)
        if found is None:
            result.refused[r.key] = f"service #{r.service_id} has no charge rate in effect at {r.effective_at.isoformat()}"
            continue
        priced.append((r, *found))

    if not priced:
        _lock_accounts(session, *holding)
        return result

    # The transactions go in before the accounts are locked: their unique keys settle any race
    # on a key, and other writers on these accounts wait only while the money is drawn. A key
    # written before (a replay, or a writer that committed first) is not written again, and is
    # looked up after, with the others the insert did not write: the charger's inbox keeps
    # replays out of its batches, so that lookup is rare, where one of every key was not.
    # one order of key locks for every writer: two batches never deadlock on keys
    in_order = sorted(priced, key=lambda t: t[0].key)
    multipliers: dict[int, str] = {}  # money_str of each multiplier object (all alive meanwhile)
    details = []
    for r, _, _ in in_order:
        shown = multipliers.get(id(r.multiplier))
        if shown is None:
            shown = multipliers[id(r.multiplier)] = money_str(r.multiplier)
        details.append({"multiplier": shown, **r.details})
    # As columns, not a dict per row: the charger writes thousands per batch.
    inserted = bulk.insert_columns(
        session, LedgerTransaction.__table__,
        {"kind": ["charge"] * len(in_order), "idempotency_key": [r.key for r, _, _ in in_order],
         "request_hash": [r.request_hash for r, _, _ in in_order], "amount": [a for _, _, a in in_order],
         "account_id": [r.account_id for r, _, _ in in_order], "service_id": [r.service_id for r, _, _ in in_order],
         "quantity": [r.quantity for r, _, _ in in_order], "rate": [rate for _, rate, _ in in_order],
         "user_id": [r.user_id for r, _, _ in in_order], "job_id": [r.job_id for r, _, _ in in_order],
         "effective_at": [r.effective_at for r, _, _ in in_order],
         "description": [r.description for r, _, _ in in_order], "actor": [r.actor for r, _, _ in in_order],
         "details": details},
        on_conflict="(idempotency_key) DO NOTHING", returning=("idempotency_key", "id"),
    )
    written = dict(inserted)
    result.transactions.update(written)
    lost = [r for r, _, _ in priced if r.key not in written]
    if lost:  # written before: the same request is replayed, another refused
        for key, txn_id, digest in session.execute(
            select(LedgerTransaction.idempotency_key, LedgerTransaction.id, LedgerTransaction.request_hash)
            .where(bulk.any_of(LedgerTransaction.idempotency_key, [r.key for r in lost]))
        ):
            if digest == by_key[key].request_hash:
                result.transactions[key] = txn_id
            else:
                result.refused[key] = _conflict_message(key, txn_id)
    account_ids = sorted({r.account_id for r, _, _ in priced if r.key in written})
    _lock_accounts(session, *account_ids, *holding)
    buckets = _buckets(session, account_ids)
    entries: dict[str, list[Any]] = {"transaction_id": [], "account_id": [], "allocation_id": [], "bucket": [],
                                     "amount": [], "effective_at": []}
    for r, _, amount in priced:
        if r.key not in written:
            continue  # sorted above: replayed or refused
        for allocation, part in _draw(buckets.get(r.account_id, ()), amount, r.effective_at):
            entries["transaction_id"].append(written[r.key])
            entries["account_id"].append(r.account_id)
            entries["allocation_id"].append(allocation.id if allocation else None)
            entries["bucket"].append("charged")
            entries["amount"].append(part)
            entries["effective_at"].append(r.effective_at)
    if entries["transaction_id"]:  # the database adds them to the running totals (migration 0011)
        bulk.insert_columns(session, LedgerEntry.__table__, entries)
    return result


def _referred_sum(session: Session, txn: LedgerTransaction, kind: str) -> Decimal:
    return session.scalar(
        select(func.coalesce(func.sum(LedgerTransaction.amount), 0)).where(
            LedgerTransaction.refers_to_id == txn.id, LedgerTransaction.kind == kind
        )
    )


# --------------------------------------------------------------------------- a charge's slices


@dataclass(frozen=True)
class Carried:
    """A charge as it stands: what it costs now (its amount as re-priced since), what its
    refunds gave back, and what each allocation (None: the account itself) still carries of it,
    in the order the slices were drawn."""

    price: Decimal
    refunded: Decimal
    slices: list[tuple[int | None, Decimal]]

    @property
    def refundable(self) -> Decimal:
        return self.price - self.refunded


def carried(session: Session, charge_txn: LedgerTransaction) -> Carried:
    """Read from the journal: the charge's entries and those of the refunds and re-pricings
    that refer to it. Read it with the account locked to act on it."""
    t = LedgerTransaction
    price = refunded = ZERO
    by_slice: dict[int | None, Decimal] = {}  # in the order the slices were first drawn
    for allocation_id, bucket, amount in session.execute(
        select(LedgerEntry.allocation_id, LedgerEntry.bucket, LedgerEntry.amount)
        .join(t, t.id == LedgerEntry.transaction_id)
        .where(or_(t.id == charge_txn.id, and_(t.refers_to_id == charge_txn.id, t.kind.in_(("adjustment", "refund")))),
               LedgerEntry.bucket.in_(("charged", "refunded")))
        .order_by(LedgerEntry.id)
    ):
        if bucket == "charged":
            price += amount
        else:
            refunded += amount
            amount = -amount
        by_slice[allocation_id] = by_slice.get(allocation_id, ZERO) + amount
    return Carried(price, refunded, list(by_slice.items()))


def prices(session: Session, charge_ids: Sequence[int]) -> dict[int, Decimal]:
    """What each of these charges costs now: its amount as re-priced since."""
    t = LedgerTransaction
    charge_id = case((t.kind == "charge", t.id), else_=t.refers_to_id)
    return dict(session.execute(
        select(charge_id, func.sum(LedgerEntry.amount))
        .join(LedgerEntry, LedgerEntry.transaction_id == t.id)
        .where(or_(bulk.any_of(t.id, charge_ids), and_(bulk.any_of(t.refers_to_id, charge_ids), t.kind == "adjustment")),
               LedgerEntry.bucket == "charged")
        .group_by(charge_id)
    ).all())


def _give_back(slices: Sequence[tuple[int | None, Decimal]], amount: Decimal) -> list[tuple[int | None, Decimal]]:
    """Take ``amount`` back from what the slices of a charge carry, the slice drawn last first:
    the account's own debt before any allocation, the allocation ending last before the others.
    Never more from a slice than it carries, so no allocation ends with more than was put in."""
    parts: list[tuple[int | None, Decimal]] = []
    rest = amount
    for allocation_id, has in reversed(slices):
        take = min(has, rest)
        if take > 0:
            parts.append((allocation_id, take))
            rest -= take
    if rest > 0:  # the callers ask for no more than the slices carry in all
        raise InvalidInput(f"{money_str(amount)} is more than the charge's slices carry")
    return parts


def refundable(session: Session, charge_txn: LedgerTransaction) -> Decimal:
    """What is left to refund of a charge: what it costs now, less its refunds."""
    return carried(session, charge_txn).refundable


def refund(
    session: Session,
    charge_txn: LedgerTransaction,
    amount: object | None = None,
    *,
    key: str | None = None,
    reason: str = "",
    actor: str = "",
    effective_at: dt.datetime | None = None,
) -> LedgerTransaction:
    """Give back ``amount`` (default: all that is still refundable) of a charge, to the
    allocations that still carry it, effective now (or at ``effective_at``, never before the
    charge). Refunds of one charge never add up to more than it costs now."""
    wanted = None if amount is None else parse_money(amount, "refund amount")
    txn = _refund(session, charge_txn, {"amount": wanted}, lambda now_: now_.refundable if wanted is None else wanted,
                  key=key, reason=reason, actor=actor, effective_at=effective_at)
    assert txn is not None  # only a share can come to nothing
    return txn


def refund_share(
    session: Session,
    charge_txn: LedgerTransaction,
    fraction: object,
    *,
    key: str | None = None,
    reason: str = "",
    actor: str = "",
    effective_at: dt.datetime | None = None,
) -> LedgerTransaction | None:
    """Give back ``fraction`` of what a charge costs now (as re-priced since), rounded as prices
    are; None where that comes to less than the ledger's smallest unit."""
    share_of = parse_fraction(fraction)
    return _refund(session, charge_txn, {"amount": None, "fraction": share_of},
                   lambda now_: share(now_.price, share_of),
                   key=key, reason=reason, actor=actor, effective_at=effective_at)


def _refund(session: Session, charge_txn: LedgerTransaction, request: dict[str, Any],
            how_much: Any, *, key: str | None, reason: str, actor: str,
            effective_at: dt.datetime | None) -> LedgerTransaction | None:
    """What a refund may return, written once: decided (``how_much`` of the charge as it
    stands) with the account locked, so a refund and a re-pricing at once never give back
    more than the charge costs."""
    if charge_txn.kind != "charge":
        raise InvalidInput(f"transaction #{charge_txn.id} is a {charge_txn.kind}, not a charge")
    key = _check_key(key)
    digest = _request_hash("refund", {"charge": charge_txn.id, **request})
    # A charge may be dated a little ahead of this clock (a node's clock): a refund never
    # takes effect before its charge.
    at = max(_effective(None), charge_txn.effective_at) if effective_at is None else _effective(effective_at)
    if at < charge_txn.effective_at:
        raise InvalidInput(f"a refund of charge #{charge_txn.id} cannot take effect before the charge")
    account = session.get_one(Account, charge_txn.account_id)
    if (done := _lock_then_replay(session, key, digest, account)) is not None:
        return done
    charge_now = carried(session, charge_txn)
    amount = how_much(charge_now)
    if amount == 0 and "fraction" in request:
        return None
    if amount > charge_now.refundable or charge_now.refundable == 0:
        raise InvalidInput(
            f"refund of {money_str(amount)} refused: charge #{charge_txn.id} of "
            f"{money_str(charge_now.price)} has {money_str(charge_now.refundable)} left to refund"
        )
    return _write(
        session, kind="refund", key=key, request_hash=digest, amount=amount, account=account,
        effective_at=at, refers_to_id=charge_txn.id, service_id=charge_txn.service_id,
        job_id=charge_txn.job_id, user_id=charge_txn.user_id, description=reason, actor=actor,
        entries=[_Entry(account.id, a, "refunded", part) for a, part in _give_back(charge_now.slices, amount)],
    )


def reprice(
    session: Session,
    charge_txn: LedgerTransaction,
    price: object,
    *,
    key: str | None = None,
    description: str = "",
    actor: str = "",
) -> LedgerTransaction | None:
    """Make a charge cost ``price`` from now on (a re-rating): an adjustment of the difference
    that refers to it, decided with the account locked. A lower price gives back to the slices
    that carry the charge, the last drawn first (as a refund does); a higher one draws the rest
    as a charge at the charge's time would. None where the charge already costs that.

    A charge that was refunded is not re-priced (``AlreadyRefunded``): under its refunds, a new
    price could let them exceed what it costs. Without ``key``, the adjustment's key is the
    charge's and its place among the charge's adjustments, so that two re-pricings at once
    apply one after the other, and the same re-pricing twice writes once."""
    target = parse_money(price, "price", allow_zero=True)
    return _reprice(session, charge_txn, {"price": target}, lambda _: target, key=key,
                    description=description, actor=actor)


def _reprice(session: Session, charge_txn: LedgerTransaction, request: dict[str, Any], price_of: Any, *,
             key: str | None, description: str, actor: str) -> LedgerTransaction | None:
    if charge_txn.kind != "charge":
        raise InvalidInput(f"transaction #{charge_txn.id} is a {charge_txn.kind}, not a charge")
    account = session.get_one(Account, charge_txn.account_id)
    digest = _request_hash("adjustment", {"charge": charge_txn.id, **request})
    if key is not None:
        key = _check_key(key)
        if (done := _lock_then_replay(session, key, digest, account)) is not None:
            return done
    else:
        _lock_accounts(session, account)
    charge_now = carried(session, charge_txn)
    if charge_now.refunded > 0:
        raise AlreadyRefunded(f"charge #{charge_txn.id} was refunded {money_str(charge_now.refunded)}: it is not "
                              "re-priced under its refunds")
    target = price_of(charge_now)
    if target < 0:
        raise InvalidInput(f"charge #{charge_txn.id} costs {money_str(charge_now.price)}: it cannot cost "
                           f"{money_str(target)}")
    delta = target - charge_now.price
    if delta == 0:
        return None
    if key is None:
        earlier = session.scalar(select(func.count()).where(LedgerTransaction.refers_to_id == charge_txn.id,
                                                            LedgerTransaction.kind == "adjustment"))
        key = f"reprice:{charge_txn.id}:{earlier + 1}"
    if delta < 0:
        parts = [(a, -part) for a, part in _give_back(charge_now.slices, -delta)]
    else:
        drawn = _draw(_buckets(session, [account.id]).get(account.id, ()), delta, charge_txn.effective_at)
        parts = [(bucket.id if bucket else None, part) for bucket, part in drawn]
    return _write(
        session, kind="adjustment", key=key, request_hash=digest, amount=abs(delta), account=account,
        effective_at=now(), refers_to_id=charge_txn.id, description=description, actor=actor,
        details={"bucket": "charged", "delta": money_str(delta), "price": money_str(target)},
        entries=[_Entry(account.id, a, "charged", part) for a, part in parts],
    )


def transfer(
    session: Session,
    source: Account,
    target: Account,
    amount: object,
    *,
    key: str | None = None,
    description: str = "",
    actor: str = "",
) -> LedgerTransaction:
    """Move available money from ``source`` to ``target``. The money keeps its expiry: each
    slice taken from a source allocation becomes a target allocation ending when it ends."""
    amount = parse_money(amount, "transfer amount")
    if source.id == target.id:
        raise InvalidInput(f"cannot transfer from account {source.name!r} to itself")
    _check_open(target, now())
    key = _check_key(key)
    digest = _request_hash("transfer", {"from": source.id, "to": target.id, "amount": amount})
    at = now()
    if (done := _lock_then_replay(session, key, digest, source, target)) is not None:
        return done
    available = account_balance(session, source, at=at).available
    if amount > available:
        raise InsufficientFunds(
            f"transfer of {money_str(amount)} refused: account {source.name!r} has "
            f"{money_str(available)} available"
        )
    entries: list[_Entry] = []
    drawn = _draw(_buckets(session, [source.id]).get(source.id, ()), amount, at)
    if any(allocation is None for allocation, _ in drawn):  # the account's own row is never money to give
        raise InsufficientFunds(f"transfer of {money_str(amount)} refused: the allocations of account "
                                f"{source.name!r} in force now hold less than that")
    for allocation, take in drawn:
        assert allocation is not None
        moved = Allocation(account_id=target.id, amount=take, starts_at=at, ends_at=allocation.ends_at)
        session.add(moved)
        session.flush()
        entries.append(_Entry(source.id, allocation.id, "allocated", -take))
        entries.append(_Entry(target.id, moved.id, "allocated", take))
    return _write(
        session, kind="transfer", key=key, request_hash=digest, amount=amount, account=source,
        counterparty_account_id=target.id, effective_at=at, description=description,
        actor=actor, entries=entries,
    )


# How far below zero a hold may take an account: not at all, down to its credit limit, or
# without a floor (a notify-only admission policy: the job runs and its cost is still held).
HOLD_LIMITS = ("available", "credit", "none")


def hold(
    session: Session,
    account: Account,
    amount: object,
    *,
    job: Job | None = None,
    service: Service | None = None,
    limit: str = "credit",
    fit: bool = False,
    expires_at: dt.datetime | None = None,
    key: str | None = None,
    description: str = "",
    details: dict[str, Any] | None = None,
    actor: str = "",
) -> LedgerTransaction | None:
    """Set money aside for work about to run. When it would take the account below what
    ``limit`` allows it is refused (``InsufficientFunds``), or, with ``fit``, cut to what does
    fit (None when nothing does). A hold still open at ``expires_at`` is released by
    ``expire_holds``, or by the account's next hold, whichever comes first."""
    amount = parse_money(amount, "hold amount")
    if limit not in HOLD_LIMITS:
        raise InvalidInput(f"hold limit {limit!r} is not one of {', '.join(HOLD_LIMITS)}")
    if expires_at is not None and expires_at.tzinfo is None:
        raise InvalidInput(f"hold expiry {expires_at.isoformat()} has no time zone")
    key = _check_key(key)
    request = {"account": account.id, "amount": amount, "job": job.id if job else None,
               "service": service.id if service else None}
    digest = _request_hash("hold", request)
    at = now()
    _check_open(account, at)
    if (done := _lock_then_replay(session, key, digest, account)) is not None:
        return done
    expire_holds(session, at, account_ids=[account.id])
    if limit != "none":
        balance = account_balance(session, account, at)
        room = balance.available + (balance.credit_limit if limit == "credit" else ZERO)
        if fit and amount > room:
            amount = max(room, ZERO)
            if amount == 0:
                return None
        if amount > room:
            credit = f" and a credit limit of {money_str(balance.credit_limit)}" if limit == "credit" else ""
            raise InsufficientFunds(
                f"hold of {money_str(amount)} refused: account {account.name!r} has "
                f"{money_str(balance.available)} available{credit}"
            )
    txn = _write(
        session, kind="hold", key=key, request_hash=digest, amount=amount, account=account,
        effective_at=at, job_id=job.id if job else None,
        service_id=service.id if service else None, description=description, actor=actor,
        details={**(details or {}), **({"expires_at": expires_at.isoformat()} if expires_at else {})},
        entries=[_Entry(account.id, None, "held", amount)],
    )
    session.execute(insert(OpenHold).values(hold_id=txn.id, account_id=account.id, job_id=txn.job_id,
                                            remaining=amount, expires_at=expires_at))
    return txn


def release(
    session: Session,
    hold_txn: LedgerTransaction,
    amount: object | None = None,
    *,
    key: str | None = None,
    description: str = "",
    actor: str = "",
) -> LedgerTransaction:
    """Free what is left of a hold (or ``amount`` of it)."""
    if hold_txn.kind != "hold":
        raise InvalidInput(f"transaction #{hold_txn.id} is a {hold_txn.kind}, not a hold")
    wanted = None if amount is None else parse_money(amount, "release amount")
    key = _check_key(key)
    digest = _request_hash("release", {"hold": hold_txn.id, "amount": wanted})
    account = session.get_one(Account, hold_txn.account_id)
    if (done := _lock_then_replay(session, key, digest, account)) is not None:
        return done
    remaining = hold_txn.amount - _referred_sum(session, hold_txn, "release")
    amount = remaining if wanted is None else wanted
    if amount > remaining or remaining == 0:
        raise InvalidInput(
            f"release of {money_str(amount)} refused: hold #{hold_txn.id} has "
            f"{money_str(remaining)} still held"
        )
    txn = _write(
        session, kind="release", key=key, request_hash=digest, amount=amount, account=account,
        effective_at=now(), refers_to_id=hold_txn.id, job_id=hold_txn.job_id,
        description=description, actor=actor,
        entries=[_Entry(account.id, None, "held", -amount)],
    )
    if amount == remaining:
        session.execute(delete(OpenHold).where(OpenHold.hold_id == hold_txn.id))
    else:
        session.execute(update(OpenHold).where(OpenHold.hold_id == hold_txn.id)
                        .values(remaining=remaining - amount))
    return txn


def _release_open(session: Session, condition: Any, *, key_prefix: str, description: str, actor: str,
                  also_lock: Sequence[int] = ()) -> list[LedgerTransaction]:
    """Release in full every open hold that ``condition`` (on ``OpenHold``) selects, having
    locked their accounts and ``also_lock`` all at once, in id order."""
    found = session.execute(select(OpenHold.hold_id, OpenHold.account_id).where(condition)
                            .order_by(OpenHold.hold_id)).all()
    _lock_accounts(session, *{account_id for _, account_id in found}, *also_lock)
    if not found:
        return []
    hold_ids = session.scalars(select(OpenHold.hold_id).where(condition).order_by(OpenHold.hold_id)).all()
    return [
        release(session, session.get_one(LedgerTransaction, hold_id), key=f"{key_prefix}:{hold_id}",
                description=description, actor=actor)
        for hold_id in hold_ids
    ]


def settle_holds(session: Session, job_ids: Iterable[int], *, actor: str = "") -> list[LedgerTransaction]:
    """Release what is still held for these jobs: their charges for actual use are written in
    the same transaction, so the money moves from held to charged at once."""
    ids = sorted(set(job_ids))
    if not ids:
        return []
    return _release_open(session, bulk.any_of(OpenHold.job_id, ids), key_prefix="settle",
                         description="job ended: its charge replaces the hold", actor=actor)


def release_earlier_runs(session: Session, system_id: int, job_id: str, array_task_id: int | None, *,
                         keep: str, account: Account, actor: str = "") -> list[LedgerTransaction]:
    """A job starting again (a requeue) gives back what its earlier runs still hold: a
    scheduler's job id names one live job at a time. ``keep`` is the key of this run's hold,
    which a repeated request for the same run must find in place; ``account``, the one this
    run holds on, is locked with the earlier runs' (in one order: no deadlock)."""
    same_job = select(Job.id).where(Job.system_id == system_id, Job.job_id == job_id,
                                    Job.array_task_id.is_not_distinct_from(array_task_id))
    others = select(LedgerTransaction.id).where(LedgerTransaction.idempotency_key == keep)
    return _release_open(session, and_(OpenHold.job_id.in_(same_job), OpenHold.hold_id.not_in(others)),
                         key_prefix="rerun", actor=actor, also_lock=[account.id],
                         description=f"job {job_id} runs again: the next run holds in place of this one")


def expire_holds(session: Session, at: dt.datetime | None = None, *, account_ids: Sequence[int] | None = None) -> list[LedgerTransaction]:
    """Release the holds past their expiry: jobs that never reported back."""
    at = at or now()
    condition = and_(OpenHold.expires_at.is_not(None), OpenHold.expires_at <= at)
    if account_ids is not None:
        condition = and_(condition, OpenHold.account_id.in_(list(account_ids)))
    return _release_open(session, condition, key_prefix="expire", actor="ledger",
                         description="hold expired: its job never reported back")


def adjust(
    session: Session,
    account: Account,
    amount: object,
    *,
    bucket: str,
    allocation: Allocation | None = None,
    refers_to: LedgerTransaction | None = None,
    key: str | None = None,
    description: str = "",
    actor: str = "",
) -> LedgerTransaction:
    """A correction: ``amount`` (signed) added to what one allocation was given (``allocated``),
    or to what a charge of the account costs (``charged``, ``refers_to`` the charge: it
    re-prices it by ``amount``, as ``reprice`` does)."""
    if bucket not in ("allocated", "charged"):
        raise InvalidInput(f"adjustments apply to 'allocated' or 'charged', not {bucket!r}")
    delta = parse_money(amount, "adjustment", allow_negative=True)
    if allocation is not None and allocation.account_id != account.id:
        raise InvalidInput(f"allocation #{allocation.id} does not belong to {account.name!r}")
    if refers_to is not None:
        if refers_to.kind != "charge" or refers_to.account_id != account.id or bucket != "charged" or allocation:
            raise InvalidInput(f"an adjustment may refer only to a charge of account {account.name!r}, on its "
                               f"'charged' bucket; #{refers_to.id} is a {refers_to.kind} of account #{refers_to.account_id}")
        txn = _reprice(session, refers_to, {"delta": delta}, lambda charge_now: charge_now.price + delta,
                       key=_check_key(key), description=description, actor=actor)
        if txn is None:
            raise InvalidInput("an adjustment of 0 changes nothing")
        return txn
    if bucket == "charged":  # else the charges' slices would not add up to what was charged
        raise InvalidInput("an adjustment of 'charged' re-prices a charge: name it (refers_to); "
                           "to credit an account, deposit")
    if allocation is None:
        raise InvalidInput("an adjustment of 'allocated' names the allocation it corrects")
    key = _check_key(key)
    request = {"account": account.id, "amount": delta, "bucket": bucket,
               "allocation": allocation.id if allocation else None, "refers_to": None}
    digest = _request_hash("adjustment", request)
    if (done := _lock_then_replay(session, key, digest, account)) is not None:
        return done
    return _write(
        session, kind="adjustment", key=key, request_hash=digest, amount=abs(delta),
        account=account, effective_at=now(), description=description, actor=actor,
        details={"bucket": bucket, "delta": money_str(delta)},
        entries=[_Entry(account.id, allocation.id if allocation else None, bucket, delta)],
    )


# --------------------------------------------------------------------------- reading

# What an entry did to its account's available money (allocated - charged + refunded - held).
AVAILABLE_EFFECT = case(
    (LedgerEntry.bucket.in_(("allocated", "refunded")), LedgerEntry.amount),
    else_=-LedgerEntry.amount,
)
# A transaction's amount with the sign every command and statement shows (shared.money): what it
# did to the available money of its own account (a transfer's: the source's), money in positive,
# money out negative. A column for a query of LedgerTransaction.
SIGNED_AMOUNT = (
    select(func.coalesce(func.sum(AVAILABLE_EFFECT), 0))
    .where(LedgerEntry.transaction_id == LedgerTransaction.id, LedgerEntry.account_id == LedgerTransaction.account_id)
    .correlate(LedgerTransaction)
    .scalar_subquery()
)


@dataclass(frozen=True)
class Balance:
    name: str
    allocated: Decimal
    charged: Decimal
    refunded: Decimal
    held: Decimal
    credit_limit: Decimal

    @property
    def available(self) -> Decimal:
        return self.allocated - self.charged + self.refunded - self.held

    def amounts(self) -> dict[str, Any]:
        """Its name and amounts, exact Decimals (for tables, which show them as people read money)."""
        fields = ("allocated", "charged", "refunded", "held", "available", "credit_limit")
        return {"name": self.name, **{f: getattr(self, f) for f in fields}}

    def as_dict(self) -> dict[str, str]:
        """Its name and amounts as exact decimal strings (for JSON)."""
        return {k: v if k == "name" else money_str(v) for k, v in self.amounts().items()}


def _balance(session: Session, name: str, account_ids: Iterable[int], at: dt.datetime | None, *, as_of: bool) -> Balance:
    """Sum the buckets of ``account_ids`` over the allocations in force at ``at``.

    Without ``as_of`` the running totals are read; with it the journal is summed up to ``at``,
    which is how a statement sees the past.
    """
    ids = list(account_ids)
    at = at or now()
    if as_of:
        source = (
            select(
                LedgerEntry.allocation_id,
                *(
                    func.coalesce(func.sum(LedgerEntry.amount).filter(LedgerEntry.bucket == b), 0).label(b)
                    for b in BUCKETS
                ),
            )
            .where(LedgerEntry.account_id.in_(ids), LedgerEntry.effective_at <= at)
            .group_by(LedgerEntry.allocation_id)
            .subquery()
        )
    else:
        source = (
            select(AccountBalance.allocation_id, *(getattr(AccountBalance, b).label(b) for b in BUCKETS))
            .where(AccountBalance.account_id.in_(ids))
            .subquery()
        )
    totals = session.execute(
        select(*(func.coalesce(func.sum(source.c[b]), 0) for b in BUCKETS))
        .select_from(source)
        .outerjoin(Allocation, Allocation.id == source.c.allocation_id)
        .where(or_(source.c.allocation_id.is_(None), _in_force(at)))
    ).one()
    credit_limit = session.scalar(
        select(func.coalesce(func.sum(Allocation.credit_limit), 0)).where(
            Allocation.account_id.in_(ids), _in_force(at)
        )
    )
    return Balance(name, *totals, credit_limit=credit_limit)


def account_balance(session: Session, account: Account, at: dt.datetime | None = None, *, as_of: bool = False) -> Balance:
    return _balance(session, account.name, [account.id], at, as_of=as_of)


def project_balance(session: Session, project: Project, at: dt.datetime | None = None, *, as_of: bool = False) -> Balance:
    ids = session.scalars(select(Account.id).where(Account.project_id == project.id)).all()
    return _balance(session, project.name, ids, at, as_of=as_of)


@dataclass(frozen=True)
class Mismatch:
    what: str
    detail: str

    def __str__(self) -> str:
        return f"{self.what}: {self.detail}"


def verify(session: Session) -> list[Mismatch]:
    """Recompute everything derived from the journal and report every disagreement:
    running totals against the entries, each transaction against its entries, refunds against
    their charges and releases against their holds."""
    problems: list[Mismatch] = []
    journal = (
        select(
            LedgerEntry.account_id,
            LedgerEntry.allocation_id,
            *(func.coalesce(func.sum(LedgerEntry.amount).filter(LedgerEntry.bucket == b), 0).label(b) for b in BUCKETS),
        )
        .group_by(LedgerEntry.account_id, LedgerEntry.allocation_id)
        .subquery()
    )
    b = AccountBalance
    differs = or_(*(func.coalesce(journal.c[k], 0) != func.coalesce(getattr(b, k), 0) for k in BUCKETS))
    rows = session.execute(
        select(
            func.coalesce(journal.c.account_id, b.account_id),
            func.coalesce(journal.c.allocation_id, b.allocation_id),
            *(journal.c[k] for k in BUCKETS),
            *(getattr(b, k) for k in BUCKETS),
        )
        .select_from(journal)
        .join(
            b,
            and_(b.account_id == journal.c.account_id,
                 b.allocation_id.is_not_distinct_from(journal.c.allocation_id)),
            full=True,
        )
        .where(differs)
    ).all()
    for row in rows:
        account_id, allocation_id = row[0], row[1]
        recomputed, stored = row[2:6], row[6:10]
        diffs = ", ".join(
            f"{k} journal {money_str(r or 0)} vs balance {money_str(s or 0)}"
            for k, r, s in zip(BUCKETS, recomputed, stored, strict=True)
            if (r or 0) != (s or 0)
        )
        problems.append(Mismatch(f"account #{account_id} allocation #{allocation_id}", diffs))

    # Each transaction's amount against its own entries, by what the kind moves.
    e = LedgerEntry
    t = LedgerTransaction
    moved = {
        "deposit": func.sum(e.amount),
        "charge": func.sum(e.amount),
        "refund": func.sum(e.amount),
        "hold": func.sum(e.amount),
        "release": -func.sum(e.amount),
        "transfer": func.sum(e.amount).filter(e.amount > 0),
        "adjustment": func.abs(func.sum(e.amount)),
    }
    for kind, expr in moved.items():
        bad = session.execute(
            select(t.id, t.amount, func.coalesce(expr, 0))
            .outerjoin(e, e.transaction_id == t.id)
            .where(t.kind == kind)
            .group_by(t.id)
            .having(func.coalesce(expr, 0) != t.amount)
        ).all()
        problems += [
            Mismatch(f"{kind} #{tid}", f"amount {money_str(amt)} but entries move {money_str(got)}")
            for tid, amt, got in bad
        ]
    unbalanced = session.execute(
        select(t.id, func.sum(e.amount)).join(e, e.transaction_id == t.id)
        .where(t.kind == "transfer").group_by(t.id).having(func.sum(e.amount) != 0)
    ).all()
    problems += [Mismatch(f"transfer #{tid}", f"entries sum to {money_str(s)}, not 0") for tid, s in unbalanced]

    # What re-rating added to (or took from) each charge: its refunds may reach that far.
    adj = aliased(LedgerTransaction)
    adjustments = (
        select(adj.refers_to_id, func.sum(LedgerEntry.amount).label("delta"))
        .join(LedgerEntry, LedgerEntry.transaction_id == adj.id)
        .where(adj.kind == "adjustment", LedgerEntry.bucket == "charged").group_by(adj.refers_to_id).subquery()
    )
    for kind, parent_kind in (("refund", "charge"), ("release", "hold")):
        child = select(t.refers_to_id, func.sum(t.amount).label("total")).where(t.kind == kind).group_by(t.refers_to_id).subquery()
        over = session.execute(
            select(t.id, t.amount + func.coalesce(adjustments.c.delta, 0), child.c.total)
            .join(child, child.c.refers_to_id == t.id)
            .outerjoin(adjustments, adjustments.c.refers_to_id == t.id)
            .where(or_(t.kind != parent_kind, child.c.total > t.amount + func.coalesce(adjustments.c.delta, 0)))
        ).all()
        problems += [
            Mismatch(f"{parent_kind} #{tid}", f"{kind}s total {money_str(total)}, more than its {money_str(amt)}")
            for tid, amt, total in over
        ]
    # The open holds beside the journal: every hold with money left, for what is left.
    released = select(t.refers_to_id, func.sum(t.amount).label("total")).where(t.kind == "release").group_by(t.refers_to_id).subquery()
    left = (t.amount - func.coalesce(released.c.total, 0))
    journal_open = (select(t.id.label("hold_id"), left.label("remaining"))
                    .outerjoin(released, released.c.refers_to_id == t.id)
                    .where(t.kind == "hold", left > 0).subquery())
    for hold_id, journal_left, kept in session.execute(
        select(func.coalesce(journal_open.c.hold_id, OpenHold.hold_id), journal_open.c.remaining, OpenHold.remaining)
        .select_from(journal_open).join(OpenHold, OpenHold.hold_id == journal_open.c.hold_id, full=True)
        .where(journal_open.c.remaining.is_distinct_from(OpenHold.remaining))
    ):
        problems.append(Mismatch(f"hold #{hold_id}", f"journal has {money_str(journal_left or 0)} still held, "
                                                     f"open holds {money_str(kept or 0)}"))
    return problems + _bounds(session)


# Each finds the rows that break one rule of the journal (read from the entries, not from the
# running totals, which are checked against the entries above), and says what each row shows.
_RULES = (
    """SELECT 'allocation #' || allocation_id || ' of account #' || account_id,
               'has ' || (allocated - charged + refunded) || ' left, below zero'
          FROM journal WHERE allocation_id IS NOT NULL AND allocated - charged + refunded < 0""",
    """SELECT 'allocation #' || allocation_id || ' of account #' || account_id,
               'holds ' || (allocated - charged + refunded) || ', more than the ' || allocated || ' put into it'
          FROM journal WHERE allocation_id IS NOT NULL AND refunded > charged""",
    """SELECT 'account #' || account_id || ' (its own row)',
               'is ' || (allocated - charged + refunded) || ': the row of what no allocation covered is never positive'
          FROM journal WHERE allocation_id IS NULL AND (allocated <> 0 OR refunded > charged)""",
    """SELECT 'account #' || account_id || ' allocation #' || coalesce(allocation_id::text, 'none'),
               'holds ' || held || ', less than nothing'
          FROM journal WHERE held < 0""",
    """SELECT 'charge #' || charge_id,
               'allocation #' || coalesce(allocation_id::text, 'none (the account)') || ' was given back '
               || (-carried) || ' more than the charge drew from it'
          FROM (SELECT CASE WHEN t.kind = 'charge' THEN t.id ELSE t.refers_to_id END AS charge_id, e.allocation_id,
                       sum(CASE WHEN e.bucket = 'charged' THEN e.amount ELSE -e.amount END) AS carried
                  FROM ledger_entries e JOIN ledger_transactions t ON t.id = e.transaction_id
                 WHERE e.bucket IN ('charged', 'refunded')
                   AND ((t.kind IN ('adjustment', 'refund') AND t.refers_to_id IS NOT NULL)
                        OR (t.kind = 'charge' AND EXISTS (  -- a charge nothing refers to is whole
                            SELECT 1 FROM ledger_transactions r
                             WHERE r.refers_to_id = t.id AND r.kind IN ('adjustment', 'refund'))))
                 GROUP BY 1, 2) slices
         WHERE carried < 0""",
    """SELECT x.kind || ' #' || x.id,
               CASE WHEN r.id IS NULL THEN 'refers to no transaction'
                    ELSE 'refers to ' || r.kind || ' #' || r.id || ' of account #' || r.account_id
                         || ', not to a ' || CASE WHEN x.kind = 'release' THEN 'hold' ELSE 'charge' END
                         || ' of its own account #' || x.account_id END
          FROM ledger_transactions x LEFT JOIN ledger_transactions r ON r.id = x.refers_to_id
         WHERE (x.kind IN ('refund', 'release') OR (x.kind = 'adjustment' AND x.refers_to_id IS NOT NULL))
           AND (r.id IS NULL OR r.account_id <> x.account_id
                OR r.kind <> CASE WHEN x.kind = 'release' THEN 'hold' ELSE 'charge' END)""",
    """SELECT 'job #' || job_id, count(*) || ' charges for service #' || service_id || ': '
               || string_agg('#' || id, ', ' ORDER BY id) || ' (one per run and resource)'
          FROM ledger_transactions WHERE kind = 'charge' AND job_id IS NOT NULL
         GROUP BY job_id, service_id HAVING count(*) > 1""",
    """SELECT 'hold #' || h.hold_id,
               CASE WHEN j.id IS NULL THEN 'is open for job #' || h.job_id || ', which is not recorded'
                    WHEN j.end_time IS NOT NULL THEN 'is still open, but its job #' || j.id || ' ended at ' || j.end_time
                    ELSE 'is held on account #' || h.account_id || ', its job #' || j.id || ' on account #' || j.account_id
               END
          FROM open_holds h LEFT JOIN jobs j ON j.id = h.job_id
         WHERE h.job_id IS NOT NULL
           AND (j.id IS NULL OR j.end_time IS NOT NULL OR j.account_id IS DISTINCT FROM h.account_id)""",
)
_JOURNAL = """WITH journal AS (
    SELECT account_id, allocation_id,
           coalesce(sum(amount) FILTER (WHERE bucket = 'allocated'), 0) AS allocated,
           coalesce(sum(amount) FILTER (WHERE bucket = 'charged'), 0) AS charged,
           coalesce(sum(amount) FILTER (WHERE bucket = 'refunded'), 0) AS refunded,
           coalesce(sum(amount) FILTER (WHERE bucket = 'held'), 0) AS held
      FROM ledger_entries GROUP BY account_id, allocation_id)
"""


def _bounds(session: Session) -> list[Mismatch]:
    """The rules money obeys: every allocation holds between nothing and what was put into it (a
    charge draws no more than it has; the credit limit lets the account's own row go below zero); the account's own row is never positive; no slice of a charge is given
    back more than it carried; refunds and adjustments refer to a charge of their own account;
    one charge per job run and resource; an open hold belongs to a job still running."""
    problems: list[Mismatch] = []
    for sql in _RULES:
        problems += [Mismatch(what, detail) for what, detail in session.execute(text(_JOURNAL + sql))]
    # the rule the database holds every new entry to (migration 0011), over the whole history
    problems += [Mismatch(f"transaction #{txn}", problem) for txn, problem in session.execute(
        text("SELECT transaction_id, problem FROM ledger_misshapen ORDER BY transaction_id"))]
    return problems


__all__ = [
    "Balance", "Carried", "Mismatch", "account_balance", "adjust", "carried", "charge", "deposit", "expire_holds",
    "hold", "prices", "project_balance", "refund", "refund_share", "refundable", "release", "release_earlier_runs",
    "reprice", "settle_holds", "transfer", "verify",
]
