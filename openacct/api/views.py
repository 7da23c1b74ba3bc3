"""What the endpoints (and the portal's pages) show, read from the database for a caller who
may see it: ``access`` has decided that before these are called."""

from __future__ import annotations

import datetime as dt
from decimal import Decimal
from typing import Any

from sqlalchemy import ColumnElement, func, or_, select
from sqlalchemy.orm import Session, aliased

from openacct.api import schemas
from openacct.api.access import may_manage, sees_every_member, visible_jobs, visible_projects
from openacct.api.auth import Caller
from shared import ledger, member_limits
from shared.ledger import AVAILABLE_EFFECT, SIGNED_AMOUNT
from shared.member_limits import MemberUse
from shared.models import (
    Account,
    Allocation,
    Job,
    LedgerEntry,
    LedgerTransaction,
    Project,
    ProjectManager,
    ProjectMember,
    Service,
    ServiceGrant,
    System,
    User,
)
from shared.money import money_str


def _exact(value: Decimal | None) -> str | None:
    return None if value is None else f"{Decimal(value).normalize():f}"


def balance(session: Session, project: Project) -> schemas.Balance:
    return schemas.Balance(**{k: v for k, v in ledger.project_balance(session, project).as_dict().items()
                              if k != "name"})


def expires_at(session: Session, project: Project) -> dt.datetime | None:
    """When the allocation in force that ends last ends; None if none is in force or one never ends."""
    now = ledger.now()
    last, endless = session.execute(
        select(func.max(Allocation.ends_at), func.bool_or(Allocation.ends_at.is_(None)))
        .join(Account, Account.id == Allocation.account_id)
        .where(Account.project_id == project.id, Allocation.starts_at <= now,
               or_(Allocation.ends_at.is_(None), Allocation.ends_at > now))).one()
    return None if endless else last


def member_limit(use: MemberUse) -> schemas.MemberLimit:
    return schemas.MemberLimit(**use.as_dict())


def member_caps(session: Session, caller: Caller, project: Project) -> list[schemas.MemberLimit]:
    """The members' spending limits in ``project`` the caller may see: every capped member's for
    the PI, the managers and administrators, else the caller's own."""
    only = None if sees_every_member(session, caller, project) else caller.user_id
    return [member_limit(use) for use in member_limits.uses(session, project, user_id=only)]


def project_summaries(session: Session, caller: Caller) -> list[schemas.ProjectSummary]:
    mine = {use.project: member_limit(use) for use in member_limits.uses(session, user_id=caller.user_id)}
    return [schemas.ProjectSummary(name=p.name, pi=p.pi.name, expires_at=expires_at(session, p),
                                   my_limit=mine.get(p.name), **balance(session, p).model_dump())
            for p in visible_projects(session, caller)]


def me(session: Session, caller: Caller) -> schemas.Me:
    user = session.get_one(User, caller.user_id)
    return schemas.Me(user=user.name, full_name=user.full_name, email=user.email, admin=caller.admin,
                      scope=caller.scope, via=caller.via,
                      projects=[p.name for p in visible_projects(session, caller)])


def project_detail(session: Session, caller: Caller, project: Project) -> schemas.ProjectDetail:
    managers = set(session.scalars(select(ProjectManager.user_id).where(ProjectManager.project_id == project.id)))
    members = [schemas.Member(user=u.name, full_name=u.full_name, pi=u.id == project.pi_id, manager=u.id in managers)
               for u in session.scalars(select(User).join(ProjectMember, ProjectMember.user_id == User.id)
                                        .where(ProjectMember.project_id == project.id).order_by(User.name))]
    accounts = []
    for account in project.accounts:
        services = session.scalars(
            select(Service.name).join(ServiceGrant, ServiceGrant.service_id == Service.id)
            .where(ServiceGrant.account_id == account.id, ServiceGrant.revoked_at.is_(None)).order_by(Service.name))
        accounts.append(schemas.AccountOut(name=account.name, default=account.is_default, active=account.active,
                                           expires_at=account.expires_at, services=list(services)))
    now = ledger.now()
    allocations = [
        schemas.AllocationOut(id=a.id, account=name, amount=money_str(a.amount), credit_limit=money_str(a.credit_limit),
                              starts_at=a.starts_at, ends_at=a.ends_at,
                              in_force=a.starts_at <= now and (a.ends_at is None or a.ends_at > now))
        for a, name in session.execute(
            select(Allocation, Account.name).join(Account, Account.id == Allocation.account_id)
            .where(Account.project_id == project.id).order_by(Allocation.starts_at, Allocation.id))]
    return schemas.ProjectDetail(
        name=project.name, pi=project.pi.name, description=project.description, active=project.active,
        members=members, managers=sorted(m.user for m in members if m.manager), accounts=accounts,
        allocations=allocations, balance=balance(session, project), expires_at=expires_at(session, project),
        limits=member_caps(session, caller, project),
        you_manage=may_manage(session, caller, project),
        you_see_every_member=sees_every_member(session, caller, project))


# ----------------------------------------------------------------------------------------- jobs

_COSTS = ("charge", "refund", "adjustment")


def _of_job(job_id: Any) -> ColumnElement[bool]:
    """The job's transactions: those naming it, and those referring to one that does (a refund,
    a re-rating and a release carry their charge's or hold's job only through it)."""
    named = aliased(LedgerTransaction)
    return or_(LedgerTransaction.job_id == job_id,
               LedgerTransaction.refers_to_id.in_(select(named.id).where(named.job_id == job_id)))


# What a job cost: its charges, less refunds, re-rated (positive; holds are not costs).
_COST = (
    select(-func.coalesce(func.sum(AVAILABLE_EFFECT), 0))
    .select_from(LedgerEntry)
    .join(LedgerTransaction, LedgerTransaction.id == LedgerEntry.transaction_id)
    .where(LedgerEntry.account_id == LedgerTransaction.account_id, LedgerTransaction.kind.in_(_COSTS),
           _of_job(Job.id))
    .correlate(Job)
    .scalar_subquery()
)


def _jobs(session: Session, condition: ColumnElement[bool], limit: int) -> list[tuple[Any, ...]]:
    owner, team = aliased(User), aliased(Project)
    return list(session.execute(
        select(Job, System.name, owner.name, Account.name, team.name, _COST)
        .join(System, System.id == Job.system_id)
        .outerjoin(owner, owner.id == Job.user_id)
        .outerjoin(Account, Account.id == Job.account_id)
        .outerjoin(team, team.id == Account.project_id)
        .where(condition)
        .order_by(Job.id.desc())
        .limit(limit)))


def _summary(job: Job, system: str, user: str | None, account: str | None, project: str | None,
             cost: Decimal) -> dict[str, Any]:
    return dict(system=system, job_id=job.job_id, array_job_id=job.array_job_id, array_task_id=job.array_task_id,
                het_offset=job.het_offset, user=user, account=account, project=project, partition=job.partition,
                qos=job.qos, state=job.state, submit_time=job.submit_time, start_time=job.start_time,
                end_time=job.end_time, cpus=job.cpus, gpus=job.gpus, node_count=job.node_count,
                time_limit_minutes=job.time_limit_minutes, cost=money_str(cost))


def recent_jobs(session: Session, caller: Caller, project: Project | None, limit: int) -> list[schemas.JobSummary]:
    return [schemas.JobSummary(**_summary(*row))
            for row in _jobs(session, visible_jobs(session, caller, project), limit)]


def job_details(session: Session, caller: Caller, job_id: str, system: str | None) -> list[schemas.JobDetail]:
    """Every record of the scheduler's job id the caller may see, newest first (schedulers reuse ids;
    a heterogeneous job has one per component)."""
    condition = visible_jobs(session, caller) & (Job.job_id == job_id)
    if system is not None:
        condition = condition & (System.name == system)
    found = []
    for job, *rest in _jobs(session, condition, 100):
        transactions = [
            schemas.TransactionOut(id=t.id, kind=t.kind, amount=money_str(amount), service=service,
                                   quantity=_exact(t.quantity), rate=_exact(t.rate), effective_at=t.effective_at,
                                   description=t.description, details=t.details or {})
            for t, amount, service in session.execute(
                select(LedgerTransaction, SIGNED_AMOUNT, Service.name)
                .outerjoin(Service, Service.id == LedgerTransaction.service_id)
                .where(_of_job(job.id)).order_by(LedgerTransaction.id))]
        found.append(schemas.JobDetail(**_summary(job, *rest), exit_code=job.exit_code, memory_mb=job.memory_mb,
                                       node_list=job.node_list, charge_policy=job.charge_policy,
                                       transactions=transactions))
    return found


# ---------------------------------------------------------------------------- usage, quotes

USAGE_BY = ("user", "month", "day", "account", "service", "system")


def usage(session: Session, caller: Caller, project: Project, first: dt.date, last: dt.date,
          by: list[str]) -> schemas.Usage:
    """The project's usage, every member's for those who see them all, else the caller's own."""
    from services.reporter.usage import report

    only = None if sees_every_member(session, caller, project) else caller
    rows = report(session, first, last, by, project_id=project.id, user_id=only.user_id if only else None)
    return schemas.Usage(
        project=project.name, first=first, last=last, by=by, only_user=only.user if only else None,
        rows=[schemas.UsageRow(**{k: money_str(v) if k in ("charged", "refunded", "net") else
                                  _exact(v) if k == "quantity" else v for k, v in row.items()}) for row in rows])


def quote(session: Session, account: Account, request: schemas.QuoteIn, system: str) -> schemas.Quote:
    from shared.rating.quote import quote as price

    found = price(session, system, account.name, minutes=request.minutes, cpus=request.cpus, gpus=request.gpus,
                  nodes=request.nodes, partition=request.partition, qos=request.qos)
    return schemas.Quote(
        account=found.account, system=system, minutes=request.minutes, total=money_str(found.total),
        available=money_str(found.available), credit_limit=money_str(found.credit_limit),
        affordable=found.affordable,
        lines=[schemas.QuoteLine(resource=line.resource, service=line.service, count=line.count,
                                 hours=_exact(line.hours) or "0", quantity=_exact(line.quantity) or "0",
                                 rate=_exact(line.rate) or "0", multiplier=_exact(line.multiplier) or "0",
                                 cost=money_str(line.cost)) for line in found.lines])
