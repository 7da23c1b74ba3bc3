"""The shape each kind of transaction gives its entries (migrations 0011, 0017, 0018), against a
rule stated here again, in Python, over every kind, bucket and account its entries may name.

Both places the database holds the rule are checked: the trigger that refuses a misshapen
statement, and the view ``ledger_misshapen`` that ``openacct ledger verify`` reads over rows
written past the trigger. SQL's unknown let two misshapen transactions through both (a charge of
one account drawn on another with no counterparty; a transfer with no entry on its own account):
a property over all shapes is what catches that class, not a test per case.
"""

from __future__ import annotations

import re
from decimal import Decimal

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from sqlalchemy import Connection, text
from sqlalchemy.exc import DBAPIError

from openacct.shortcuts import create_account, get_account
from shared.models import BUCKETS, TRANSACTION_KINDS

D = Decimal
SHAPE_REFUSED = "ledger refused: transaction #"
BALANCE_RULES = "PL/pgSQL function openacct_balance_rules_insert()"  # what refuses money that is not there (0009)
# what each kind moves: its bucket and the sign of its entries' sum against its amount
MOVES = {"deposit": ({"allocated"}, 1), "charge": ({"charged"}, 1), "refund": ({"refunded"}, 1),
         "hold": ({"held"}, 1), "release": ({"held"}, -1)}


def expected_problem(kind: str, amount: Decimal, account: int, counterparty: int | None,
                     entries: list[tuple[int, str, Decimal]]) -> str | None:
    """What is wrong with a transaction of these entries, as the rule says (None: nothing)."""
    own = (account, counterparty) if kind == "transfer" else (account,)  # only a transfer has a counterparty
    if any(a not in own for a, _, _ in entries):
        return "an entry is on another account than the transaction's"
    wrong = "its entries do not add up to its amount in the bucket its kind moves"
    buckets = {b for _, b, _ in entries}
    total = sum(x for _, _, x in entries)
    if len(buckets) != 1:
        return wrong
    bucket = buckets.pop()
    if kind in MOVES:
        allowed, sign = MOVES[kind]
        return None if bucket in allowed and total == sign * amount else wrong
    if kind == "adjustment":
        return None if bucket in ("allocated", "charged") and abs(total) == amount else wrong
    assert kind == "transfer"
    own = [x for a, _, x in entries if a == account]
    theirs = [x for a, _, x in entries if a == counterparty]
    ok = (bucket == "allocated" and counterparty is not None and counterparty != account
          and bool(own) and sum(own) == -amount and bool(theirs) and sum(theirs) == amount)
    return None if ok else wrong


@st.composite
def transactions(draw: st.DrawFn, accounts: tuple[int, int, int]) -> tuple[str, Decimal, int, int | None, list[tuple[int, str, Decimal]]]:
    a, b, _ = accounts
    kind = draw(st.sampled_from(TRANSACTION_KINDS))
    amount = draw(st.sampled_from([D(0), D(5), D(7)]))
    counterparty = draw(st.sampled_from([None, a, b]))
    # amounts that make the shapes the rule accepts likely, and the near misses
    values = st.sampled_from([amount, -amount, D(2), D(3), -D(2), amount + 1])
    entries = draw(st.lists(st.tuples(st.sampled_from(accounts), st.sampled_from(BUCKETS), values), min_size=1, max_size=3))
    if draw(st.booleans()):  # two entries splitting the amount, the way the ledger writes slices
        entries = [(entries[0][0], entries[0][1], amount - 2), (entries[0][0], entries[0][1], D(2))]
    return kind, amount, a, counterparty, entries


@pytest.fixture
def accounts(quickstart: None) -> tuple[int, int, int]:
    create_account("phys-spare", project="phys")
    return get_account("phys").id, get_account("chem").id, get_account("phys-spare").id


def test_a_transaction_takes_entries_only_when_it_is_written(db_connection: Connection, accounts: tuple[int, int, int]) -> None:
    """A charge of nothing has no entries; entries added to it later, summing to nothing, would
    move money between the account's allocations (migration 0018)."""
    account = accounts[0]
    txn = db_connection.execute(text(
        "INSERT INTO ledger_transactions (kind, idempotency_key, request_hash, amount, account_id, effective_at, "
        "created_at) VALUES ('charge', 'empty', '', 0, :a, now(), now() - interval '1 day') RETURNING id"),
        {"a": account}).scalar_one()
    savepoint = db_connection.begin_nested()
    with pytest.raises(DBAPIError, match=f"ledger refused: transaction #{txn}: entries were added to it after it was written"):
        db_connection.execute(text(
            "INSERT INTO ledger_entries (transaction_id, account_id, allocation_id, bucket, amount, effective_at) "
            "VALUES (:t, :a, NULL, 'charged', 1, now()), (:t, :a, NULL, 'charged', -1, now())"), {"t": txn, "a": account})
    savepoint.rollback()


def _write(db: Connection, kind: str, amount: Decimal, account: int, counterparty: int | None,
           entries: list[tuple[int, str, Decimal]]) -> int:
    txn = db.execute(text(
        "INSERT INTO ledger_transactions (kind, idempotency_key, request_hash, amount, account_id, "
        "counterparty_account_id, effective_at) VALUES (:k, gen_random_uuid()::text, '', :x, :a, :c, now()) "
        "RETURNING id"), {"k": kind, "x": amount, "a": account, "c": counterparty}).scalar_one()
    db.execute(text("INSERT INTO ledger_entries (transaction_id, account_id, allocation_id, bucket, amount, effective_at) "
                    "SELECT :t, a, NULL, b, x, now() FROM unnest(CAST(:as AS int[]), CAST(:bs AS text[]), "
                    "CAST(:xs AS numeric[])) AS e(a, b, x)"),
               {"t": txn, "as": [e[0] for e in entries], "bs": [e[1] for e in entries], "xs": [e[2] for e in entries]})
    return txn


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_the_database_refuses_exactly_the_shapes_the_rule_refuses(db_connection: Connection, accounts: tuple[int, int, int],
                                                                   data: st.DataObject) -> None:
    kind, amount, account, counterparty, entries = data.draw(transactions(accounts))
    expected = expected_problem(kind, amount, account, counterparty, entries)
    savepoint = db_connection.begin_nested()
    try:
        _write(db_connection, kind, amount, account, counterparty, entries)
        refused = ""
    except DBAPIError as exc:
        refused = str(exc.orig)
    savepoint.rollback()
    if expected is None:
        # the shape is right: taken, or refused by the balance rules for money that is not there
        assert refused == "" or (BALANCE_RULES in refused and SHAPE_REFUSED not in refused), \
            (kind, amount, counterparty, entries, refused)
    else:
        assert SHAPE_REFUSED in refused and expected in refused, (kind, amount, counterparty, entries, refused)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_verify_names_exactly_the_shapes_the_rule_refuses(db_connection: Connection, accounts: tuple[int, int, int],
                                                          data: st.DataObject) -> None:
    """Rows written past the trigger (as a bug, or an older OpenAcct, left them) are named by the
    view that ``ledger verify`` reads, with the same reason."""
    kind, amount, account, counterparty, entries = data.draw(transactions(accounts))
    savepoint = db_connection.begin_nested()
    db_connection.execute(text("SET LOCAL session_replication_role = replica"))
    txn = _write(db_connection, kind, amount, account, counterparty, entries)
    found = db_connection.execute(text("SELECT problem FROM ledger_misshapen WHERE transaction_id = :t"),
                                  {"t": txn}).scalars().all()
    savepoint.rollback()
    expected = expected_problem(kind, amount, account, counterparty, entries)
    assert found == ([] if expected is None else [expected]), (kind, amount, counterparty, entries)


def test_the_check_is_planned_for_each_statements_own_rows(db_connection: Connection, accounts: tuple[int, int, int],
                                                           query_plans: list[str]) -> None:
    """PL/pgSQL keeps a query's plan from the session's first call: a first statement of one
    entry had every later batch joined as if it held one row (a nested loop over the ledger, 1.4 s
    for 5,000 entries). The shape check is planned anew, for the rows each statement has."""
    account = accounts[0]
    plans = query_plans
    for size in (1, 1, 1, 1, 1, 1, 2000):  # more than the five calls after which a plan is kept
        ids = db_connection.execute(text(
            "INSERT INTO ledger_transactions (kind, idempotency_key, request_hash, amount, account_id, effective_at) "
            "SELECT 'hold', gen_random_uuid()::text, '', 1, :a, now() FROM generate_series(1, :n) RETURNING id"),
            {"a": account, "n": size}).scalars().all()
        plans.clear()
        db_connection.execute(text("INSERT INTO ledger_entries (transaction_id, account_id, allocation_id, bucket, amount, "
                                   "effective_at) SELECT id, :a, NULL, 'held', 1, now() FROM unnest(CAST(:ids AS bigint[])) id"),
                              {"a": account, "ids": ids})
    shape = [p for p in plans if "has_row" in p]
    assert len(shape) == 1 and re.search(r"Named Tuplestore Scan .*rows=2000 ", shape[0]), shape
