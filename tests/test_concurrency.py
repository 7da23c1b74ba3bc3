"""Concurrent writers on one account: real processes, real commits, nothing lost."""

from __future__ import annotations

import multiprocessing
import os
from decimal import ROUND_HALF_UP, Decimal
from pathlib import Path

from sqlalchemy import Engine

# tests.conftest's own, not imported from it: each spawned worker imports this module, and the
# conftest would make every one import pytest and a temporary data directory of its own.
QUICKSTART = Path(__file__).parents[1] / "examples" / "quickstart.py"

WORKERS = 8
CHARGES_EACH = 500
RATE = Decimal("0.05")


def _quantity(worker: int, i: int) -> Decimal:
    # Varied, with amounts that need rounding, so a lost or doubled charge shows in the sum.
    return Decimal(i % 13 + 1) * Decimal("0.37") + Decimal(worker) / 1000


def _charge_many(url: str, worker: int, start: multiprocessing.synchronize.Barrier) -> None:
    os.environ["OPENACCT_DATABASE_URL"] = url
    from openacct.shortcuts import get_account, get_service, get_user
    from shared import ledger
    from shared.db import session_scope

    account, service, user = get_account("phys"), get_service("cluster-core-hours"), get_user("tux")
    start.wait()
    for i in range(CHARGES_EACH):
        with session_scope() as session:  # one database transaction per charge, as a worker does
            ledger.charge(session, account, service, _quantity(worker, i), user=user, key=f"w{worker}-{i}")


def _transfer_many(url: str, worker: int, start: multiprocessing.synchronize.Barrier, refused: multiprocessing.Queue) -> None:
    os.environ["OPENACCT_DATABASE_URL"] = url
    from openacct.shortcuts import transfer
    from shared.errors import InsufficientFunds

    start.wait()
    count = 0
    for i in range(20):
        try:
            transfer("chem", "phys", "7", key=f"t{worker}-{i}")
        except InsufficientFunds:
            count += 1
    refused.put(count)


def _load_center() -> None:
    from openacct import shortcuts
    from shared.db import session_scope

    with session_scope():
        exec(QUICKSTART.read_text(), {n: getattr(shortcuts, n) for n in shortcuts.__all__})


def _run(target, args_for) -> None:  # type: ignore[no-untyped-def]
    ctx = multiprocessing.get_context("spawn")
    # Every worker waits there for the others, once imported: they start at once
    # (an event set as they are spawned let the first ones start while the last were importing).
    start = ctx.Barrier(WORKERS, timeout=120)
    procs = [ctx.Process(target=target, args=args_for(ctx, w, start)) for w in range(WORKERS)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=240)
        assert p.exitcode == 0, f"worker exited with {p.exitcode}"


def test_eight_processes_charging_one_account_lose_nothing(committed: Engine, database_url: str) -> None:
    from openacct.shortcuts import balance, deposit
    from shared import ledger
    from shared.db import session_scope

    _load_center()
    deposit("phys", "100000")
    _run(_charge_many, lambda ctx, w, start: (database_url, w, start))

    expected = sum(
        (_q * RATE).quantize(Decimal("0.000001"), rounding=ROUND_HALF_UP)
        for w in range(WORKERS) for i in range(CHARGES_EACH) for _q in [_quantity(w, i).quantize(Decimal("0.000001"))]
    )
    b = balance("phys")
    assert b.charged == expected
    assert b.available == Decimal("100000") - expected
    with session_scope() as s:
        assert ledger.verify(s) == []
        from sqlalchemy import func, select

        from shared.models import LedgerTransaction

        assert s.scalar(select(func.count()).where(LedgerTransaction.kind == "charge")) == WORKERS * CHARGES_EACH


def test_concurrent_transfers_never_overdraw(committed: Engine, database_url: str) -> None:
    from openacct.shortcuts import balance, deposit
    from shared import ledger
    from shared.db import session_scope

    _load_center()
    deposit("chem", "100")
    ctx = multiprocessing.get_context("spawn")
    refused = ctx.Queue()
    _run(_transfer_many, lambda ctx_, w, start: (database_url, w, start, refused))
    refusals = sum(refused.get(timeout=10) for _ in range(WORKERS))
    # 100 covers 14 transfers of 7; the other 146 of the 160 attempts are refused.
    assert refusals == WORKERS * 20 - 14
    assert balance("chem").available == Decimal("2")
    assert balance("phys").available == Decimal("98")
    with session_scope() as s:
        assert ledger.verify(s) == []


def test_the_same_key_racing_on_one_account_writes_once(committed: Engine) -> None:
    """Two writers with one key wait on the account lock; the second must find the first's
    transaction after the lock, not create a second allocation."""
    import threading

    from sqlalchemy import select as sql_select
    from sqlalchemy.orm import Session

    from openacct.shortcuts import balance, deposit, get_account
    from shared.models import Account, Allocation

    _load_center()
    phys = get_account("phys")
    blocker = Session(committed)
    blocker.execute(sql_select(Account.id).where(Account.id == phys.id).with_for_update(key_share=True))
    results: list[object] = []

    def write() -> None:
        results.append(deposit("phys", "100", credit_limit="500", key="grant-2026").id)

    threads = [threading.Thread(target=write) for _ in range(2)]
    for t in threads:
        t.start()
    import time

    time.sleep(0.5)  # both are now waiting for the lock
    blocker.rollback()
    blocker.close()
    for t in threads:
        t.join(30)
    assert len(results) == 2 and results[0] == results[1]
    with Session(committed) as s:
        assert len(s.scalars(sql_select(Allocation)).all()) == 1
    assert balance("phys").credit_limit == Decimal("500")
