"""The web portal: my projects with their balances and burn-down, a project's members, usage,
recent jobs and statements, and the membership forms of its PI and managers.

Server-rendered: Jinja2 templates (autoescaped), one plain style sheet, charts drawn here as
inline SVG with their geometry worked out in Python, and no JavaScript at all. The pages ask
``openacct.api.auth`` who the caller is (a bearer token, the SSO proxy's header, or the
``openacct_session`` cookie that the login form sets, its value a token) and
``openacct.api.access`` what they may see and do, and read what they show through
``openacct.api.views``, like every endpoint of the API; a form's write runs the API's own
endpoint code (``routes``: the access check, then the domain's ``openacct.shortcuts`` in the
request's session, the actor recorded).

Every POST carries a CSRF token that each form repeats in a hidden field: derived from the
session cookie when there is one, else (SSO, the login form) a random value in the HttpOnly,
SameSite=Strict cookie ``openacct_csrf`` (the double-submit pattern). A POST whose
field and cookie are missing or differ, or that the browser says comes from another site, is
refused with 403 before anything is read or written.
"""

from __future__ import annotations

import datetime as dt
import hmac
import math
import secrets
from collections import defaultdict
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from decimal import Decimal
from pathlib import Path
from typing import Annotated, Any
from urllib.parse import quote

from fastapi import APIRouter, Depends, HTTPException, Query, Request, Response
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, RedirectResponse
from fastapi.routing import APIRoute
from jinja2 import Environment, FileSystemLoader, StrictUndefined
from sqlalchemy import Date, cast, func, literal_column, select
from sqlalchemy.orm import Session
from starlette.exceptions import HTTPException as StarletteHTTPException

from openacct.api import access, routes, views
from openacct.api.auth import SESSION_COOKIE, Caller, by_token, caller_or_none
from openacct.api.database import Database
from openacct.api.errors import validation_message
from shared import ledger
from shared.errors import AlreadyExists, NotFound, OpenAcctError
from shared.events import NAME
from shared.ledger import AVAILABLE_EFFECT
from shared.models import (
    Account,
    Allocation,
    LedgerEntry,
    Project,
)
from shared.money import display

HERE = Path(__file__).parent
CSRF_COOKIE = "openacct_csrf"
CSRF_FIELD = "csrf_token"
# The security headers of every page: nothing but our own style sheet loads, no script runs, no
# other site frames the page or is the target of its forms.
PAGE_HEADERS = {
    "Content-Security-Policy": "default-src 'none'; style-src 'self'; img-src 'self'; form-action 'self'; "
                               "frame-ancestors 'none'; base-uri 'none'",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "same-origin",
    "Cache-Control": "no-store",
}
MAX_FORM = 64 * 1024
RECENT_JOBS = 25
STATEMENT_MONTHS = 3
STATEMENT_FORMATS = ("html", "csv", "json")
# A burn-down shows at most this many bars (days, or runs of days over a long period), over at
# most the last BURN_DOWN_DAYS days of an allocation period that has no end or a long past.
BURN_DOWN_BARS = 120
BURN_DOWN_DAYS = 366
# Colours of the users in the usage chart, biggest first; the rest share the last.
PALETTE = ("#3a6ea5", "#e07b39", "#5aa05a", "#b94a48", "#8e6bbf", "#c9a227", "#4aa3a3", "#8a8a8a")
BAR = PALETTE[0]
UTC = dt.UTC
INSTANT = dt.timedelta(microseconds=1)

templates = Environment(loader=FileSystemLoader(HERE / "templates"), autoescape=True,
                        undefined=StrictUndefined, trim_blocks=True, lstrip_blocks=True)
templates.filters["path"] = lambda value: quote(str(value), safe="")


# --------------------------------------------------------------------------- pages and errors


class PortalRoute(APIRoute):
    """A portal route answers in HTML, errors too: 401 is the login page, any other HTTP error a
    page saying what went wrong, with its status (404 reads the same for a project that does not
    exist as for one that is not the caller's: ``access.project_for`` words both alike)."""

    def get_route_handler(self) -> Callable[[Request], Awaitable[Response]]:
        handle = super().get_route_handler()

        async def portal_handler(request: Request) -> Response:
            try:
                return await handle(request)
            except StarletteHTTPException as exc:
                if exc.status_code == 401:
                    why = f"not signed in: {exc.detail}" if exc.detail else ""
                    return login_page(request, why, status=401, forget=True)
                return error_page(request, exc.status_code, str(exc.detail))
            except RequestValidationError as exc:
                return error_page(request, 422, validation_message(list(exc.errors())))

        return portal_handler


router = APIRouter(route_class=PortalRoute, include_in_schema=False)


def render(request: Request, template: str, *, status: int = 200, who: Caller | None = None,
           **context: Any) -> HTMLResponse:
    """A page, with the CSRF cookie its forms repeat (made here on a browser's first page)."""
    token = request.cookies.get(CSRF_COOKIE) or ""
    fresh = not _good_csrf_value(token)
    if fresh:
        token = secrets.token_urlsafe(32)
    body = templates.get_template(template).render(root=_root(request), who=who,
                                                   csrf=_session_bound(request) or token, **context)
    response = HTMLResponse(body, status_code=status, headers=PAGE_HEADERS)
    if fresh:
        _set_cookie(request, response, CSRF_COOKIE, token)
    return response


def _session_bound(request: Request) -> str:
    """With a session cookie, the CSRF token is derived from it: one who can plant a cookie (a
    sibling subdomain, the network) cannot make the token that goes with a session they do not
    hold. Without one (SSO, or before signing in), the double-submit cookie."""
    session = request.cookies.get(SESSION_COOKIE, "")
    return hmac.new(session.encode(), b"openacct-csrf", "sha256").hexdigest() if session else ""


def login_page(request: Request, error: str = "", *, status: int = 200, forget: bool = False) -> HTMLResponse:
    """The login form; with ``forget``, a session cookie that did not let the caller in is cleared."""
    back = _local(request.url.path, request) if request.method == "GET" else "/"
    response = render(request, "login.html", status=status, error=error, next=back)
    if status == 401:
        response.headers["WWW-Authenticate"] = 'Bearer realm="openacct"'
    if forget and request.cookies.get(SESSION_COOKIE) and not request.headers.get("authorization"):
        _clear_cookie(request, response, SESSION_COOKIE)
    return response


def error_page(request: Request, status: int, message: str) -> HTMLResponse:
    return render(request, "error.html", status=status, status_code=status, message=message)


def _root(request: Request) -> str:
    return str(request.scope.get("root_path", "")).rstrip("/")


def _local(path: str, request: Request) -> str:
    """A path of this site to go back to after logging in: nothing that leaves it."""
    root = _root(request)
    if path.startswith(root):
        path = path[len(root):]
    if not path.startswith("/") or path.startswith("//") or "\\" in path or path in ("/login", "/logout"):
        return "/"
    return path


def _secure(request: Request) -> bool:
    """Secure cookies everywhere but on this host's loopback (the tests, a developer): behind a
    TLS proxy the scheme the portal sees is http, and a session cookie holds a bearer token."""
    return request.url.scheme == "https" or request.url.hostname not in ("127.0.0.1", "localhost", "::1")


def _set_cookie(request: Request, response: Response, name: str, value: str) -> None:
    response.set_cookie(name, value, path=_root(request) or "/", httponly=True, samesite="strict",
                        secure=_secure(request))


def _clear_cookie(request: Request, response: Response, name: str) -> None:
    response.delete_cookie(name, path=_root(request) or "/", httponly=True, samesite="strict",
                           secure=_secure(request))


def _see_other(request: Request, path: str) -> RedirectResponse:
    return RedirectResponse(_root(request) + path, status_code=303, headers={"Cache-Control": "no-store"})


def portal_caller(request: Request, session: Database) -> Caller:
    """The caller, as the API sees them; none: 401, which PortalRoute answers with the login page."""
    found = caller_or_none(request, session)
    if found is None:
        raise HTTPException(401, "")
    return found


PortalCaller = Annotated[Caller, Depends(portal_caller)]


# --------------------------------------------------------------------------- forms and CSRF


async def form(request: Request) -> dict[str, str]:
    """A posted form's fields (the first value of each), refused before any check if it is not a
    small url-encoded form."""
    if request.headers.get("content-type", "").split(";")[0].strip() != "application/x-www-form-urlencoded":
        raise HTTPException(415, "send the form as application/x-www-form-urlencoded")
    body = await request.body()
    if len(body) > MAX_FORM:
        raise HTTPException(413, f"the form is larger than {MAX_FORM // 1024} KiB")
    try:
        fields = await request.form(max_files=0, max_fields=16)
    except Exception:  # python-multipart's and starlette's parse errors
        raise HTTPException(400, "the form could not be read") from None
    return {key: value for key, value in fields.items() if isinstance(value, str)}


Form = Annotated[dict[str, str], Depends(form)]


def _good_csrf_value(token: str) -> bool:
    return 32 <= len(token) <= 64 and token.replace("-", "").replace("_", "").isalnum()  # sha256 hex: 64


def check_csrf(request: Request, fields: dict[str, str]) -> None:
    """403 unless the form repeats the CSRF cookie, and the browser does not say another site
    sent it."""
    if request.headers.get("sec-fetch-site", "same-origin") not in ("same-origin", "none"):
        raise HTTPException(403, "a form of another site may not post here")
    cookie, given = _session_bound(request) or request.cookies.get(CSRF_COOKIE, ""), fields.get(CSRF_FIELD, "")
    if not (cookie and given and _good_csrf_value(cookie) and hmac.compare_digest(cookie, given)):
        raise HTTPException(403, "the form's security token is missing or out of date: reload the page and send it again")


# --------------------------------------------------------------------------- charts


@dataclass(frozen=True)
class Bar:
    x: float
    y: float
    width: float
    height: float
    fill: str
    title: str


@dataclass(frozen=True)
class Line:
    x1: float
    y1: float
    x2: float
    y2: float
    kind: str  # its CSS class: pace, today


@dataclass(frozen=True)
class Label:
    x: float
    y: float
    text: str
    anchor: str = "start"


@dataclass
class Chart:
    """An SVG chart as the templates draw it: every bar's real height, worked out here."""

    title: str
    width: int = 720
    height: int = 180
    bars: list[Bar] = field(default_factory=list)
    lines: list[Line] = field(default_factory=list)
    labels: list[Label] = field(default_factory=list)
    legend: list[tuple[str, str]] = field(default_factory=list)

    top_pad = 14
    bottom_pad = 18

    @property
    def plot_height(self) -> float:
        return self.height - self.top_pad - self.bottom_pad

    @property
    def base(self) -> float:
        return float(self.height - self.bottom_pad)

    def y(self, value: Decimal, top: Decimal) -> float:
        return self.base - self.plot_height * float(max(value, Decimal(0)) / top)


def _days(first: dt.date, last: dt.date) -> list[dt.date]:
    return [first + dt.timedelta(days=n) for n in range((last - first).days + 1)]


def _end_of(day: dt.date) -> dt.datetime:
    return dt.datetime.combine(day + dt.timedelta(days=1), dt.time(), UTC) - INSTANT


def _top(values: Iterable[Decimal]) -> Decimal:
    return max([v for v in values if v > 0] + [Decimal("0.000001")])


def burn_down_chart(first: dt.date, last: dt.date, today: dt.date, available: Callable[[dt.date], Decimal],
                    allocated: Decimal | None) -> Chart:
    """Bars of what was available at the end of each day (or run of days) from ``first`` to
    ``last``, up to today; with ``allocated``, the steady pace from it at the start to nothing at
    the end, as a dashed line."""
    chart = Chart("available money by day")
    days = _days(first, last)
    per = math.ceil(len(days) / BURN_DOWN_BARS)
    runs = [days[i:i + per] for i in range(0, len(days), per)]
    values = [available(min(run[-1], today)) if run[0] <= today else None for run in runs]
    top = _top([v for v in values if v is not None] + ([allocated] if allocated else []))
    step = chart.width / len(runs)
    for i, (run, value) in enumerate(zip(runs, values, strict=True)):
        if value is None:
            continue
        y = chart.y(value, top)
        when = f"{run[0]:%Y-%m-%d}" if len(run) == 1 else f"{run[0]:%Y-%m-%d} to {min(run[-1], today):%Y-%m-%d}"
        chart.bars.append(Bar(round(i * step + 1, 1), round(y, 1), round(max(step - 2, 1), 1),
                              round(chart.base - y, 1), BAR, f"{when}: {display(value)} available"))
    if allocated:
        chart.lines.append(Line(0, round(chart.y(allocated, top), 1), chart.width, chart.base, "pace"))
    if first <= today < last:
        x = round(((today - first).days + 1) / len(days) * chart.width, 1)
        chart.lines.append(Line(x, chart.top_pad, x, chart.base, "today"))
    chart.labels += [Label(2, 10, display(top)), Label(0, chart.height - 4, f"{first:%Y-%m-%d}"),
                     Label(chart.width, chart.height - 4, f"{last:%Y-%m-%d}", "end")]
    return chart


def stacked_chart(days: list[dt.date], amounts: dict[tuple[dt.date, str], Decimal], order: list[str],
                  title: str) -> Chart:
    """A bar a day, stacked by user (``order``: biggest first, each with its colour)."""
    chart = Chart(title)
    colour = {name: PALETTE[i % len(PALETTE)] for i, name in enumerate(order)}
    totals = {day: sum((max(amounts.get((day, name), Decimal(0)), Decimal(0)) for name in order), Decimal(0))
              for day in days}
    top = _top(totals.values())
    step = chart.width / max(len(days), 1)
    for i, day in enumerate(days):
        below = chart.base
        for name in order:
            value = amounts.get((day, name), Decimal(0))
            if value <= 0:
                continue
            height = chart.plot_height * float(value / top)
            chart.bars.append(Bar(round(i * step + 1, 1), round(below - height, 1), round(max(step - 2, 1), 1),
                                  round(height, 1), colour[name], f"{day:%Y-%m-%d} {name or '(no user)'}: {display(value)}"))
            below -= height
    if days:
        chart.labels += [Label(2, 10, display(top)), Label(0, chart.height - 4, f"{days[0]:%Y-%m-%d}"),
                         Label(chart.width, chart.height - 4, f"{days[-1]:%Y-%m-%d}", "end")]
    chart.legend = [(colour[name], name or "(no user)") for name in order]
    return chart


# --------------------------------------------------------------------------- what the pages show


@dataclass
class BurnDown:
    chart: Chart
    first: dt.date
    last: dt.date
    open_ended: bool  # an allocation in force has no end


def _in_force(allocation: Allocation, at: dt.datetime) -> bool:
    return allocation.starts_at <= at and (allocation.ends_at is None or allocation.ends_at > at)


def burn_down(session: Session, project: Project, now: dt.datetime) -> BurnDown | None:
    """What the project had available, day by day, over its allocation period: that of the
    allocations in force now (or, with none, of the one that ended last), from the first one's
    start to the last one's end; None for a project never funded."""
    allocations = list(session.scalars(select(Allocation).join(Account, Account.id == Allocation.account_id)
                                       .where(Account.project_id == project.id)))
    shown = [a for a in allocations if _in_force(a, now)]
    if not shown and allocations:
        shown = [max(allocations, key=lambda a: a.ends_at or now)]
    if not shown:
        return None
    open_ended = any(a.ends_at is None for a in shown)
    end = None if open_ended else max(a.ends_at for a in shown if a.ends_at is not None)
    today = now.astimezone(UTC).date()
    start = min(a.starts_at for a in shown).astimezone(UTC).date()
    last = today if end is None else (end - INSTANT).astimezone(UTC).date()
    first = max(start, last - dt.timedelta(days=BURN_DOWN_DAYS - 1))  # a long period: its last year
    # The steady pace that spends the allocations by their end, where the chart shows it all.
    pace = sum((a.amount for a in shown), Decimal(0)) if end is not None and first == start else None
    chart = burn_down_chart(first, last, today, _daily_available(session, project, allocations, now), pace)
    return BurnDown(chart, first, last, open_ended)


def _daily_available(session: Session, project: Project, allocations: list[Allocation],
                     now: dt.datetime) -> Callable[[dt.date], Decimal]:
    """What the project had available at the end of a day (or now, for today), read from the
    journal as a statement reads it: each allocation's entries up to then, while it is in force."""
    day = cast(func.timezone(literal_column("'UTC'"), LedgerEntry.effective_at), Date)
    rows = session.execute(
        select(LedgerEntry.allocation_id, day, func.sum(AVAILABLE_EFFECT))
        .join(Account, Account.id == LedgerEntry.account_id)
        .where(Account.project_id == project.id, LedgerEntry.effective_at <= now)
        .group_by(LedgerEntry.allocation_id, day)
        .order_by(day)
    )
    running: dict[int | None, list[tuple[dt.date, Decimal]]] = defaultdict(list)
    for allocation_id, on, amount in rows:
        so_far = running[allocation_id]
        so_far.append((on, (so_far[-1][1] if so_far else Decimal(0)) + amount))
    known = {a.id: a for a in allocations}

    def available(on: dt.date) -> Decimal:
        at = min(_end_of(on), now)
        return sum((next((amount for when, amount in reversed(days) if when <= on), Decimal(0))
                    for allocation_id, days in running.items()
                    if allocation_id is None or _in_force(known[allocation_id], at)), Decimal(0))

    return available


@dataclass
class Usage:
    first: dt.date
    last: dt.date
    chart: Chart
    by_user: list[dict[str, Any]]
    only_user: str | None


def usage(session: Session, who: Caller, project: Project, first: dt.date, last: dt.date) -> Usage:
    """Net charges per day and user over ``first`` to ``last``, as the API's usage endpoint
    counts them (every member's for those who see them all, else the caller's own), totalled by
    user and drawn as bars a day stacked by user."""
    found = views.usage(session, who, project, first, last, ["user", "day"])
    amounts: dict[tuple[dt.date, str], Decimal] = {}
    totals: dict[str, dict[str, Decimal]] = {}
    for row in found.rows:
        user, day = row.user or "", row.day
        assert day is not None
        amounts[(day, user)] = Decimal(row.net)
        total = totals.setdefault(user, dict.fromkeys(("jobs", "charged", "refunded", "net"), Decimal(0)))
        for key in total:
            total[key] += Decimal(getattr(row, key))
    by_user = sorted(({"user": user, **total} for user, total in totals.items()), key=lambda r: (-r["net"], r["user"]))
    order = [r["user"] for r in by_user]
    if len(order) > len(PALETTE):  # the smallest share the last colour, as "others"
        rest = set(order[len(PALETTE) - 1:])
        folded: dict[tuple[dt.date, str], Decimal] = defaultdict(Decimal)
        for (day, user), value in amounts.items():
            folded[(day, "others" if user in rest else user)] += value
        amounts, order = dict(folded), [*order[:len(PALETTE) - 1], "others"]
    chart = stacked_chart(_days(first, last), amounts, order, "net charges per day, by user")
    return Usage(first, last, chart, by_user, found.only_user)


def statement_months(today: dt.date, count: int = STATEMENT_MONTHS) -> list[str]:
    """This month and the ones before it, newest first: 2026-12, 2026-11, 2026-10."""
    months, year, month = [], today.year, today.month
    for _ in range(count):
        months.append(f"{year:04d}-{month:02d}")
        year, month = (year, month - 1) if month > 1 else (year - 1, 12)
    return months


def _money(value: Decimal | str) -> str:
    return display(Decimal(value))


def _elapsed(job: Any) -> str:
    if job.start_time is None or job.end_time is None:
        return ""
    minutes = int((job.end_time - job.start_time).total_seconds() // 60)
    return f"{minutes // 60}:{minutes % 60:02d}"


templates.filters["money"] = _money
templates.filters["elapsed"] = _elapsed


# --------------------------------------------------------------------------- routes


@router.get("/login")
def login_form(request: Request, session: Database) -> Response:
    if caller_or_none(request, session) is not None:
        return _see_other(request, "/")
    return login_page(request)


@router.post("/login")
def login(request: Request, session: Database, fields: Form) -> Response:
    """A pasted token, checked as the API checks it; the session cookie is the token itself."""
    check_csrf(request, fields)
    token = fields.get("token", "").strip()
    if not token:
        return login_page(request, "paste a token", status=401)
    try:
        by_token(session, token, "session")  # the API's own check: unknown, expired, revoked
    except StarletteHTTPException as refused:
        return login_page(request, f"that token does not let you in: {refused.detail}", status=401)
    response = _see_other(request, _local(fields.get("next", "/"), request))
    _set_cookie(request, response, SESSION_COOKIE, token)
    return response


@router.post("/logout")
def logout(request: Request, fields: Form) -> Response:
    check_csrf(request, fields)
    response = _see_other(request, "/login")
    _clear_cookie(request, response, SESSION_COOKIE)
    return response


@router.get("/")
def my_projects(request: Request, session: Database, who: PortalCaller) -> Response:
    now = ledger.now()
    charts = {p.name: burn_down(session, p, now) for p in access.visible_projects(session, who)}
    return render(request, "projects.html", who=who, projects=views.project_summaries(session, who), charts=charts)


@router.get("/projects/{name}")
def project_page(request: Request, name: str, session: Database, who: PortalCaller,
                 days: Annotated[int, Query(ge=7, le=BURN_DOWN_DAYS)] = 31,
                 added: str = "", removed: str = "") -> Response:
    return _project_page(request, session, who, name, days=days, added=added, removed=removed)


def _project_page(request: Request, session: Session, who: Caller, name: str, *, days: int = 31,
                  added: str = "", removed: str = "", error: str = "", status: int = 200) -> Response:
    project = access.project_for(session, who, name)
    now = ledger.now()
    today = now.astimezone(UTC).date()
    detail = views.project_detail(session, who, project)
    everyone = detail.you_see_every_member
    names = {m.user for m in detail.members}
    # What the last form did, said after its redirect: only what is so (no text from the URL).
    notice = (f"{added} is a member now." if added in names else
              f"{removed} is no longer a member." if NAME.fullmatch(removed) and removed not in names else "")
    return render(
        request, "project.html", status=status, who=who, project=detail, burn_down=burn_down(session, project, now),
        usage=usage(session, who, project, today - dt.timedelta(days=days - 1), today), days=days,
        jobs=views.recent_jobs(session, who, project, RECENT_JOBS), everyone=everyone,
        caps={limit.user: limit for limit in detail.limits},
        manages=detail.you_manage and who.scope == "manage",
        months=statement_months(today), formats=STATEMENT_FORMATS, notice=notice, error=error)


@router.post("/projects/{name}/members")
def add_member(request: Request, name: str, session: Database, who: PortalCaller, fields: Form) -> Response:
    return _change_membership(request, session, who, name, fields, added=True)


@router.post("/projects/{name}/members/remove")
def remove_member(request: Request, name: str, session: Database, who: PortalCaller, fields: Form) -> Response:
    return _change_membership(request, session, who, name, fields, added=False)


def _change_membership(request: Request, session: Session, who: Caller, name: str, fields: dict[str, str], *,
                       added: bool) -> Response:
    """The form's change, through the API's own endpoint code (access checks, the domain's
    shortcuts, the actor recorded), then back to the project's page; a refusal the caller can
    fix (no such user, already a member, the PI) is shown on that page."""
    check_csrf(request, fields)
    user = fields.get("user", "").strip()
    try:
        if added:
            outcome = Response(status_code=201)  # the endpoint makes it 200 for "already a member"
            routes.add_member_as(session, who, name, user, outcome)
            if outcome.status_code == 200:
                raise AlreadyExists(f"{user} is already a member of project {name}")
        else:
            routes.remove_member_as(session, who, name, user)
    except (OpenAcctError, StarletteHTTPException) as refused:
        if isinstance(refused, StarletteHTTPException) and refused.status_code != 422:
            raise  # 403 and 404 (not the caller's to change, or to see): the error page
        session.rollback()
        status = 409 if isinstance(refused, AlreadyExists) else 404 if isinstance(refused, NotFound) else 422
        message = refused.detail if isinstance(refused, StarletteHTTPException) else str(refused)
        return _project_page(request, session, who, name, error=str(message), status=status)
    what = "added" if added else "removed"
    return _see_other(request, f"/projects/{quote(name, safe='')}?{what}={quote(user, safe='')}")
