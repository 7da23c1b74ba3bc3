"""The JSON API, v1. Each endpoint asks ``auth`` who calls and ``access`` what they may see or
do, reads through ``views`` and writes through the domain code (``openacct.shortcuts``) in the
request's session, committed once the endpoint returns."""

from __future__ import annotations

import datetime as dt
from collections.abc import Callable
from typing import Annotated, Literal

from fastapi import APIRouter, Body, HTTPException, Path, Query, Response
from sqlalchemy import select
from sqlalchemy.orm import Session

from openacct import shortcuts
from openacct.api import access, schemas, views
from openacct.api.auth import Caller, CurrentCaller
from openacct.api.database import Database
from shared import member_limits
from shared.config import get_settings
from shared.db import as_current
from shared.errors import AlreadyExists, InvalidInput
from shared.events import NAME
from shared.models import Project, ProjectManager, User

ERRORS: dict[int | str, dict[str, object]] = {
    status: {"model": schemas.Error, "description": what} for status, what in (
        (401, "No credentials, or ones that prove nobody (unknown, expired or revoked token)"),
        (403, "Not the caller's to do (a member who does not manage the project; a read-only token)"),
        (404, "No such project, account or job that the caller can see (the two are never told apart)"),
        (413, "A request body over 64 KiB"),
        (422, "A malformed name, parameter or body; the message names the field"),
        (503, "A MUNGE credential this server cannot check now (munged down or not installed here)"),
    )}
router = APIRouter(prefix="/api/v1", responses=ERRORS)

ProjectName = Annotated[str, Path(max_length=200, description="The project's name.")]
UserName = Annotated[str, Path(max_length=200, description="A user name.")]


def _user(session: Session, name: str) -> User:
    """A user named in a request: 422 for a bad or unknown name (the request is wrong, not the URL)."""
    found = session.scalar(select(User).where(User.name == name)) if NAME.fullmatch(name) else None
    if found is None:
        raise HTTPException(422, f"user: no user named {name}" if NAME.fullmatch(name) else
                            "user: not a valid user name")
    return found


@router.get("/me", response_model=schemas.Me)
def me(session: Database, caller: CurrentCaller) -> schemas.Me:
    """Who the credentials prove, and the projects they see."""
    return views.me(session, caller)


@router.get("/projects", response_model=list[schemas.ProjectSummary])
def projects(session: Database, caller: CurrentCaller) -> list[schemas.ProjectSummary]:
    """The caller's projects (an administrator's: all), with their balances and when they expire."""
    return views.project_summaries(session, caller)


@router.get("/projects/{name}", response_model=schemas.ProjectDetail)
def project(session: Database, caller: CurrentCaller, name: ProjectName) -> schemas.ProjectDetail:
    """A project's members, managers, accounts, allocations and balance."""
    return views.project_detail(session, caller, access.project_for(session, caller, name))


@router.get("/projects/{name}/usage", response_model=schemas.Usage)
def usage(
    session: Database, caller: CurrentCaller, name: ProjectName,
    by: Annotated[str, Query(max_length=100, description=f"Comma-separated, of {', '.join(views.USAGE_BY)}.")]
    = "user",
    first: Annotated[dt.date | None, Query(alias="from", description="First day (default: twelve months ago, "
                                                                     "from the first).")] = None,
    last: Annotated[dt.date | None, Query(alias="to", description="Last day (default: today).")] = None,
) -> schemas.Usage:
    """Use by member, month, …; a member who does not manage the project sees their own only."""
    found = access.project_for(session, caller, name)
    dimensions = [b.strip() for b in by.split(",") if b.strip()]
    unknown = [b for b in dimensions if b not in views.USAGE_BY]
    if unknown or not dimensions or len(set(dimensions)) != len(dimensions):
        raise HTTPException(422, f"by: one or more of {', '.join(views.USAGE_BY)}, each once")
    last = last or dt.datetime.now(dt.UTC).date()
    if not (EARLIEST <= last <= LATEST and (first is None or EARLIEST <= first <= LATEST)):
        raise HTTPException(422, f"from, to: days from {EARLIEST} to {LATEST}")
    first = first or _twelve_months_to(last)
    if last < first or (last - first).days > 3660:
        raise HTTPException(422, "from: the period runs from a day to a later one, ten years at most")
    return views.usage(session, caller, found, first, last, dimensions)


# Days a usage report may name: far enough for any ledger, near enough that date arithmetic on
# them (a year back, a month on) never leaves what Python's dates can hold.
EARLIEST, LATEST = dt.date(1970, 1, 1), dt.date(2200, 12, 31)


def _twelve_months_to(day: dt.date) -> dt.date:
    """The first day of the month eleven months before ``day``'s: a year of months, this one last."""
    months = day.year * 12 + day.month - 1 - 11
    return dt.date(months // 12, months % 12 + 1, 1)


@router.get("/projects/{name}/statement", response_class=Response,
            responses={200: {"content": {"application/json": {}, "text/csv": {}, "text/html": {}}}})
def statement(
    session: Database, caller: CurrentCaller, name: ProjectName,
    period: Annotated[str, Query(pattern=r"^\d{4}-\d{2}$", description="A month: 2026-10.")],
    format: Annotated[Literal["json", "csv", "html"], Query()] = "json",
) -> Response:
    """The month's statement. Its lines name every member's jobs: a member who does not manage
    the project gets the totals only."""
    from services.reporter import render
    from services.reporter.statements import month, statements

    found = access.project_for(session, caller, name)
    try:
        start, end = month(period)
    except ValueError as exc:
        raise HTTPException(422, f"period: {exc}") from None
    (drawn,) = statements(session, start, end, [found.name],
                          itemized=access.sees_every_member(session, caller, found))
    if format == "csv":
        return Response(render.to_csv(drawn), media_type="text/csv; charset=utf-8", headers={
            "Content-Disposition": f'attachment; filename="{found.name}-{period}.csv"'})
    if format == "html":
        return Response(render.to_html(drawn), media_type="text/html; charset=utf-8")
    return Response(render.to_json(drawn), media_type="application/json")


@router.get("/jobs", response_model=list[schemas.JobSummary])
def jobs(
    session: Database, caller: CurrentCaller,
    project: Annotated[str | None, Query(max_length=200, description="This project's jobs only.")] = None,
    limit: Annotated[int, Query(ge=1, le=500)] = 50,
) -> list[schemas.JobSummary]:
    """Recent jobs with what they cost, newest first: the caller's own, and every job of the
    projects they lead or manage."""
    found = access.project_for(session, caller, project) if project is not None else None
    return views.recent_jobs(session, caller, found, limit)


@router.get("/jobs/{job_id}", response_model=list[schemas.JobDetail])
def job(
    session: Database, caller: CurrentCaller,
    job_id: Annotated[str, Path(max_length=200, description="The scheduler's job id.")],
    system: Annotated[str | None, Query(max_length=200, description="Only this system's job.")] = None,
) -> list[schemas.JobDetail]:
    """Every record of a job id the caller may see (schedulers reuse ids), with each transaction
    it caused and why."""
    if not NAME.fullmatch(job_id) or (system is not None and not NAME.fullmatch(system)):
        raise HTTPException(422, "job_id: not a valid job id" if not NAME.fullmatch(job_id) else
                            "system: not a valid system name")
    found = views.job_details(session, caller, job_id, system)
    if not found:
        raise HTTPException(404, f"no job {job_id} that you can see")
    return found


# ------------------------------------------------------------------------------- membership


def _create(session: Session, response: Response, make: Callable[[], object]) -> None:
    """Through the domain code, in the request's session: 201, or 200 where it was there already."""
    with as_current(session):
        try:
            make()
        except AlreadyExists:
            response.status_code = 200


def add_member_as(session: Session, caller: Caller, name: str, user: str, response: Response) -> schemas.Membership:
    """Add ``user`` to project ``name`` as ``caller`` may (the endpoint's and the portal form's
    code): 201 on ``response``, 200 where they were a member already."""
    found = access.project_for(session, caller, name)
    access.require_manage(session, caller, found)
    member = _user(session, user)
    _create(session, response, lambda: shortcuts.add_user_to_project(member, found, actor=f"api:{caller.user}"))
    return schemas.Membership(project=found.name, user=member.name, member=True)


def remove_member_as(session: Session, caller: Caller, name: str, user: str) -> schemas.Membership:
    """Remove ``user`` from project ``name`` as ``caller`` may (the endpoint's and the form's code)."""
    found = access.project_for(session, caller, name)
    access.require_manage(session, caller, found)
    member = _user(session, user)
    if session.get(ProjectManager, (found.id, member.id)) is not None:
        # removing a member removes them as manager too: the PI's to decide, as naming them was
        _require_pi(session, caller, found, "removes one of its managers")
    with as_current(session):
        shortcuts.remove_user_from_project(member, found, actor=f"api:{caller.user}")
    return schemas.Membership(project=found.name, user=member.name, member=False)


@router.post("/projects/{name}/members", status_code=201, response_model=schemas.Membership,
             responses={200: {"model": schemas.Membership, "description": "Already a member"}})
def add_member(session: Database, caller: CurrentCaller, name: ProjectName, body: schemas.UserIn,
               response: Response) -> schemas.Membership:
    """Add a user to the project: the PI, a manager, or an administrator, with a manage scope."""
    return add_member_as(session, caller, name, body.user, response)


@router.delete("/projects/{name}/members/{user}", response_model=schemas.Membership)
def remove_member(session: Database, caller: CurrentCaller, name: ProjectName, user: UserName) -> schemas.Membership:
    """Remove a member (not the PI). A manager who leaves stops managing."""
    return remove_member_as(session, caller, name, user)


@router.delete("/projects/{name}/members", response_model=schemas.Membership)
def remove_member_named_in_body(session: Database, caller: CurrentCaller, name: ProjectName,
                                body: Annotated[schemas.UserIn, Body()]) -> schemas.Membership:
    """The same, with the user in the body: ``{"user": NAME}``."""
    return remove_member_as(session, caller, name, body.user)


def _require_pi(session: Session, caller: Caller, project: Project, what: str) -> None:
    """What only the PI (or an administrator) does, with a manage scope: name managers (a
    manager may not name another), set spending limits (a manager may not raise their own)."""
    if not (caller.admin or project.pi_id == caller.user_id):
        raise HTTPException(403, f"only the PI of project {project.name} or an administrator {what}")
    access.require_manage(session, caller, project)  # and not with a read token


@router.post("/projects/{name}/managers", status_code=201, response_model=schemas.Management,
             responses={200: {"model": schemas.Management, "description": "Already a manager"}})
def add_manager(session: Database, caller: CurrentCaller, name: ProjectName, body: schemas.UserIn,
                response: Response) -> schemas.Management:
    """Let a member manage the project's membership with the PI: the PI or an administrator."""
    found = access.project_for(session, caller, name)
    _require_pi(session, caller, found, "names its managers")
    member = _user(session, body.user)
    _create(session, response, lambda: shortcuts.add_project_manager(member, found, actor=f"api:{caller.user}"))
    return schemas.Management(project=found.name, user=member.name, manager=True)


@router.delete("/projects/{name}/managers/{user}", response_model=schemas.Management)
def remove_manager(session: Database, caller: CurrentCaller, name: ProjectName, user: UserName) -> schemas.Management:
    """Stop a member managing the project (they stay a member)."""
    found = access.project_for(session, caller, name)
    _require_pi(session, caller, found, "names its managers")
    member = _user(session, user)
    with as_current(session):
        shortcuts.remove_project_manager(member, found)
    return schemas.Management(project=found.name, user=member.name, manager=False)


# ------------------------------------------------------------------------ per-member limits


def _limited(session: Session, caller: Caller, name: str, user: str) -> Project:
    """The project, for its PI or an administrator; ``user`` a valid name (whether they exist
    and are members, ``member_limits`` says in one 404 for both)."""
    found = access.project_for(session, caller, name)
    _require_pi(session, caller, found, "sets its members' spending limits")
    if not NAME.fullmatch(user):
        raise HTTPException(422, "user: not a valid user name")
    return found


@router.put("/projects/{name}/limits/{user}", response_model=schemas.MemberLimit)
def set_limit(session: Database, caller: CurrentCaller, name: ProjectName, user: UserName,
              body: schemas.LimitIn) -> schemas.MemberLimit:
    """Cap what a member may spend in the project per period, replacing any cap they had;
    admission control refuses their job that would pass it. The PI or an administrator."""
    found = _limited(session, caller, name, user)
    try:
        use = member_limits.set_limit(session, found, user, body.cap, body.period, actor=f"api:{caller.user}")
    except InvalidInput as exc:  # the cap's amount: the one thing of the body pydantic leaves to the rule
        raise HTTPException(422, f"cap: {exc}") from None
    return views.member_limit(use)


@router.delete("/projects/{name}/limits/{user}", response_model=schemas.LimitCleared)
def clear_limit(session: Database, caller: CurrentCaller, name: ProjectName, user: UserName) -> schemas.LimitCleared:
    """Take a member's cap away: they may spend what the project has. 404 if they had none."""
    found = _limited(session, caller, name, user)
    member_limits.clear_limit(session, found, user)
    return schemas.LimitCleared(project=found.name, user=user, limited=False)


# ----------------------------------------------------------------------------------- quotes


@router.post("/quotes", response_model=schemas.Quote)
def quote(session: Database, caller: CurrentCaller, body: schemas.QuoteIn) -> schemas.Quote:
    """The most a job would cost on an account of the caller's, and whether it can pay that now.
    A question, not a write: a read scope suffices."""
    from shared.rating.directory import Unresolved

    account = access.account_for(session, caller, body.account)
    system = body.system or get_settings().default_system
    if system is None:
        raise HTTPException(422, "system: name the system (the server has no default_system)")
    try:
        return views.quote(session, account, body, system)
    except Unresolved as exc:
        raise HTTPException(422, str(exc)) from None

