"""Modelling the center: systems, services and rates, users, projects, members, grants, accounts."""

from __future__ import annotations

import datetime as dt
from decimal import Decimal
from typing import TYPE_CHECKING, Annotated

import typer
from sqlalchemy import select
from sqlalchemy.orm import Session

from openacct import shortcuts as sc
from openacct.cli.output import NEGATIVE_AMOUNTS, JsonFlag, done, emit_record, emit_rows
from shared import ledger
from shared.db import session_scope
from shared.errors import InvalidInput, NotFound
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

if TYPE_CHECKING:
    from shared.slurm.reconcile import Reconciliation

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


slurm_app = typer.Typer(help="Keep Slurm in step with OpenAcct.", no_args_is_help=True)


@slurm_app.command("sync")
def slurm_sync(
    cluster: Annotated[str | None, typer.Option(help="Slurm cluster name (default: the configured default_system).")] = None,
    dry_run: Annotated[bool, typer.Option(help="Print the sacctmgr commands; run none.")] = False,
) -> None:
    """Add the Slurm accounts and user associations OpenAcct's projects and members need, and
    remove associations of members who left (accounts OpenAcct does not know are left alone)."""
    import shlex
    import subprocess

    from shared.config import get_settings
    from shared.slurm import sync

    name = cluster or get_settings().default_system
    if name is None:
        raise InvalidInput("name the --cluster (no default_system is configured)")
    have_accounts, have_users = sync.slurm_associations(name)
    with session_scope() as s:
        commands = sync.plan(sync.wanted(s), have_accounts, have_users, name)
    for command in commands:
        typer.echo(shlex.join(command))
        if not dry_run:
            result = subprocess.run(command, capture_output=True, text=True, timeout=sync.SACCTMGR_TIMEOUT)
            if result.returncode != 0:
                raise InvalidInput(f"{shlex.join(command)} failed: {result.stderr.strip() or result.stdout.strip()}")
    done(f"{len(commands)} sacctmgr commands {'to run' if dry_run else 'run'}; Slurm {'would match' if dry_run else 'matches'} OpenAcct")


@slurm_app.command("reconcile")
def slurm_reconcile(
    since: Annotated[str, typer.Option(help="Jobs that ended at or after this time (ISO 8601; the configured timezone unless it says).")],
    until: Annotated[str | None, typer.Option(help="...and before this time (default: now).")] = None,
    cluster: Annotated[str | None, typer.Option(help="The Slurm cluster sacct reports on (default: sacct's own, from slurm.conf).")] = None,
    dry_run: Annotated[bool, typer.Option(help="Compare and list; publish nothing.")] = False,
    end_hook: Annotated[str | None, typer.Option(
        help="The hook that reports job ends here: jobcomp or epilogctld (default: slurm_end_hook).")] = None,
    as_json: JsonFlag = False,
) -> None:
    """Charge the jobs Slurm's accounting (sacct) says ended that the ledger never charged (their
    jobcomp record was lost), by publishing the event the jobcomp hook would have, and list
    the jobs charged otherwise than sacct implies. Exit 0: every job is charged as sacct says or
    was published now; 1: some job differs, is parked or cannot be read (with --dry-run: or is
    missing); 3: sacct is missing, failed or cannot reach slurmdbd."""
    import time

    from shared.config import get_settings
    from shared.events import NAME
    from shared.slurm import reconcile as rec
    from shared.slurm import sacct
    from shared.timestamps import parse_time

    settings = get_settings()
    start = parse_time(since, "--since", settings.zone)
    end = parse_time(until, "--until", settings.zone) if until is not None else ledger.now()
    if cluster is not None and not NAME.fullmatch(cluster):
        raise InvalidInput(f"--cluster {cluster!r} is not a Slurm cluster name")
    if end_hook not in (None, "jobcomp", "epilogctld"):
        raise InvalidInput(f"--end-hook {end_hook!r} is not jobcomp or epilogctld")
    try:
        records, unreadable = sacct.query(start, end, cluster)
    except sacct.SacctUnavailable as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(3) from None
    with session_scope() as s:
        result = rec.reconcile(s, records, unreadable, now=int(time.time()), end_hook=end_hook,
                               publish=None if dry_run else rec.spool_publisher(settings.spool_path))
    _reconcile_report(result, start, end, cluster, dry_run, as_json)
    if not result.reconciled:
        raise typer.Exit(1)


def _reconcile_report(result: Reconciliation, start: dt.datetime, end: dt.datetime, cluster: str | None,
                      dry_run: bool, as_json: bool) -> None:
    from dataclasses import asdict

    from openacct.cli.output import emit_json

    listed = [asdict(f) for f in result.findings if f.status != "matches"]
    if as_json:
        emit_json({"since": start, "until": end, "cluster": cluster, "dry_run": dry_run, "counts": result.counts,
                   "not_ended": result.not_ended, "jobs": listed})
        return
    done(f"jobs that ended from {start.isoformat()} to {end.isoformat()}" + (f" on {cluster}" if cluster else ""))
    emit_rows([{"status": k, "jobs": v} for k, v in result.counts.items()] + [{"status": "not ended", "jobs": result.not_ended}],
              ["status", "jobs"], as_json=False)
    if listed:
        emit_rows(listed, ["job", "status", "state", "user", "account", "end", "elapsed_seconds", "cpus", "gpus",
                           "expected", "charged", "note"], as_json=False)
    missing = result.counts["missing"]
    done(f"{missing} missing jobs would be published (dry run)" if dry_run else
         f"{result.counts['published']} missing jobs published to the spool for the relay")


@slurm_app.command("limits")
def slurm_limits(
    dry_run: Annotated[bool, typer.Option(help="Print the limits that would change; set none.")] = False,
    as_json: JsonFlag = False,
) -> None:
    """Set each Slurm account's GrpTRESMins (billing) to what Slurm counted as used plus the
    billing minutes its OpenAcct account can still pay (limits mode: docs/slurm.md). Only the
    limits that change are set. Exit 1 if sacctmgr did not take one."""
    import shlex

    from shared.slurm import limits

    with session_scope() as s:
        found, failures = limits.keep_in_step(s, dry_run=dry_run)
    for warning in found.warnings:
        typer.echo(f"warning: {warning}", err=True)
    rows = [limit.as_dict() for limit in found.limits]
    if as_json:
        from openacct.cli.output import emit_json

        emit_json({"cluster": found.cluster, "system": found.system, "dry_run": dry_run,
                   "billing_minute_price": str(found.price_shown), "limits": rows, "warnings": found.warnings,
                   "failures": failures})
    else:
        emit_rows(rows, ["slurm_account", "account", "payable", "used", "pending", "current", "wanted", "changed"],
                  as_json=False, title=f"GrpTRESMins billing on {found.cluster} (a billing minute costs {found.price_shown})")
        for limit in found.limits:
            if limit.changed:
                typer.echo(("would run: " if dry_run else "") + shlex.join(limit.command(found.cluster)))
        for failure in failures:
            typer.echo(f"error: {failure}", err=True)
        changed = sum(limit.changed for limit in found.limits)
        done(f"{changed} limits {'would change (dry run)' if dry_run else 'set'}; "
             f"{len(found.limits) - changed} already in step")
    if failures:
        raise typer.Exit(1)


def limits_after_money_moved() -> None:
    """In limits mode, after a deposit or transfer: Slurm's limits follow at once. The money has
    moved whatever happens here, so a failure is a warning: the scheduled run catches up."""
    from shared.config import get_settings

    if not get_settings().slurm_limits:
        return
    from shared.errors import OpenAcctError
    from shared.slurm import limits

    try:
        with session_scope() as s:
            found, failures = limits.keep_in_step(s)
    except OpenAcctError as exc:
        failures = [str(exc)]
    else:
        changed = [f"{limit.slurm_account}={limit.wanted}" for limit in found.limits if limit.changed]
        if changed and len(failures) < len(changed):
            typer.echo(f"Slurm limits (GrpTRESMins billing) set: {' '.join(changed)}", err=True)
    for failure in failures:
        typer.echo(f"warning: Slurm's limits were not updated ({failure}); the money moved, and the scheduled "
                   "`openacct slurm limits` run will catch up", err=True)
