"""Modelling the center: systems, services and rates, users, projects, members, grants, accounts."""

from __future__ import annotations

import datetime as dt
from decimal import Decimal
from typing import Annotated

import typer
from sqlalchemy import select
from sqlalchemy.orm import Session

from openacct import shortcuts as sc
from openacct.cli.output import NEGATIVE_AMOUNTS, JsonFlag, done, emit_record, emit_rows
from shared import ledger
from shared.db import session_scope
from shared.errors import NotFound
from shared.models import (
    Account,
    MembershipEvent,
    Project,
    ProjectMember,
    Service,
    ServiceGrant,
    ServiceRate,
    System,
    User,
)
from shared.rating.price import rate_at

Description = Annotated[str, typer.Option("--description", "-d", help="Free text.")]

system_app = typer.Typer(help="Clusters and other systems that offer services.", no_args_is_help=True)
service_app = typer.Typer(help="Services (core-hours, GPU-hours, storage) and their rates.", no_args_is_help=True)
user_app = typer.Typer(help="People who use the center.", no_args_is_help=True)
project_app = typer.Typer(help="Projects, led by a PI, holding accounts.", no_args_is_help=True)
member_app = typer.Typer(help="Project membership.", no_args_is_help=True)
account_app = typer.Typer(help="Accounts: what pays for use.", no_args_is_help=True)


@system_app.command("add")
def system_add(name: str, description: Description = "") -> None:
    """Add a system."""
    with session_scope():
        sc.create_system(name, description=description)
    done(f"system {name} added")


@system_app.command("list")
def system_list(as_json: JsonFlag = False) -> None:
    """List systems."""
    with session_scope() as s:
        rows = [{"name": x.name, "description": x.description, "created_at": x.created_at}
                for x in s.scalars(select(System).order_by(System.name))]
    emit_rows(rows, ["name", "description", "created_at"], as_json=as_json)


@service_app.command("add")
def service_add(
    name: str,
    system: Annotated[str, typer.Option(help="System offering the service.")],
    units: Annotated[str, typer.Option(help="Unit of use, such as core-hours.")],
    rate: Annotated[str, typer.Option(help="Charge per unit, such as 0.05.")],
    effective_from: Annotated[str | None, typer.Option("--from", help="Date the rate starts (default: always).")] = None,
    description: Description = "",
) -> None:
    """Add a service with its charge rate."""
    with session_scope():
        sc.create_service(name, system=system, units=units, charge_rate=rate,
                          description=description, effective_from=effective_from)
    done(f"service {name} added to {system} at {rate} per {units}")


@service_app.command("list")
def service_list(
    system: Annotated[str | None, typer.Option(help="Only this system's services.")] = None,
    as_json: JsonFlag = False,
) -> None:
    """List services with the rate in effect now."""
    with session_scope() as s:
        query = select(Service).join(System).order_by(System.name, Service.name)
        if system is not None:
            query = query.where(Service.system_id == sc.get_system(system).id)
        now = ledger.now()
        rows = [{"system": x.system.name, "name": x.name, "units": x.units,
                 "rate": _rate_or_none(s, x, now), "description": x.description}
                for x in s.scalars(query)]
    emit_rows(rows, ["system", "name", "units", "rate", "description"], as_json=as_json)


def _rate_or_none(session: Session, service: Service, at: dt.datetime) -> Decimal | None:
    """The rate in effect at ``at``; None for a service whose first rate starts later."""
    try:
        return rate_at(session, service.id, at, service.name)
    except NotFound:
        return None


@service_app.command("rate", context_settings=NEGATIVE_AMOUNTS)
def service_rate(
    service: Annotated[str, typer.Argument(help="Service name, or SYSTEM/NAME.")],
    rate: Annotated[str | None, typer.Argument(help="New charge per unit; omit to show the history.")] = None,
    effective_from: Annotated[str | None, typer.Option("--from", help="Date the new rate starts.")] = None,
    as_json: JsonFlag = False,
) -> None:
    """Set a new rate effective from a date, or show a service's rate history."""
    with session_scope() as s:
        if rate is not None:
            if effective_from is None:
                raise typer.BadParameter("a new rate needs --from DATE", param_hint="--from")
            row = sc.set_service_rate(service, rate, effective_from=effective_from)
            done(f"service {service} costs {rate} per unit from {row.effective_from.isoformat()}")
            return
        target = sc.get_service(service)
        rows = [{"effective_from": r.effective_from, "rate": r.rate}
                for r in s.scalars(select(ServiceRate).where(ServiceRate.service_id == target.id)
                                   .order_by(ServiceRate.effective_from))]
    emit_rows(rows, ["effective_from", "rate"], as_json=as_json, title=f"rates of {service}")


@user_app.command("add")
def user_add(
    name: str,
    full_name: Annotated[str, typer.Option(help="Full name.")] = "",
    email: Annotated[str, typer.Option(help="Email address for statements and alerts.")] = "",
) -> None:
    """Add a user."""
    with session_scope():
        sc.create_user(name, full_name=full_name, email=email)
    done(f"user {name} added")


@user_app.command("list")
def user_list(as_json: JsonFlag = False) -> None:
    """List users."""
    with session_scope() as s:
        rows = [{"name": u.name, "full_name": u.full_name, "email": u.email, "active": u.active}
                for u in s.scalars(select(User).order_by(User.name))]
    emit_rows(rows, ["name", "full_name", "email", "active"], as_json=as_json)


@project_app.command("add")
def project_add(
    name: str,
    pi: Annotated[str, typer.Option(help="User who leads the project.")],
    description: Description = "",
    parent: Annotated[str | None, typer.Option(help="Parent project.")] = None,
) -> None:
    """Add a project; its PI becomes a member and it gets a default account of the same name."""
    with session_scope():
        sc.create_project(name, pi=pi, description=description, parent=parent)
    done(f"project {name} added, led by {pi}, with account {name}")


@project_app.command("list")
def project_list(as_json: JsonFlag = False) -> None:
    """List projects."""
    with session_scope() as s:
        rows = [{"name": p.name, "pi": p.pi.name, "parent": p.parent.name if p.parent else None,
                 "active": p.active, "description": p.description}
                for p in s.scalars(select(Project).order_by(Project.name))]
    emit_rows(rows, ["name", "pi", "parent", "active", "description"], as_json=as_json)


@project_app.command("show")
def project_show(name: str, as_json: JsonFlag = False) -> None:
    """A project: PI, members, accounts with their grants, balance and membership history."""
    with session_scope() as s:
        project = sc.get_project(name)
        members = s.scalars(select(User.name).join(ProjectMember, ProjectMember.user_id == User.id)
                            .where(ProjectMember.project_id == project.id).order_by(User.name)).all()
        accounts = []
        for account in project.accounts:
            services = s.scalars(
                select(Service.name).join(ServiceGrant, ServiceGrant.service_id == Service.id)
                .where(ServiceGrant.account_id == account.id, ServiceGrant.revoked_at.is_(None))
                .order_by(Service.name)).all()
            accounts.append({"name": account.name, "default": account.is_default,
                             "active": account.active, "expires_at": account.expires_at,
                             "services": list(services)})
        history = [{"at": at, "event": kind, "user": user}
                   for at, kind, user in s.execute(
                       select(MembershipEvent.at, MembershipEvent.kind, User.name)
                       .join(User, User.id == MembershipEvent.user_id)
                       .where(MembershipEvent.project_id == project.id)
                       .order_by(MembershipEvent.id))]
        record = {"name": project.name, "pi": project.pi.name, "description": project.description,
                  "active": project.active, "parent": project.parent.name if project.parent else None,
                  "members": list(members), "accounts": accounts,
                  "balance": ledger.project_balance(s, project).amounts(),
                  "membership_history": history}
    if as_json:
        emit_record(record, as_json=True)
        return
    emit_record({**record, "members": ", ".join(members)}, as_json=False, title=f"project {name}")
    emit_rows([{**a, "services": ", ".join(a["services"])} for a in accounts],
              ["name", "default", "active", "expires_at", "services"], as_json=False, title="accounts")
    emit_rows([record["balance"]], ["allocated", "charged", "refunded", "held", "available", "credit_limit"],
              as_json=False, title="balance")


@member_app.command("add")
def member_add(project: str, users: Annotated[list[str], typer.Argument(help="User names.")]) -> None:
    """Add users to a project."""
    with session_scope():
        for user in users:
            sc.add_user_to_project(user, project)
    done(f"added {', '.join(users)} to {project}")


@member_app.command("remove")
def member_remove(project: str, users: Annotated[list[str], typer.Argument(help="User names.")]) -> None:
    """Remove users from a project (its PI cannot be removed)."""
    with session_scope():
        for user in users:
            sc.remove_user_from_project(user, project)
    done(f"removed {', '.join(users)} from {project}")


ProjectOpt = Annotated[str | None, typer.Option(help="Every active account of this project.")]
AccountOpt = Annotated[str | None, typer.Option(help="This account only.")]


def _one_target(project: str | None, account: str | None) -> None:
    if (project is None) == (account is None):
        raise typer.BadParameter("name exactly one of --project or --account")


def grant(service: str, project: ProjectOpt = None, account: AccountOpt = None) -> None:
    """Let a project's accounts (or one account) use a service."""
    _one_target(project, account)
    with session_scope():
        grants = sc.grant_service_access(service, project, account=account)
    done(f"granted {service} to {project or account} ({len(grants)} new grant(s))")


def revoke(service: str, project: ProjectOpt = None, account: AccountOpt = None) -> None:
    """Stop a project's accounts (or one account) using a service."""
    _one_target(project, account)
    with session_scope():
        count = sc.revoke_service_access(service, project, account=account)
    done(f"revoked {service} from {project or account} ({count} grant(s))")


@account_app.command("add")
def account_add(
    name: str,
    project: Annotated[str, typer.Option(help="Project the account belongs to.")],
    expires: Annotated[str | None, typer.Option(help="Date the account expires.")] = None,
    description: Description = "",
) -> None:
    """Add another account to a project."""
    with session_scope():
        sc.create_account(name, project=project, expires_at=expires, description=description)
    done(f"account {name} added to {project}")


@account_app.command("list")
def account_list(
    project: Annotated[str | None, typer.Option(help="Only this project's accounts.")] = None,
    as_json: JsonFlag = False,
) -> None:
    """List accounts with their balances."""
    with session_scope() as s:
        query = select(Account).join(Project).order_by(Project.name, Account.name)
        if project is not None:
            query = query.where(Account.project_id == sc.get_project(project).id)
        rows = []
        for account in s.scalars(query):
            balance = ledger.account_balance(s, account)
            rows.append({"name": account.name, "project": account.project.name,
                         "default": account.is_default, "active": account.active,
                         "expires_at": account.expires_at, "available": balance.available})
    emit_rows(rows, ["name", "project", "default", "active", "expires_at", "available"], as_json=as_json)


# A PI's managers are named with the project's commands; their own module is the API's.
from openacct.cli.api import manager_app  # noqa: E402 - after project_app, which it joins

project_app.add_typer(manager_app, name="manager")
