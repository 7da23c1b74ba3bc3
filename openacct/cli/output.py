"""How the CLI prints: rich tables for people, ``--json`` for scripts, one line for a mistake."""

from __future__ import annotations

import datetime as dt
import json
import sys
from collections.abc import Iterable, Mapping, Sequence
from decimal import Decimal
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.table import Table
from rich.text import Text

from shared.money import display, exact_places, measure, money_str

JsonFlag = Annotated[bool, typer.Option("--json", help="Print JSON instead of a table.")]

# For commands that take an amount as an argument: click reads "-100" as the options -1, -0, -0
# ("No such option: -1"). Taking what is not an option of the command for an argument, they hand
# a negative amount to the amount's own check, which says what is wrong with it.
NEGATIVE_AMOUNTS: dict[str, Any] = {"ignore_unknown_options": True}

# Decimal values that are measures, not money: shown exactly, a column to one number of places
# (every other Decimal is an amount, shown by shared.money.display).
MEASURES = frozenset({"quantity", "rate", "multiplier", "hours"})

# Piped output is read by people in a pager or a log, not an 80-column terminal.
console = Console(highlight=False, width=None if sys.stdout.isatty() else 200)


def plain(value: Any) -> Any:
    """JSON-ready: money as exact decimal strings, times and days in ISO 8601."""
    if isinstance(value, Decimal):
        return money_str(value)
    if isinstance(value, dt.date):  # datetimes too
        return value.isoformat()
    if isinstance(value, Mapping):
        return {k: plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [plain(v) for v in value]
    return value


def emit_json(data: Any) -> None:
    sys.stdout.write(json.dumps(plain(data), indent=2) + "\n")


def emit_rows(rows: Sequence[Mapping[str, Any]], columns: Iterable[str], *, as_json: bool, title: str | None = None) -> None:
    columns = list(columns)
    if as_json:
        emit_json([{c: row.get(c) for c in columns} for row in rows])
        return
    table = Table(title=title, title_justify="left")
    for column in columns:
        table.add_column(column.replace("_", " "), justify="right" if _numeric(rows, column) else "left")
    cells = {c: _cells(c, [row.get(c) for row in rows]) for c in columns}
    for n in range(len(rows)):
        # Text() keeps user-supplied strings from being read as rich markup.
        table.add_row(*(Text(cells[c][n]) for c in columns))
    console.print(table)


def emit_record(record: Mapping[str, Any], *, as_json: bool, title: str | None = None) -> None:
    if as_json:
        emit_json(record)
        return
    table = Table(title=title, title_justify="left", show_header=False)
    table.add_column("field", style="bold")
    table.add_column("value")
    for key, value in record.items():
        if isinstance(value, list | dict):
            continue
        table.add_row(Text(key.replace("_", " ")), Text(_cells(key, [value])[0]))
    console.print(table)


def done(message: str) -> None:
    console.print(Text(printable(message)))


# Control characters (C0 but tab and newline, DEL, C1): what a terminal would act on.
_CONTROLS = {c: f"\\x{c:02x}" for c in (*range(0x00, 0x09), *range(0x0b, 0x20), *range(0x7f, 0xa0))}


def printable(text: str) -> str:
    """``text`` with the characters a terminal would obey written out (\x1b, \x9b, …): names,
    reasons and descriptions come from users and events, and must not move a cursor or retitle
    a window."""
    return text.translate(_CONTROLS)


def _numeric(rows: Sequence[Mapping[str, Any]], column: str) -> bool:
    return any(isinstance(r.get(column), Decimal | int) and not isinstance(r.get(column), bool) for r in rows)


def _cells(column: str, values: list[Any]) -> list[str]:
    """A column's values as shown: amounts by the display rule, measures exactly, all of the
    column's numbers to the same places, so that a right-aligned column lines up on the point."""
    if column in MEASURES:
        places = exact_places(v for v in values if isinstance(v, Decimal))
        return [measure(v, places) if isinstance(v, Decimal) else _cell(v) for v in values]
    return [display(v) if isinstance(v, Decimal) else _cell(v) for v in values]


def _cell(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, dt.datetime):
        return value.strftime("%Y-%m-%d %H:%M:%S %Z")
    if isinstance(value, bool):
        return "yes" if value else "no"
    return printable(str(value))
