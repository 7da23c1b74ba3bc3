"""A statement as CSV or as a self-contained HTML page (inline CSS and SVG, nothing fetched)."""

from __future__ import annotations

import csv
import datetime as dt
import html
import io
import json
from collections import defaultdict
from decimal import Decimal
from typing import Any

from services.reporter.statements import Line, Statement
from shared.money import display, exact_places, measure, money_str

SUMMARY = [("opening", "Opening balance"), ("deposit", "Deposits"), ("charge", "Charges"),
           ("refund", "Refunds"), ("adjustment", "Adjustments"), ("transfer", "Transfers"),
           ("hold", "Holds"), ("release", "Releases"),
           ("allocations_started", "Allocations that began"), ("allocations_ended", "Allocations that ended"),
           ("closing", "Closing balance")]
# A statement's line, as every format shows it; the amount is signed (shared.money).
LINE_COLUMNS = ["effective_at", "transaction_id", "kind", "account", "service", "job", "user", "quantity", "units",
                "rate", "description", "amount"]


def summary(statement: Statement) -> list[tuple[str, Decimal]]:
    values = {"opening": statement.opening, "closing": statement.closing,
              "allocations_started": statement.allocations_started,
              "allocations_ended": statement.allocations_ended, **statement.activity}
    return [(label, values[key]) for key, label in SUMMARY
            if key in ("opening", "closing", "deposit", "charge", "refund") or values[key]]


def to_json(found: Statement | list[Statement]) -> str:
    data = found.as_dict() if isinstance(found, Statement) else [st.as_dict() for st in found]
    return json.dumps(data, indent=2, default=_json_value) + "\n"


def _json_value(value: Any) -> Any:
    if isinstance(value, Decimal):
        return money_str(value)
    if isinstance(value, dt.datetime):
        return value.isoformat()
    raise TypeError(f"{type(value).__name__} is not JSON")


def cell(value: object) -> object:
    """A CSV cell a spreadsheet shows as text: one that starts like a formula (=, +, -, @, a tab
    or a carriage return) gets a leading apostrophe. Numbers stay numbers."""
    if isinstance(value, str) and value.startswith(("=", "+", "-", "@", "\t", "\r")):
        return "'" + value
    return value


def to_csv(statement: Statement) -> str:
    """For a spreadsheet: the exact amounts (it rounds them as it shows them), a field a column."""
    out = io.StringIO()
    writer = csv.DictWriter(out, ["project", *LINE_COLUMNS, "late"])
    writer.writeheader()

    def total(at: dt.datetime, label: str, amount: Decimal) -> None:
        writer.writerow({"project": statement.project, "effective_at": at.isoformat(), "kind": label,
                         "amount": money_str(amount)})

    total(statement.start, "opening balance", statement.opening)
    for line in statement.lines:
        writer.writerow({"project": statement.project, "effective_at": line.effective_at.isoformat(),
                         "transaction_id": line.transaction_id, "kind": line.kind, "account": cell(line.account),
                         "service": cell(line.service or ""), "job": cell(line.job or ""),
                         "user": cell(line.user or ""), "quantity": _exact(line.quantity),
                         "units": cell(line.units or ""), "rate": _exact(line.rate),
                         "description": cell(line.description), "amount": money_str(line.amount),
                         "late": "late posting" if line.late else ""})
    for key, label in (("allocations_started", "allocations that began"), ("allocations_ended", "allocations that ended")):
        if getattr(statement, key):
            total(statement.end, label, getattr(statement, key))
    total(statement.end, "closing balance", statement.closing)
    return out.getvalue()


def _exact(value: Decimal | None) -> str:
    return "" if value is None else money_str(value)


def to_html(statement: Statement) -> str:
    e = html.escape
    period = f"{statement.start:%Y-%m-%d %H:%M} to {statement.end:%Y-%m-%d %H:%M} UTC"
    rows = "".join(f"<tr><td>{e(label)}</td><td class=n>{e(display(amount))}</td></tr>"
                   for label, amount in summary(statement))
    items = "".join(_html_line(statement.lines))
    return f"""<!doctype html>
<html lang=en><head><meta charset=utf-8><title>Statement {e(statement.project)}, {e(period)}</title>
<style>
body {{ font: 14px/1.4 system-ui, sans-serif; margin: 2em auto; max-width: 60em; color: #222; }}
h1 {{ font-size: 1.4em; }} table {{ border-collapse: collapse; margin: 1em 0; }}
td, th {{ padding: .25em .75em; border-bottom: 1px solid #ddd; text-align: left; }}
td.n {{ text-align: right; font-variant-numeric: tabular-nums; }}
.chart rect {{ fill: #3a6ea5; }} .chart text {{ font-size: 10px; fill: #555; }}
</style></head><body>
<h1>Statement for project {e(statement.project)}</h1>
<p>{e(period)}</p>
<table id=summary>{rows}</table>
<h2>Charges per day</h2>
{daily_chart(statement)}
<h2>Transactions</h2>
<table id=lines><tr><th>effective</th><th>#</th><th>kind</th><th>account</th><th>service</th><th>job</th><th>user</th>
<th>quantity</th><th>units</th><th>rate</th><th>description</th><th>amount</th></tr>{items}</table>
</body></html>
"""


def _html_line(lines: list[Line]) -> list[str]:
    """The lines' rows: amounts as people read money; quantities and rates exactly, each column to
    one number of places (right-aligned, they line up on the point)."""
    e = html.escape
    quantities = exact_places(line.quantity for line in lines if line.quantity is not None)
    rates = exact_places(line.rate for line in lines if line.rate is not None)
    return [
        f"<tr><td>{line.effective_at:%Y-%m-%d %H:%M}{' (late posting)' if line.late else ''}</td>"
        f"<td>{line.transaction_id}</td><td>{e(line.kind)}</td>"
        f"<td>{e(line.account)}</td><td>{e(line.service or '')}</td><td>{e(line.job or '')}</td>"
        f"<td>{e(line.user or '')}</td>"
        f"<td class=n>{'' if line.quantity is None else e(measure(line.quantity, quantities))}</td>"
        f"<td>{e(line.units or '')}</td>"
        f"<td class=n>{'' if line.rate is None else e(measure(line.rate, rates))}</td>"
        f"<td>{e(line.description)}</td><td class=n>{e(display(line.amount))}</td></tr>"
        for line in lines]


def daily_chart(statement: Statement) -> str:
    """An inline SVG bar chart of the charges (net of refunds) of each day of the period."""
    per_day: dict[str, Decimal] = defaultdict(Decimal)
    for line in statement.lines:
        if line.kind in ("charge", "refund"):  # a late posting counts on the day it came in
            per_day[f"{max(line.effective_at, statement.start):%Y-%m-%d}"] -= line.amount
    if not per_day:
        return "<p>No charges in this period.</p>"
    first, last = statement.start.date(), (statement.end - dt.timedelta(microseconds=1)).date()
    return bar_chart([(day, per_day.get(day, Decimal(0))) for day in _days(first, last)], "charges per day")


def _days(first: dt.date, last: dt.date) -> list[str]:
    return [f"{first + dt.timedelta(days=n):%Y-%m-%d}" for n in range((last - first).days + 1)]


def bar_chart(points: list[tuple[str, Decimal]], title: str, width: int = 720, height: int = 160) -> str:
    """Vertical bars, one per point, in order; the first and last labels under them."""
    top = max([v for _, v in points] + [Decimal("0.000001")])
    step = width / max(len(points), 1)
    bars = []
    for i, (label, value) in enumerate(points):
        h = float(max(value, Decimal(0)) / top) * (height - 20)
        bars.append(f'<rect x="{i * step + 1:.1f}" y="{height - 15 - h:.1f}" width="{max(step - 2, 1):.1f}" '
                    f'height="{h:.1f}"><title>{html.escape(label)}: {display(value)}</title></rect>')
    labels = (f'<text x="0" y="{height - 2}">{html.escape(points[0][0])}</text>'
              f'<text x="{width - 60}" y="{height - 2}">{html.escape(points[-1][0])}</text>') if points else ""
    return (f'<svg class=chart width="{width}" height="{height}" role="img" '
            f'aria-label="{html.escape(title)}">{"".join(bars)}{labels}</svg>')


def share_bars(points: list[tuple[str, Decimal]]) -> str:
    """Horizontal bars, biggest first: who or what used how much."""
    top = max([v for _, v in points] + [Decimal("0.000001")])
    rows = "".join(
        f'<tr><td>{html.escape(label or "(none)")}</td><td class=n>{html.escape(display(value))}</td>'
        f'<td><div class=bar style="width:{float(max(value, Decimal(0)) / top) * 300:.0f}px"></div></td></tr>'
        for label, value in points)
    return f"<table class=shares>{rows}</table>"


def usage_page(first: dt.date, last: dt.date, by: list[str], rows: list[dict[str, Any]],
               over_time: list[dict[str, Any]], by_user: list[dict[str, Any]], by_service: list[dict[str, Any]]) -> str:
    """A usage report a PI would rather look at than read: net charges over time, by user, by
    service, and the table broken down as asked."""
    e = html.escape
    per_day = {f"{r['day']:%Y-%m-%d}": r["net"] for r in over_time}
    columns = [*by, "jobs", "charged", "refunded", "net"]
    head = "".join(f"<th>{e(c)}</th>" for c in columns)
    body = "".join("<tr>" + "".join(
        f"<td class=n>{e(display(r[c]))}</td>" if isinstance(r[c], Decimal) else f"<td>{e(str(r[c]))}</td>"
        for c in columns) + "</tr>" for r in rows)
    return f"""<!doctype html>
<html lang=en><head><meta charset=utf-8><title>Usage {first} to {last}</title>
<style>
body {{ font: 14px/1.4 system-ui, sans-serif; margin: 2em auto; max-width: 60em; color: #222; }}
h1 {{ font-size: 1.4em; }} table {{ border-collapse: collapse; margin: 1em 0; }}
td, th {{ padding: .25em .75em; border-bottom: 1px solid #ddd; text-align: left; }}
td.n {{ text-align: right; font-variant-numeric: tabular-nums; }}
.chart rect {{ fill: #3a6ea5; }} .bar {{ background: #3a6ea5; height: 1em; }}
.chart text {{ font-size: 10px; fill: #555; }}
</style></head><body>
<h1>Usage from {first} to {last}</h1>
<h2>Net charges per day</h2>
{bar_chart([(day, per_day.get(day, Decimal(0))) for day in _days(first, last)], "net charges per day")}
<h2>By user</h2>
{share_bars([(r["user"], r["net"]) for r in by_user])}
<h2>By service</h2>
{share_bars([(r["service"], r["net"]) for r in by_service])}
<h2>By {e(", ".join(by))}</h2>
<table id=usage><tr>{head}</tr>{body}</table>
</body></html>
"""
