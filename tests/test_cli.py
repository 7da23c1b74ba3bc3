"""The admin CLI, in process: ``openacct.cli.run([...])`` against the quick-start center.

Every test runs inside the rolled-back transaction of ``db_connection`` (through ``quickstart``).
Happy paths assert exact ``--json`` output; every mistake must end in one ``error:`` line naming
the offending value, exit 1 (domain errors) or exit 2 with the command's ``--help`` to read (usage
errors), never a traceback, and must write nothing.
"""

from __future__ import annotations

import datetime as dt
import os
import re
import subprocess
import sys
from collections.abc import Callable
from decimal import Decimal
from pathlib import Path

import pytest
from sqlalchemy import Connection, Engine, func, select, text

from shared.models import Base
from tests.conftest import Cli, Result

ROOT = Path(__file__).parents[1]
CORE = "cluster-core-hours"
UTC = dt.UTC


@pytest.fixture
def ok(cli: Cli) -> Cli:
    """Run a command that must succeed quietly on stderr."""

    def invoke(*argv: str) -> Result:
        result = cli(*argv)
        assert result.code == 0, f"{argv}: exit {result.code}: {result.err}"
        assert result.err == "", result.err
        return result

    return invoke


def row_counts(connection: Connection) -> dict[str, int]:
    return {t.name: connection.execute(select(func.count()).select_from(t)).scalar_one()
            for t in Base.metadata.sorted_tables}


def assert_adds_up(balance: dict[str, str]) -> None:
    d = {k: Decimal(v) for k, v in balance.items() if k != "name"}
    assert d["allocated"] - d["charged"] + d["refunded"] - d["held"] == d["available"]


def when(text_: str) -> dt.datetime:
    return dt.datetime.fromisoformat(text_)


def keys(result: Result) -> list[str]:
    return [row["key"] for row in result.json()]


# --------------------------------------------------------------------------- systems, services


def test_system_add_and_list(ok: Cli) -> None:
    assert ok("system", "add", "gpu-cluster", "-d", "GPU nodes").out == "system gpu-cluster added\n"
    rows = ok("system", "list", "--json").json()
    assert [(r["name"], r["description"]) for r in rows] == [
        ("cluster", "A Cluster"), ("gpu-cluster", "GPU nodes")]
    assert all(when(r["created_at"]).tzinfo is not None for r in rows)
    table = ok("system", "list").out
    assert "gpu-cluster" in table and "GPU nodes" in table


def test_service_add_and_list(ok: Cli) -> None:
    ok("system", "add", "gpu-cluster")
    out = ok("service", "add", "gpu-hours", "--system", "gpu-cluster", "--units", "gpu-hours",
             "--rate", "1.25", "-d", "GPU hours").out
    assert out == "service gpu-hours added to gpu-cluster at 1.25 per gpu-hours\n"
    # A service whose first rate starts later is listed without a rate in effect now.
    ok("service", "add", "storage", "--system", "cluster", "--units", "TB-months", "--rate", "3",
       "--from", "2999-01-01")
    assert ok("service", "list", "--json").json() == [
        {"system": "cluster", "name": CORE, "units": "core-hours", "rate": "0.05",
         "description": "CPU core usage * wallclock hours"},
        {"system": "cluster", "name": "storage", "units": "TB-months", "rate": None, "description": ""},
        {"system": "gpu-cluster", "name": "gpu-hours", "units": "gpu-hours", "rate": "1.25",
         "description": "GPU hours"},
    ]
    rows = ok("service", "list", "--system", "gpu-cluster", "--json").json()
    assert rows == [{"system": "gpu-cluster", "name": "gpu-hours", "units": "gpu-hours",
                     "rate": "1.25", "description": "GPU hours"}]
    assert "gpu-hours" in ok("service", "list").out


def test_service_rate_set_from_a_date_shows_history_and_prices_charges(ok: Cli) -> None:
    out = ok("service", "rate", CORE, "0.1", "--from", "2026-06-01").out
    assert out.startswith(f"service {CORE} costs 0.1 per unit from 2026-06-01")
    history = ok("service", "rate", CORE, "--json").json()
    assert [(when(r["effective_from"]), r["rate"]) for r in history] == [
        (dt.datetime(1970, 1, 1, tzinfo=UTC), "0.05"),
        (dt.datetime(2026, 6, 1, tzinfo=UTC), "0.10"),
    ]
    # SYSTEM/NAME names the same service; the table shows the same history.
    assert ok("service", "rate", f"cluster/{CORE}", "--json").json() == history
    assert f"rates of {CORE}" in ok("service", "rate", CORE).out
    assert [r["rate"] for r in ok("service", "list", "--json").json()] == ["0.10"]

    ok("deposit", "phys", "1000", "--start", "2026-01-01")
    before = ok("charge", "phys", "--service", CORE, "--quantity", "100", "--at", "2026-05-31T23:00").out
    after = ok("charge", "phys", "--service", CORE, "--quantity", "100", "--at", "2026-06-01").out
    assert "5.00 (100 x 0.05)" in before
    assert "10.00 (100 x 0.1)" in after
    charges = ok("transactions", "--kind", "charge", "--json").json()
    assert [(c["amount"], c["rate"]) for c in charges] == [("-10.00", "0.10"), ("-5.00", "0.05")]


# --------------------------------------------------------------------------- users, projects, members


def test_user_add_and_list(ok: Cli) -> None:
    out = ok("user", "add", "alice", "--full-name", "Alice Liddell", "--email", "alice@example.org").out
    assert out == "user alice added\n"
    assert ok("user", "list", "--json").json() == [
        {"name": "alice", "full_name": "Alice Liddell", "email": "alice@example.org", "active": True},
        {"name": "bob", "full_name": "", "email": "", "active": True},
        {"name": "sue", "full_name": "", "email": "", "active": True},
        {"name": "tux", "full_name": "", "email": "", "active": True},
    ]
    assert "Alice Liddell" in ok("user", "list").out


def test_project_add_list_and_show(ok: Cli) -> None:
    out = ok("project", "add", "bio", "--pi", "sue", "-d", "Biology", "--parent", "chem").out
    assert out == "project bio added, led by sue, with account bio\n"
    assert ok("project", "list", "--json").json() == [
        {"name": "bio", "pi": "sue", "parent": "chem", "active": True, "description": "Biology"},
        {"name": "chem", "pi": "sue", "parent": None, "active": True, "description": "Chemistry Dept"},
        {"name": "phys", "pi": "bob", "parent": None, "active": True, "description": "Physics Dept"},
    ]
    shown = ok("project", "show", "bio", "--json").json()
    history = shown.pop("membership_history")
    assert shown == {
        "name": "bio", "pi": "sue", "description": "Biology", "active": True, "parent": "chem",
        "members": ["sue"],
        "accounts": [{"name": "bio", "default": True, "active": True, "expires_at": None, "services": []}],
        "balance": {"name": "bio", "allocated": "0.00", "charged": "0.00", "refunded": "0.00",
                    "held": "0.00", "available": "0.00", "credit_limit": "0.00"},
    }
    assert [(h["event"], h["user"]) for h in history] == [("added", "sue")]
    table = ok("project", "show", "phys").out
    assert "bob, tux" in table and CORE in table and "Physics Dept" in table
    assert "bio" in ok("project", "list").out


def test_member_add_and_remove(ok: Cli) -> None:
    assert ok("member", "add", "phys", "sue").out == "added sue to phys\n"
    assert ok("project", "show", "phys", "--json").json()["members"] == ["bob", "sue", "tux"]
    assert ok("member", "remove", "phys", "tux", "sue").out == "removed tux, sue from phys\n"
    shown = ok("project", "show", "phys", "--json").json()
    assert shown["members"] == ["bob"]
    assert [(h["event"], h["user"]) for h in shown["membership_history"]] == [
        ("added", "bob"), ("added", "tux"), ("added", "sue"), ("removed", "tux"), ("removed", "sue")]
    # tux is still in chem.
    assert ok("project", "show", "chem", "--json").json()["members"] == ["sue", "tux"]


def services_by_account(ok: Cli, project: str) -> dict[str, list[str]]:
    return {a["name"]: a["services"] for a in ok("project", "show", project, "--json").json()["accounts"]}


def test_grant_and_revoke_by_project_and_by_account(ok: Cli, cli: Cli) -> None:
    ok("account", "add", "phys-gpu", "--project", "phys")
    assert services_by_account(ok, "phys") == {"phys": [CORE], "phys-gpu": []}

    assert ok("grant", CORE, "--account", "phys-gpu").out == f"granted {CORE} to phys-gpu (1 new grant(s))\n"
    assert services_by_account(ok, "phys") == {"phys": [CORE], "phys-gpu": [CORE]}
    # Granting again is harmless: nothing new.
    assert ok("grant", CORE, "--project", "phys").out == f"granted {CORE} to phys (0 new grant(s))\n"

    assert ok("revoke", CORE, "--account", "phys-gpu").out == f"revoked {CORE} from phys-gpu (1 grant(s))\n"
    assert services_by_account(ok, "phys") == {"phys": [CORE], "phys-gpu": []}
    assert ok("revoke", CORE, "--project", "phys").out == f"revoked {CORE} from phys (1 grant(s))\n"
    assert services_by_account(ok, "phys") == {"phys": [], "phys-gpu": []}
    # Revoked means no more charging.
    refused = cli("charge", "phys", "--service", CORE, "--quantity", "1")
    assert refused.code == 1 and "no access" in refused.err

    assert ok("grant", CORE, "--project", "phys").out == f"granted {CORE} to phys (2 new grant(s))\n"
    assert services_by_account(ok, "phys") == {"phys": [CORE], "phys-gpu": [CORE]}
    # The project name stands for its default account.
    assert ok("revoke", CORE, "--account", "phys").out == f"revoked {CORE} from phys (1 grant(s))\n"
    assert services_by_account(ok, "phys") == {"phys": [], "phys-gpu": [CORE]}


# --------------------------------------------------------------------------- accounts and money


def test_account_add_and_list(ok: Cli) -> None:
    out = ok("account", "add", "phys-gpu", "--project", "phys", "--expires", "2030-01-01", "-d", "GPU").out
    assert out == "account phys-gpu added to phys\n"
    ok("deposit", "phys-gpu", "50")
    rows = ok("account", "list", "--json").json()
    assert [(r["name"], r["project"], r["default"], r["active"], r["available"]) for r in rows] == [
        ("chem", "chem", True, True, "0.00"),
        ("phys", "phys", True, True, "0.00"),
        ("phys-gpu", "phys", False, True, "50.00"),
    ]
    assert rows[0]["expires_at"] is None
    assert when(rows[2]["expires_at"]) == dt.datetime(2030, 1, 1, tzinfo=UTC)
    assert [r["name"] for r in ok("account", "list", "--project", "phys", "--json").json()] == ["phys", "phys-gpu"]
    assert "phys-gpu" in ok("account", "list").out


def test_deposit_charges_and_balance_add_up_exactly(ok: Cli) -> None:
    assert ok("deposit", "phys", "1000").out.endswith(": 1,000.00 into phys\n")
    assert ok("charge", "phys", "--service", CORE, "--quantity", "100", "--user", "bob").out.endswith(
        ": 5.00 (100 x 0.05) to phys\n")
    assert ok("charge", "phys", "--service", CORE, "--quantity", "37.5", "--user", "tux").out.endswith(
        ": 1.88 (37.5 x 0.05) to phys\n")  # 1.875 shown to the cent; the ledger keeps 1.875
    phys = ok("balance", "phys", "--json").json()
    assert phys == {"name": "phys", "allocated": "1000.00", "charged": "6.875", "refunded": "0.00",
                    "held": "0.00", "available": "993.125", "credit_limit": "0.00"}
    assert_adds_up(phys)
    everyone = ok("balance", "--json").json()
    assert [b["name"] for b in everyone] == ["chem", "phys"]
    assert everyone[1] == phys
    assert everyone[0]["available"] == "0.00"
    # A table shows money to the cent, rounded half to even; --json above is exact.
    assert "993.12" in ok("balance", "phys").out and "993.125" not in ok("balance", "phys").out
    assert "993.12" in ok("balance").out


def test_deposit_options_start_end_credit_limit_key(ok: Cli) -> None:
    out = ok("deposit", "phys", "500", "--start", "2026-01-01", "--end", "2999-01-01",
             "--credit-limit", "25", "--key", "fy26", "-d", "FY26 allocation").out
    assert out.endswith(": 500.00 into phys\n")
    (txn,) = ok("transactions", "--json").json()
    assert (txn["kind"], txn["amount"], txn["key"], txn["description"]) == (
        "deposit", "500.00", "fy26", "FY26 allocation")
    assert when(txn["effective_at"]) == dt.datetime(2026, 1, 1, tzinfo=UTC)
    balance = ok("balance", "phys", "--json").json()
    assert (balance["allocated"], balance["available"], balance["credit_limit"]) == ("500.00", "500.00", "25.00")
    # Allocations count only while in force: one that has ended, one not started yet.
    ok("deposit", "phys", "70", "--start", "2026-01-01", "--end", "2026-02-01")
    ok("deposit", "phys", "30", "--start", "2999-01-01")
    assert ok("balance", "phys", "--json").json()["allocated"] == "500.00"
    assert ok("balance", "phys", "--at", "2026-01-15", "--json").json()["allocated"] == "570.00"


def test_same_idempotency_key_and_amount_writes_nothing_new(ok: Cli, db_connection: Connection) -> None:
    first = ok("deposit", "phys", "100", "--key", "dep-1").out
    charged = ok("charge", "phys", "--service", CORE, "--quantity", "10", "--user", "bob", "--key", "chg-1").out
    before = row_counts(db_connection)
    assert ok("deposit", "phys", "100", "--key", "dep-1").out == first
    assert ok("charge", "phys", "--service", CORE, "--quantity", "10", "--user", "bob", "--key", "chg-1").out == charged
    assert row_counts(db_connection) == before
    assert keys(ok("transactions", "--json")) == ["chg-1", "dep-1"]
    assert ok("balance", "phys", "--json").json()["available"] == "99.50"


def test_transfer_moves_available_money_and_keeps_its_expiry(ok: Cli) -> None:
    ok("deposit", "phys", "1000", "--end", "2999-01-01")
    assert ok("transfer", "phys", "chem", "250").out.endswith(": 250.00 from phys to chem\n")
    phys, chem = ok("balance", "phys", "--json").json(), ok("balance", "chem", "--json").json()
    assert (phys["allocated"], phys["available"]) == ("750.00", "750.00")
    assert (chem["allocated"], chem["available"]) == ("250.00", "250.00")
    assert_adds_up(phys)
    assert_adds_up(chem)
    # The moved money ends when the allocation it came from ends.
    assert ok("balance", "chem", "--at", "2999-06-01", "--json").json()["allocated"] == "0.00"
    (txn,) = ok("transactions", "--kind", "transfer", "--json").json()
    assert (txn["account"], txn["to_account"], txn["amount"]) == ("phys", "chem", "-250.00")  # out of phys


def test_a_project_name_is_accepted_wherever_an_account_is(ok: Cli) -> None:
    ok("account", "add", "phys-gpu", "--project", "phys")
    ok("grant", CORE, "--account", "phys-gpu")
    ok("deposit", "phys", "100")          # the project's default account
    ok("deposit", "phys-gpu", "50")       # an account by its own name
    ok("charge", "phys", "--service", CORE, "--quantity", "20")
    ok("charge", "phys-gpu", "--service", CORE, "--quantity", "40")
    ok("transfer", "phys", "phys-gpu", "9")
    accounts = {r["name"]: r["available"] for r in ok("account", "list", "--project", "phys", "--json").json()}
    assert accounts == {"phys": "90.00", "phys-gpu": "57.00"}
    # balance PROJECT sums every account of the project; balance ACCOUNT just that one.
    project = ok("balance", "phys", "--json").json()
    assert project == {"name": "phys", "allocated": "150.00", "charged": "3.00", "refunded": "0.00",
                       "held": "0.00", "available": "147.00", "credit_limit": "0.00"}
    assert ok("balance", "phys-gpu", "--json").json()["available"] == "57.00"
    assert [t["kind"] for t in ok("transactions", "--account", "phys", "--json").json()] == [
        "transfer", "charge", "deposit"]
    assert [t["kind"] for t in ok("transactions", "--account", "phys-gpu", "--json").json()] == [
        "transfer", "charge", "deposit"]
    assert len(ok("transactions", "--project", "phys", "--json").json()) == 5


# --------------------------------------------------------------------------- transactions, ledger


@pytest.fixture
def activity(ok: Cli) -> Cli:
    """Two projects' worth of dated history, every transaction with a key to find it by."""
    ok("service", "add", "gpu-hours", "--system", "cluster", "--units", "gpu-hours", "--rate", "2")
    ok("grant", "gpu-hours", "--project", "phys")
    ok("account", "add", "phys-gpu", "--project", "phys")
    ok("deposit", "phys", "1000", "--start", "2026-01-01", "--key", "d-phys")
    ok("deposit", "chem", "500", "--start", "2026-02-01", "--key", "d-chem")
    ok("charge", "phys", "--service", CORE, "--quantity", "100", "--user", "bob", "--at", "2026-03-01", "--key", "c1")
    ok("charge", "phys", "--service", "gpu-hours", "--quantity", "3", "--user", "tux", "--at", "2026-04-01", "--key", "c2")
    ok("charge", "chem", "--service", CORE, "--quantity", "10", "--user", "sue", "--at", "2026-05-01", "--key", "c3")
    ok("transfer", "phys", "phys-gpu", "100", "--key", "t1")
    return ok


TRANSACTION_FILTERS: list[tuple[list[str], list[str]]] = [
    ([], ["t1", "c3", "c2", "c1", "d-chem", "d-phys"]),
    (["--project", "phys"], ["t1", "c2", "c1", "d-phys"]),
    (["--project", "chem"], ["c3", "d-chem"]),
    (["--account", "phys-gpu"], ["t1"]),
    (["--account", "phys"], ["t1", "c2", "c1", "d-phys"]),
    (["--service", "gpu-hours"], ["c2"]),
    (["--service", f"cluster/{CORE}"], ["c3", "c1"]),
    (["--user", "tux"], ["c2"]),
    (["--kind", "deposit"], ["d-chem", "d-phys"]),
    (["--kind", "transfer"], ["t1"]),
    (["--kind", "refund"], []),
    (["--since", "2026-03-15"], ["t1", "c3", "c2"]),
    (["--until", "2026-03-01"], ["d-chem", "d-phys"]),
    (["--since", "2026-02-01", "--until", "2026-05-01"], ["c2", "c1", "d-chem"]),
    (["--project", "phys", "--kind", "charge", "--since", "2026-03-15"], ["c2"]),
    (["--limit", "2"], ["t1", "c3"]),
]


def test_transactions_filters(activity: Cli) -> None:
    got = {" ".join(filters): keys(activity("transactions", *filters, "--json")) for filters, _ in TRANSACTION_FILTERS}
    assert got == {" ".join(filters): expected for filters, expected in TRANSACTION_FILTERS}


def test_transactions_come_a_page_at_a_time(activity: Cli, cli: Cli) -> None:
    pages = [keys(activity("transactions", "--limit", "4", "--page", str(n), "--json")) for n in (1, 2, 3)]
    assert pages == [["t1", "c3", "c2", "c1"], ["d-chem", "d-phys"], []]
    # A table cut short says so on stderr, and how to see the rest; --json stays a bare list.
    first = cli("transactions", "--limit", "2")
    assert (first.code, first.err) == (0, "showing 1–2 of 6: --page 2 for more\n")
    assert "transfer" in first.out and "deposit" not in first.out
    assert cli("transactions", "--limit", "2", "--page", "2").err == "showing 3–4 of 6: --page 3 for more\n"
    assert cli("transactions", "--limit", "2", "--page", "3").err == ""  # the last page
    assert cli("transactions", "--limit", "2", "--page", "9").err == (
        "page 9 is past the end: 6 transactions, --page 3 is the last\n")
    assert activity("transactions", "--limit", "2", "--json").err == ""


def test_transactions_json_and_table(activity: Cli) -> None:
    (c2,) = activity("transactions", "--service", "gpu-hours", "--json").json()
    assert {k: c2[k] for k in ("kind", "account", "to_account", "amount", "service", "quantity",
                               "rate", "user", "key")} == {
        "kind": "charge", "account": "phys", "to_account": None, "amount": "-6.00",
        "service": "gpu-hours", "quantity": "3.00", "rate": "2.00", "user": "tux", "key": "c2"}
    assert when(c2["effective_at"]) == dt.datetime(2026, 4, 1, tzinfo=UTC)
    table = activity("transactions", "--user", "tux").out
    assert "gpu-hours" in table and "-6.00" in table and "2026-04-01" in table


def test_balances_after_activity(activity: Cli) -> None:
    phys = activity("balance", "phys", "--json").json()
    assert phys == {"name": "phys", "allocated": "1000.00", "charged": "11.00", "refunded": "0.00",
                    "held": "0.00", "available": "989.00", "credit_limit": "0.00"}
    accounts = {r["name"]: r["available"] for r in activity("account", "list", "--json").json()}
    assert accounts == {"chem": "499.50", "phys": "889.00", "phys-gpu": "100.00"}
    for target in ("phys", "chem", "phys-gpu"):
        assert_adds_up(activity("balance", target, "--json").json())
    # As the journal stood before the March charge.
    assert activity("balance", "phys", "--at", "2026-02-15", "--json").json()["available"] == "1000.00"


def test_ledger_verify(activity: Cli, cli: Cli, db_connection: Connection) -> None:
    assert activity("ledger", "verify", "--json").json() == {
        "ok": True, "accounts": 3, "projects": 2, "mismatches": []}
    assert activity("ledger", "verify").out == "ledger verified: 3 accounts in 2 projects agree with the journal\n"
    # Tamper with a running total: verify must notice and exit 1.
    db_connection.execute(text("UPDATE account_balances SET charged = charged + 1 WHERE allocation_id IS NOT NULL"
                               " AND account_id = (SELECT id FROM accounts WHERE name = 'chem')"))
    broken = cli("ledger", "verify", "--json")
    assert broken.code == 1
    report = broken.json()
    assert report["ok"] is False and len(report["mismatches"]) == 1
    assert "charged journal 0.50 vs balance 1.50" in report["mismatches"][0]["detail"]
    text_report = cli("ledger", "verify")
    assert text_report.code == 1 and text_report.out.startswith("MISMATCH account #")


def test_help_and_no_arguments(cli: Cli) -> None:
    helped = cli("--help")
    assert helped.code == 0 and "Usage" in helped.out and "--version" in helped.out
    bare = cli()
    assert bare.code == 2 and "Usage" in bare.out + bare.err


def test_version(cli: Cli) -> None:
    from importlib.metadata import version

    assert cli("--version") == Result(0, f"openacct {version('openacct')}\n", "")


# --------------------------------------------------------------------------- money as people read it


def cells(table: str, header: str, which: int = 0) -> list[str]:
    """The cells of the column named ``header`` of the ``which``-th table printed, as printed
    (padding included), top to bottom."""
    tables = table.split("┏")[1:]
    lines = tables[which].splitlines()
    names = [h.strip() for h in next(line for line in lines if "┃" in line).split("┃")]
    at = names.index(header)
    return [line.split("│")[at] for line in lines if line.startswith("│")]


def shown(column: list[str]) -> list[str]:
    """A column's values, and that it is right-aligned: every value ends where the column does."""
    assert len({len(cell.rstrip()) for cell in column if cell.strip()}) == 1, f"not right-aligned: {column}"
    return [cell.strip() for cell in column]


@pytest.fixture
def odd_amounts(ok: Cli) -> Cli:
    """Amounts of every length: 5000, 1564.40728 and 0.168 (31288.1456 and 3.36 core-hours at 0.05)."""
    ok("deposit", "phys", "5000", "--start", "2026-01-01")
    ok("charge", "phys", "--service", CORE, "--quantity", "31288.1456", "--user", "tux", "--at", "2026-10-05")
    ok("charge", "phys", "--service", CORE, "--quantity", "3.36", "--user", "bob", "--at", "2026-10-06")
    return ok


def test_a_money_column_has_one_number_of_decimals_and_lines_up(odd_amounts: Cli) -> None:
    table = odd_amounts("transactions").out
    # Newest first; charges are money out of the account: negative, as on a bank statement.
    assert shown(cells(table, "amount")) == ["-0.17", "-1,564.41", "5,000.00"]
    assert shown(cells(table, "quantity")) == ["3.3600", "31,288.1456", ""]  # measures exact, to one place
    balance = odd_amounts("balance", "phys").out
    assert [shown(cells(balance, c)) for c in ("allocated", "charged", "available")] == [
        ["5,000.00"], ["1,564.58"], ["3,435.42"]]
    statement = odd_amounts("statement", "phys", "--period", "2026-10").out
    assert shown(cells(statement, "amount", 0)) == ["5,000.00", "0.00", "-1,564.58", "0.00", "3,435.42"]
    assert shown(cells(statement, "amount", 1)) == ["-1,564.41", "-0.17"]


def test_json_keeps_the_exact_amounts(odd_amounts: Cli) -> None:
    assert [t["amount"] for t in odd_amounts("transactions", "--json").json()] == ["-0.168", "-1564.40728", "5000.00"]
    assert odd_amounts("balance", "phys", "--json").json() == {
        "name": "phys", "allocated": "5000.00", "charged": "1564.57528", "refunded": "0.00", "held": "0.00",
        "available": "3435.42472", "credit_limit": "0.00"}
    (st,) = odd_amounts("statement", "phys", "--period", "2026-10", "--format", "json").json()
    assert (st["charges"], st["closing"]) == ("-1564.57528", "3435.42472")
    assert [line["amount"] for line in st["lines"]] == ["-1564.40728", "-0.168"]
    assert [line["quantity"] for line in st["lines"]] == ["31288.1456", "3.36"]
    csv_lines = odd_amounts("statement", "phys", "--period", "2026-10", "--format", "csv").out.splitlines()
    assert [row.split(",")[-2] for row in csv_lines[2:4]] == ["-1564.40728", "-0.168"]  # amount, then late


def test_a_charge_has_one_sign_in_transactions_and_statement(odd_amounts: Cli) -> None:
    (charge,) = odd_amounts("transactions", "--kind", "charge", "--since", "2026-10-06", "--json").json()
    (st,) = odd_amounts("statement", "phys", "--period", "2026-10", "--format", "json").json()
    (line,) = [x for x in st["lines"] if x["transaction_id"] == charge["id"]]
    assert charge["amount"] == line["amount"] == "-0.168"
    listed = shown(cells(odd_amounts("transactions", "--kind", "charge").out, "amount"))
    stated = shown(cells(odd_amounts("statement", "phys", "--period", "2026-10").out, "amount", 1))
    assert listed == stated[::-1] == ["-0.17", "-1,564.41"]  # newest first in one, in order in the other
    deposit = odd_amounts("transactions", "--kind", "deposit").out
    assert shown(cells(deposit, "amount")) == ["5,000.00"]  # money in: positive


def test_the_center_sets_how_many_places_money_is_shown_to(odd_amounts: Cli, monkeypatch: pytest.MonkeyPatch) -> None:
    from shared.config import get_settings

    monkeypatch.setenv("OPENACCT_MONEY_PLACES", "3")
    get_settings.cache_clear()
    try:
        assert shown(cells(odd_amounts("transactions").out, "amount")) == ["-0.168", "-1,564.407", "5,000.000"]
        assert odd_amounts("transactions", "--json").json()[1]["amount"] == "-1564.40728"  # still exact
    finally:
        monkeypatch.delenv("OPENACCT_MONEY_PLACES")
        get_settings.cache_clear()


# --------------------------------------------------------------------------- mistakes


@pytest.fixture
def center(ok: Cli) -> Cli:
    """Money on phys (99.50 available) under known keys, and an account with no grants."""
    ok("deposit", "phys", "100", "--key", "dep-1")
    ok("charge", "phys", "--service", CORE, "--quantity", "10", "--user", "bob", "--key", "chg-1")
    ok("account", "add", "phys-gpu", "--project", "phys")
    return ok


Case = tuple[list[str], list[str]]  # argv, what the error must name


def case(*argv: str, names: list[str]) -> Case:
    return list(argv), names


# Malformed amounts and what the one-line error says about each.
BAD_AMOUNTS = [
    ("abc", "'abc' is not a number"),
    ("", "'' is not a number"),
    ("1e400", "'1e400' is too large"),
    ("1e1000000", "'1e1000000' is too large"),
    ("NaN", "not 'NaN'"),
    ("inf", "not 'inf'"),
    ("1.1234567", "'1.1234567' has more than 6 decimal places"),
]
SVC = ["--service", CORE]
RATE = ["service", "add", "gpu", "--system", "cluster", "--units", "x"]

# Mistakes a command refuses with exit 1 and one "error:" line, grouped by command. Each group
# runs in one test: every case must fail and write nothing, so the state stays the same for the next.
DOMAIN_ERRORS: dict[str, list[Case]] = {
    "system": [
        case("system", "add", "cluster", names=["system 'cluster' already exists"]),
        case("system", "add", "bad name!", names=["'bad name!' is not valid"]),
        case("system", "add", "", names=["name '' is not valid"]),
        case("system", "add", "x" * 65, names=["x" * 65]),
        case("system", "add", "_cluster", names=["'_cluster'"]),
        case("system", "add", "ok", "-d", "nul\x00byte", names=["NUL"]),
    ],
    "service add": [
        case("service", "add", CORE, "--system", "cluster", "--units", "core-hours", "--rate", "0.05",
             names=[f"'{CORE}' already exists"]),
        case("service", "add", "gpu", "--system", "nosuch", "--units", "x", "--rate", "1", names=["'nosuch'"]),
        case("service", "add", "bad name!", "--system", "cluster", "--units", "x", "--rate", "1",
             names=["'bad name!'"]),
        *(case(*RATE, "--rate", amount, names=["charge rate", message])
          for amount, message in BAD_AMOUNTS if amount != "1.1234567"),
        case(*RATE, "--rate", "0.12345678901", names=["'0.12345678901' has more than 10 decimal places"]),
        case(*RATE, "--rate", "100000000000000", names=["'100000000000000' is too large"]),
        case(*RATE, "--rate=-1", names=["'-1'", "negative"]),
        case(*RATE, "--rate", "-1", names=["'-1'", "negative"]),
        case(*RATE[:-1], "", "--rate", "1", names=["units"]),
        case(*RATE[:-1], "u" * 65, "--rate", "1", names=["u" * 65]),
        case(*RATE, "--rate", "1", "--from", "yesterday", names=["'yesterday'"]),
        case(*RATE, "--rate", "1", "--from", "2026-13-01", names=["'2026-13-01'"]),
    ],
    "service list and rate": [
        case("service", "list", "--system", "nosuch", names=["'nosuch'"]),
        case("service", "rate", "nosuch", names=["'nosuch'"]),
        case("service", "rate", "nosuch", "0.1", "--from", "2026-01-01", names=["'nosuch'"]),
        case("service", "rate", "nosys/" + CORE, names=["'nosys'"]),
        case("service", "rate", CORE, "abc", "--from", "2026-01-01", names=["'abc'"]),
        case("service", "rate", CORE, "NaN", "--from", "2026-01-01", names=["'NaN'"]),
        case("service", "rate", CORE, "1e1000000", "--from", "2026-01-01", names=["'1e1000000'"]),
        case("service", "rate", "--from", "2026-01-01", CORE, "--", "-0.1", names=["'-0.1'", "negative"]),
        case("service", "rate", CORE, "-0.1", "--from", "2026-01-01", names=["'-0.1'", "negative"]),
        case("service", "rate", CORE, "0.1", "--from", "yesterday", names=["'yesterday'"]),
        case("service", "rate", CORE, "0.1", "--from", "2026-13-01", names=["'2026-13-01'"]),
        case("service", "rate", CORE, "0.2", "--from", "1970-01-01", names=["already has a rate from 1970-01-01"]),
    ],
    "user": [
        case("user", "add", "bob", names=["user 'bob' already exists"]),
        case("user", "add", "bad name!", names=["'bad name!'"]),
        case("user", "add", "", names=["name ''"]),
    ],
    "project": [
        case("project", "add", "phys", "--pi", "bob", names=["project 'phys' already exists"]),
        case("project", "add", "phys-gpu", "--pi", "bob", names=["account named 'phys-gpu' already exists"]),
        case("project", "add", "bio", "--pi", "nobody", names=["no user named 'nobody'"]),
        case("project", "add", "bio", "--pi", "bob", "--parent", "nope", names=["no project named 'nope'"]),
        case("project", "add", "bad name!", "--pi", "bob", names=["'bad name!'"]),
        case("project", "add", "", "--pi", "bob", names=["name ''"]),
        case("project", "show", "nope", names=["'nope'"]),
    ],
    "member": [
        case("member", "add", "phys", "tux", names=["'tux' is already a member of project 'phys'"]),
        case("member", "add", "phys", "nobody", names=["'nobody'"]),
        case("member", "add", "nope", "bob", names=["'nope'"]),
        case("member", "add", "phys", "sue", "nobody", names=["'nobody'"]),  # adds no one
        case("member", "remove", "phys", "bob", names=["'bob' is the PI of project 'phys'"]),
        case("member", "remove", "phys", "sue", names=["'sue' is not a member of project 'phys'"]),
        case("member", "remove", "phys", "nobody", names=["'nobody'"]),
        case("member", "remove", "nope", "bob", names=["'nope'"]),
        case("member", "remove", "phys", "tux", "bob", names=["'bob'"]),  # removes no one
    ],
    "grant and revoke": [
        case("grant", "nope", "--project", "phys", names=["'nope'"]),
        case("grant", CORE, "--project", "nope", names=["'nope'"]),
        case("grant", CORE, "--account", "nope", names=["'nope'"]),
        case("revoke", CORE, "--account", "phys-gpu", names=["phys-gpu has no access", f"'{CORE}'"]),
        case("revoke", "nope", "--project", "phys", names=["'nope'"]),
        case("revoke", CORE, "--project", "nope", names=["'nope'"]),
        case("revoke", CORE, "--account", "nope", names=["'nope'"]),
    ],
    "account": [
        case("account", "add", "phys", "--project", "phys", names=["account 'phys' already exists"]),
        case("account", "add", "phys-gpu", "--project", "chem", names=["account 'phys-gpu' already exists"]),
        case("account", "add", "new", "--project", "nope", names=["'nope'"]),
        case("account", "add", "bad name!", "--project", "phys", names=["'bad name!'"]),
        case("account", "add", "new", "--project", "phys", "--expires", "yesterday", names=["'yesterday'"]),
        case("account", "add", "new", "--project", "phys", "--expires", "2026-13-01", names=["'2026-13-01'"]),
        case("account", "list", "--project", "nope", names=["'nope'"]),
    ],
    "deposit": [
        case("deposit", "nope", "100", names=["no account or project named 'nope'"]),
        *(case("deposit", "phys", amount, names=["amount", message]) for amount, message in BAD_AMOUNTS),
        case("deposit", "phys", "0", names=["'0'", "greater than zero"]),
        case("deposit", "phys", "--", "-5", names=["'-5'", "negative"]),
        case("deposit", "phys", "-100", names=["amount must not be negative, got '-100'"]),
        case("deposit", "phys", "-0.5", "--start", "2026-01-01", names=["'-0.5'", "negative"]),
        case("deposit", "phys", "-1e3", names=["'-1e3'", "negative"]),
        case("deposit", "phys", "100", "--credit-limit", "abc", names=["credit limit 'abc'"]),
        case("deposit", "phys", "100", "--credit-limit", "-5", names=["credit limit", "'-5'"]),
        case("deposit", "phys", "100", "--credit-limit=1e400", names=["credit limit '1e400'"]),
        case("deposit", "phys", "100", "--start", "yesterday", names=["start 'yesterday'"]),
        case("deposit", "phys", "100", "--start", "2026-13-01", names=["start '2026-13-01'"]),
        case("deposit", "phys", "100", "--start", "1969-12-31", names=["'1969-12-31'"]),
        case("deposit", "phys", "100", "--end", "yesterday", names=["end 'yesterday'"]),
        case("deposit", "phys", "100", "--start", "2026-06-01", "--end", "2026-01-01",
             names=["end 2026-01-01", "start 2026-06-01"]),
        case("deposit", "phys", "100", "--start", "2026-06-01", "--end", "2026-06-01", names=["end 2026-06-01"]),
        case("deposit", "phys", "200", "--key", "dep-1", names=["idempotency key 'dep-1'"]),
        case("deposit", "phys", "100", "--key", "dep-1", "--start", "2026-01-01", names=["'dep-1'"]),
        case("deposit", "chem", "100", "--key", "dep-1", names=["'dep-1'"]),
        case("deposit", "phys", "100", "--key", "chg-1", names=["'chg-1'"]),
        case("deposit", "phys", "100", "--key", "k" * 201, names=["201 characters"]),
    ],
    "charge": [
        case("charge", "nope", *SVC, "--quantity", "1", names=["'nope'"]),
        case("charge", "phys", "--service", "nope", "--quantity", "1", names=["no service named 'nope'"]),
        case("charge", "phys", "--service", "nosys/" + CORE, "--quantity", "1", names=["'nosys'"]),
        case("charge", "phys-gpu", *SVC, "--quantity", "1", names=["'phys-gpu' has no access"]),
        case("charge", "phys", *SVC, "--quantity", "1", "--user", "nobody", names=["'nobody'"]),
        case("charge", "phys", *SVC, "--quantity", "1", "--user", "sue",
             names=["'sue' is not a member of project 'phys'"]),
        *(case("charge", "phys", *SVC, "--quantity", amount, names=["quantity", message])
          for amount, message in BAD_AMOUNTS),
        case("charge", "phys", *SVC, "--quantity", "-5", names=["quantity", "'-5'"]),
        case("charge", "phys", *SVC, "--quantity=-5", names=["quantity", "'-5'"]),
        case("charge", "phys", *SVC, "--quantity", "1", "--at", "yesterday", names=["'yesterday'"]),
        case("charge", "phys", *SVC, "--quantity", "1", "--at", "2026-13-01", names=["'2026-13-01'"]),
        case("charge", "phys", *SVC, "--quantity", "1", "--at", "1969-12-31", names=["'1969-12-31'"]),
        case("charge", "phys", *SVC, "--quantity", "1", "--at", "2999-01-01", names=["2999-01-01", "future"]),
        case("charge", "phys", *SVC, "--quantity", "11", "--user", "bob", "--key", "chg-1",
             names=["idempotency key 'chg-1'"]),
        case("charge", "phys", *SVC, "--quantity", "10", "--user", "tux", "--key", "chg-1", names=["'chg-1'"]),
        case("charge", "phys", *SVC, "--quantity", "10", "--key", "dep-1", names=["'dep-1'"]),
    ],
    "transfer": [
        case("transfer", "nope", "chem", "1", names=["'nope'"]),
        case("transfer", "phys", "nope", "1", names=["'nope'"]),
        case("transfer", "phys", "chem", "1000", names=["1000.00", "'phys' has 99.50 available"]),
        case("transfer", "phys", "chem", "99.51", names=["99.51", "99.50 available"]),
        case("transfer", "chem", "phys", "0.01", names=["'chem' has 0.00 available"]),
        case("transfer", "phys", "phys", "1", names=["'phys' to itself"]),
        *(case("transfer", "phys", "chem", amount, names=["transfer amount", message])
          for amount, message in BAD_AMOUNTS),
        case("transfer", "phys", "chem", "0", names=["'0'", "greater than zero"]),
        case("transfer", "phys", "chem", "--", "-5", names=["'-5'", "negative"]),
        case("transfer", "phys", "chem", "-5", names=["transfer amount must not be negative, got '-5'"]),
        case("transfer", "phys", "chem", "1", "--key", "dep-1", names=["'dep-1'"]),
    ],
    "balance and transactions": [
        case("balance", "nope", names=["no account or project named 'nope'"]),
        case("balance", "phys", "--at", "yesterday", names=["'yesterday'"]),
        case("balance", "--at", "2026-13-01", names=["'2026-13-01'"]),
        case("transactions", "--project", "nope", names=["'nope'"]),
        case("transactions", "--account", "nope", names=["'nope'"]),
        case("transactions", "--service", "nope", names=["'nope'"]),
        case("transactions", "--user", "nobody", names=["'nobody'"]),
        case("transactions", "--kind", "bogus", names=["unknown kind 'bogus'"]),
        case("transactions", "--since", "yesterday", names=["since 'yesterday'"]),
        case("transactions", "--until", "2026-13-01", names=["until '2026-13-01'"]),
    ],
    "statement": [
        case("statement", "--from", "2026-01-01",
             names=["--to (the end of the period) is missing: give --from and --to, or --period MONTH"]),
        case("statement", "phys", "--to", "2026-02-01", names=["--from (the start of the period) is missing"]),
        case("statement", "--period", "2026-01", "--from", "2026-01-01", names=["--period MONTH, or --from and --to"]),
    ],
}


def check_each(cli: Cli, connection: Connection, cases: list[Case], check: Callable[[Result], str | None]) -> None:
    """Run every case, all of them even after a failure, and report every case that misbehaved."""
    before = row_counts(connection)
    problems = []
    for argv, names in cases:
        result = cli(*argv)
        problem = check(result) or next((f"does not name {n!r}" for n in names if n not in result.err), None)
        if problem is None and row_counts(connection) != before:
            problem = "wrote to the database"
        if problem:
            problems.append(f"{argv!r:.120}: {problem}\n    exit {result.code}, stdout {result.out!r:.200}, "
                            f"stderr {result.err!r:.300}")
    assert not problems, "\n".join(problems)


def one_error_line(result: Result) -> str | None:
    if result.code != 1:
        return f"exit {result.code}, not 1"
    if result.out:
        return "printed to stdout"
    lines = result.err.splitlines()
    if len(lines) != 1 or not lines[0].startswith("error: "):
        return "stderr is not one 'error:' line"
    return None


@pytest.mark.parametrize("family", DOMAIN_ERRORS)
def test_domain_errors_are_one_line_naming_the_value_and_write_nothing(
    center: Cli, cli: Cli, db_connection: Connection, family: str
) -> None:
    check_each(cli, db_connection, DOMAIN_ERRORS[family], one_error_line)


# Mistakes click itself (or a command, as click does) refuses: exit 2, usage and "Error:".
USAGE_ERRORS: dict[str, list[Case]] = {
    "center": [
        case("frobnicate", names=["frobnicate"]),
        case("system", "frob", names=["frob"]),
        case("system", "add", names=["Missing argument 'name'"]),
        case("system", "list", "--bogus", names=["--bogus"]),
        case("service", "add", "gpu", "--system", "cluster", "--units", "x", names=["--rate"]),
        case("service", "add", "gpu", "--units", "x", "--rate", "1", names=["--system"]),
        case("service", "add", "gpu", "--system", "cluster", "--rate", "1", names=["--units"]),
        case("service", "list", "--system", names=["--system"]),
        case("service", "rate", CORE, "0.1", names=["--from"]),
        case("user", "add", names=["Missing argument 'name'"]),
        case("user", "list", "extra", names=["extra"]),
        case("project", "add", "bio", names=["--pi"]),
        case("project", "show", names=["Missing argument 'name'"]),
        case("project", "list", "--json", "extra", names=["extra"]),
        case("member", "add", "phys", names=["Missing argument 'users'"]),
        case("member", "remove", "phys", names=["Missing argument 'users'"]),
        case("grant", CORE, "--project", "phys", "--account", "phys", names=["--project", "--account"]),
        case("grant", CORE, names=["--project", "--account"]),
        case("revoke", CORE, "--project", "phys", "--account", "phys", names=["--project", "--account"]),
        case("revoke", CORE, names=["--project", "--account"]),
        case("account", "add", "new", names=["--project"]),
    ],
    "money": [
        case("deposit", "phys", names=["Missing argument 'amount'"]),
        case("deposit", "phys", "100", "--bogus", names=["--bogus"]),
        case("charge", "phys", "--quantity", "1", names=["--service"]),
        case("charge", "phys", *SVC, names=["--quantity"]),
        case("transfer", "phys", "chem", names=["Missing argument 'amount'"]),
        case("transfer", "phys", "chem", "1", "extra", names=["extra"]),
        case("balance", "phys", "chem", names=["chem"]),
        case("transactions", "--limit", "0", names=["--limit"]),
        case("transactions", "--page", "0", names=["--page"]),
        case("transactions", "--limit", "abc", names=["--limit", "integer"]),
        case("transactions", "--kind", names=["--kind"]),
        case("ledger", "verify", "extra", names=["extra"]),
        case("ledger", "check", names=["check"]),
    ],
}


def usage_error(result: Result) -> str | None:
    if result.code != 2:
        return f"exit {result.code}, not 2"
    if result.out:
        return "printed to stdout"
    lines = result.err.splitlines()
    if len(lines) != 1 or not re.fullmatch(r"error: .+ \(openacct( [a-z-]+)* --help\)", lines[0]):
        return "stderr is not one 'error: … (openacct COMMAND --help)' line"
    return None


@pytest.mark.parametrize("family", USAGE_ERRORS)
def test_usage_errors_are_one_line_pointing_to_the_help_and_exit_2(cli: Cli, db_connection: Connection,
                                                                   family: str) -> None:
    check_each(cli, db_connection, USAGE_ERRORS[family], usage_error)


def test_a_usage_error_names_the_command_whose_help_to_read(cli: Cli) -> None:
    result = cli("service", "add", "gpu", "--system", "cluster", "--rate", "1")
    assert (result.code, result.out) == (2, "")
    assert result.err == "error: Missing option '--units' (openacct service add --help)\n"
    assert cli("frobnicate").err == "error: No such command 'frobnicate' (openacct --help)\n"


def test_a_charge_too_large_for_the_ledger_is_refused(ok: Cli, cli: Cli, db_connection: Connection) -> None:
    ok("service", "add", "gold", "--system", "cluster", "--units", "bars", "--rate", "99999999999999")
    ok("grant", "gold", "--project", "phys")
    before = row_counts(db_connection)
    for quantity in ("999999999999999", "100000"):  # past Decimal's 28 digits; past NUMERIC(24, 6)
        result = cli("charge", "phys", "--service", "gold", "--quantity", quantity)
        assert result.code == 1, result
        (line,) = result.err.splitlines()
        assert line.startswith("error: amount ") and "too large" in line
    assert row_counts(db_connection) == before


# --------------------------------------------------------------------------- the process as a whole


UNREACHABLE = "postgresql://nobody@127.0.0.1:1/none"


def openacct_process(tmp_path: Path, config: str = "", **env: str) -> subprocess.CompletedProcess[str]:
    """``openacct system list`` in a fresh process, configured only by ``env`` and ``config``."""
    config_file = tmp_path / "openacct.toml"
    config_file.write_text(config)
    clean = {k: v for k, v in os.environ.items() if not k.startswith("OPENACCT_")}
    clean.update({"OPENACCT_CONFIG": str(config_file), "OPENACCT_DATA_DIR": str(tmp_path / "data"),
                  "OPENACCT_DATABASE_URL": UNREACHABLE, **env})
    return subprocess.run([sys.executable, "-m", "openacct", "system", "list"], env=clean, cwd=ROOT,
                          capture_output=True, text=True, timeout=60)


def assert_one_error_line(result: subprocess.CompletedProcess[str]) -> str:
    assert result.returncode == 1, result
    assert "Traceback" not in result.stdout + result.stderr
    assert result.stdout == ""
    (line,) = result.stderr.splitlines()
    assert line.startswith("error:")
    return line


def test_an_unreachable_database_is_one_error_line(tmp_path: Path) -> None:
    line = assert_one_error_line(openacct_process(tmp_path))
    assert "database" in line and "127.0.0.1" in line


@pytest.mark.parametrize(("config", "env", "names"), [
    ("", {"OPENACCT_TIMEZONE": "Mars/Olympus"}, ["timezone", "'Mars/Olympus'"]),
    ("timezone = \n[broken\n", {}, ["openacct.toml", "cannot be read"]),
    ("", {"OPENACCT_API_URL": "http://api.example.org"}, ["api_url", "must be https://"]),
], ids=["unknown-timezone", "malformed-config-file", "api-over-plain-http"])
def test_a_bad_configuration_is_one_clear_line(tmp_path: Path, config: str, env: dict[str, str], names: list[str]) -> None:
    line = assert_one_error_line(openacct_process(tmp_path, config, **env))
    for name in names:
        assert name in line


@pytest.mark.parametrize("secret", ['broker_url = "redis://charger:s3cret@broker.example.org:6379/0"\n',
                                    'database_url = "postgresql://charger@db/openacct?password=s3cret"\n'],
                         ids=["in-the-url", "in-the-query"])
def test_a_config_everyone_reads_holds_no_password(tmp_path: Path, secret: str) -> None:
    config = tmp_path / "openacct.toml"
    config.write_text(secret)
    config.chmod(0o644)
    line = assert_one_error_line(openacct_process(tmp_path, secret))
    assert "readable by every user and" in line and "in it holds a password" in line and "s3cret" not in line
    config.chmod(0o640)  # the site's choice: only the services' group reads it
    line = assert_one_error_line(openacct_process(tmp_path, secret))
    assert "holds a password" not in line and "database" in line  # on to the next thing: no database


@pytest.mark.parametrize(("variable", "message"), [
    ("OPENACCT_DATABASE_URL", "OPENACCT_DATABASE_URL is set but empty: unset it for the embedded database, "
                              "or give a postgresql:// URL"),
    ("OPENACCT_BROKER_URL", "OPENACCT_BROKER_URL is set but empty: unset it for the embedded Redis, "
                            "or give a redis:// or amqp:// URL"),
])
def test_a_url_set_but_empty_is_a_mistake_not_the_embedded_server(tmp_path: Path, variable: str, message: str) -> None:
    line = assert_one_error_line(openacct_process(tmp_path, **{variable: ""}))
    assert line.endswith(message)
    assert not (tmp_path / "data" / "postgres").exists()  # no embedded server was started


def test_a_database_without_the_schema_says_to_upgrade_it(tmp_path: Path, scratch_engine: Engine) -> None:
    url = scratch_engine.url
    line = assert_one_error_line(openacct_process(tmp_path, OPENACCT_DATABASE_URL=url.render_as_string(hide_password=False)))
    # where the database is (host and port, or the socket folder of an embedded server), never who
    where = f"{url.host}:{url.port}" if url.host else url.query["host"]
    assert line == (f"error: the database at {where}/{url.database} has no OpenAcct schema "
                    "(or an old one): run `openacct db upgrade`")
    assert f"{url.username}@" not in line


def test_a_command_imports_its_own_module_and_publish_no_database_layer(tmp_path: Path) -> None:
    """Each command's module is loaded when it runs: a backfill's `openacct publish` (and each
    user's command) no longer pays for importing every other one, SQLAlchemy included."""
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    probe = ("import sys; from openacct.cli import run; "
             f"code = run(['publish', '--from', 'slurm-jobcomp', {str(empty)!r}]); "
             "print(code, sorted(m for m in ('sqlalchemy', 'openacct.cli.money', 'openacct.api') if m in sys.modules))")
    env = {**os.environ, "OPENACCT_SPOOL_DIR": str(tmp_path / "spool")}
    out = subprocess.run([sys.executable, "-c", probe], env=env, capture_output=True, text=True, timeout=60)
    assert out.stdout.splitlines()[-1] == "0 []", out.stdout + out.stderr


def test_every_command_of_the_table_loads_and_says_its_help(cli: Cli) -> None:
    from openacct.cli import COMMANDS

    for name in COMMANDS:
        result = cli(name, "--help")
        assert result.code == 0 and "Usage: openacct " + name in result.out, (name, result.out, result.err)
    assert "Did you mean 'balance'?" in cli("balanc").err
