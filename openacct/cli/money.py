"""The money verbs: deposit, charge, transfer, balance, transactions, ledger verify."""

from __future__ import annotations

from typing import Annotated

import typer
from sqlalchemy import func, or_, select
from sqlalchemy.orm import aliased

from openacct import shortcuts as sc
from openacct.cli.limits import COLUMNS as LIMIT_COLUMNS
from openacct.cli.output import JsonFlag, done, emit_json, emit_rows
from openacct.cli.slurm import limits_after_money_moved
from shared import ledger, member_limits
from shared.config import get_settings
from shared.db import session_scope
from shared.errors import InvalidInput
from shared.models import TRANSACTION_KINDS, Account, Job, LedgerTransaction, Project, Service, User
from shared.money import display, measure
from shared.timestamps import parse_time

Key = Annotated[str | None, typer.Option(help="Idempotency key: the same key never moves money twice.")]
Description = Annotated[str, typer.Option("--description", "-d", help="Free text.")]

ledger_app = typer.Typer(help="The ledger itself.", no_args_is_help=True)

BALANCE_COLUMNS = ["name", "allocated", "charged", "refunded", "held", "available", "credit_limit"]


def deposit(
    account: Annotated[str, typer.Argument(help="Account, or project (its default account).")],
    amount: Annotated[str, typer.Argument(help="Amount of money, such as 1000 or 250.50.")],
    start: Annotated[str | None, typer.Option(help="Date the allocation starts (default: now).")] = None,
    end: Annotated[str | None, typer.Option(help="Date the allocation ends (default: never).")] = None,
    credit_limit: Annotated[str, typer.Option(help="How far below zero the account may go.")] = "0",
    key: Key = None,
    description: Description = "",
) -> None:
    """Fund an account with a new allocation."""
    with session_scope():
        txn = sc.deposit(account, amount, start=start, end=end, credit_limit=credit_limit,
                         key=key, description=description)
        done(f"deposit #{txn.id}: {display(txn.amount)} into {sc.get_account(account).name}")
    limits_after_money_moved()  # once the deposit is committed


def charge(
    account: Annotated[str, typer.Argument(help="Account, or project (its default account).")],
    service: Annotated[str, typer.Option(help="Service used, by name or SYSTEM/NAME.")],
    quantity: Annotated[str, typer.Option(help="Units used, in the service's units.")],
    user: Annotated[str | None, typer.Option(help="User responsible.")] = None,
    at: Annotated[str | None, typer.Option(help="When the use happened (default: now); its rate applies.")] = None,
    key: Key = None,
    description: Description = "",
) -> None:
    """Charge an account for use of a service (storage, consulting, anything not a job)."""
    with session_scope():
        txn = sc.charge(account, service, quantity, user=user, effective_at=at, key=key,
                        description=description)
        done(f"charge #{txn.id}: {display(txn.amount)} ({measure(txn.quantity)} x "
             f"{measure(txn.rate)}) to {sc.get_account(account).name}")


def transfer(
    source: Annotated[str, typer.Argument(metavar="FROM", help="Account or project giving.")],
    target: Annotated[str, typer.Argument(metavar="TO", help="Account or project receiving.")],
    amount: Annotated[str, typer.Argument(help="Amount of money.")],
    key: Key = None,
    description: Description = "",
) -> None:
    """Move available money between accounts; it keeps its expiry."""
    with session_scope():
        txn = sc.transfer(source, target, amount, key=key, description=description)
        done(f"transfer #{txn.id}: {display(txn.amount)} from {sc.get_account(source).name} "
             f"to {sc.get_account(target).name}")
    limits_after_money_moved()


def balance(
    target: Annotated[str | None, typer.Argument(metavar="[PROJECT|ACCOUNT]", help="Default: every active project; with api_url set, yours, from the API.")] = None,
    at: Annotated[str | None, typer.Option(help="Balance as it stood at this time.")] = None,
    as_json: JsonFlag = False,
) -> None:
    """Allocated, charged, refunded, held and available money, with the credit limit; of a
    project, also its members' spending limits, what each spent of theirs and what is left. With
    api_url set and no name (or on a login node, without database_url): the caller's projects,
    from the API."""
    from openacct.cli import user

    if user.asks_the_api(target):  # a login node: the caller's projects, from the API
        user.my_balance(target, at=at, as_json=as_json)
        return
    with session_scope() as s:
        result = sc.balance(target, at=at)
        project = s.scalar(select(Project).where(Project.name == target)) if target and at is None else None
        limits = member_limits.uses(s, project) if project is not None else []
    if target is not None and not isinstance(result, list):
        if as_json:
            emit_json({**result.as_dict(), **({"limits": [u.as_dict() for u in limits]} if limits else {})})
            return
        result = [result]
    assert isinstance(result, list)
    emit_rows([b.amounts() for b in result], BALANCE_COLUMNS, as_json=as_json)
    if limits:
        emit_rows([u.amounts() for u in limits], LIMIT_COLUMNS[1:], as_json=False, title="member limits")


def transactions(
    project: Annotated[str | None, typer.Option(help="Only this project's accounts.")] = None,
    account: Annotated[str | None, typer.Option(help="Only this account.")] = None,
    service: Annotated[str | None, typer.Option(help="Only this service.")] = None,
    user: Annotated[str | None, typer.Option(help="Only this user's.")] = None,
    kind: Annotated[str | None, typer.Option(help=f"Only one kind: {', '.join(TRANSACTION_KINDS)}.")] = None,
    job: Annotated[str | None, typer.Option(help="Only this scheduler job id.")] = None,
    since: Annotated[str | None, typer.Option(help="Effective at or after this time.")] = None,
    until: Annotated[str | None, typer.Option(help="Effective before this time.")] = None,
    limit: Annotated[int, typer.Option(min=1, max=100_000, help="At most this many a page, newest first.")] = 100,
    page: Annotated[int, typer.Option(min=1, max=1_000_000, help="Which page of --limit transactions: 2 for the next ones.")] = 1,
    as_json: JsonFlag = False,
) -> None:
    """List ledger transactions, newest first, a page at a time (say when there are more).

    An amount is what the transaction did to its account's available money: money in (deposits,
    refunds, releases) positive, money out (charges, holds, transfers to another) negative."""
    t = LedgerTransaction
    other = aliased(Account)
    zone = get_settings().zone
    with session_scope() as s:
        query = (
            select(t, ledger.SIGNED_AMOUNT, Account.name, other.name, Service.name, User.name, Job.job_id)
            .join(Account, Account.id == t.account_id)
            .outerjoin(other, other.id == t.counterparty_account_id)
            .outerjoin(Service, Service.id == t.service_id)
            .outerjoin(User, User.id == t.user_id)
            .outerjoin(Job, Job.id == t.job_id)
        )
        if kind is not None:
            if kind not in TRANSACTION_KINDS:
                raise InvalidInput(f"unknown kind {kind!r}: one of {', '.join(TRANSACTION_KINDS)}")
            query = query.where(t.kind == kind)
        if project is not None:
            ids = select(Account.id).where(Account.project_id == sc.get_project(project).id)
            query = query.where(or_(t.account_id.in_(ids), t.counterparty_account_id.in_(ids)))
        if account is not None:
            acct = sc.get_account(account)
            query = query.where(or_(t.account_id == acct.id, t.counterparty_account_id == acct.id))
        if service is not None:
            query = query.where(t.service_id == sc.get_service(service).id)
        if user is not None:
            query = query.where(t.user_id == sc.get_user(user).id)
        if job is not None:
            query = query.where(Job.job_id == job)
        if since is not None:
            query = query.where(t.effective_at >= parse_time(since, "since", zone))
        if until is not None:
            query = query.where(t.effective_at < parse_time(until, "until", zone))
        skipped = (page - 1) * limit
        # One more than the page holds says whether there are more, without counting them all.
        rows = [
            {"id": txn.id, "kind": txn.kind, "effective_at": txn.effective_at,
             "account": acct_name, "to_account": to_name, "amount": amount,
             "service": svc, "quantity": txn.quantity, "rate": txn.rate, "user": who,
             "job": job_id, "refers_to": txn.refers_to_id, "key": txn.idempotency_key,
             "description": txn.description, "details": txn.details, "created_at": txn.created_at}
            for txn, amount, acct_name, to_name, svc, who, job_id in
            s.execute(query.order_by(t.effective_at.desc(), t.id.desc()).offset(skipped).limit(limit + 1))
        ]
        cut_short = len(rows) > limit or (not rows and skipped > 0)
        total = s.scalar(select(func.count()).select_from(query.subquery())) if cut_short else None
    rows = rows[:limit]
    columns = ["id", "kind", "effective_at", "account", "amount", "service", "quantity", "user", "job"]
    if as_json:  # a script pages with --page until it gets []
        emit_json(rows)
        return
    emit_rows(rows, columns, as_json=False)
    if total is None:
        return
    # On stderr: what goes down a pipe stays the table alone.
    if rows:
        typer.echo(f"showing {skipped + 1:,}–{skipped + len(rows):,} of {total:,}: --page {page + 1} for more", err=True)
    else:
        last_page = max(1, (total + limit - 1) // limit)
        typer.echo(f"page {page} is past the end: {total:,} transactions, --page {last_page} is the last", err=True)


@ledger_app.command("verify")
def verify(as_json: JsonFlag = False) -> None:
    """Recompute every balance from the journal and report any mismatch (exit 1 if one)."""
    with session_scope() as s:
        problems = ledger.verify(s)
        accounts = s.query(Account).count()
        projects = s.query(Project).count()
    if as_json:
        emit_json({"ok": not problems, "accounts": accounts, "projects": projects,
                   "mismatches": [{"what": p.what, "detail": p.detail} for p in problems]})
    elif problems:
        for problem in problems:
            typer.echo(f"MISMATCH {problem}")
    else:
        done(f"ledger verified: {accounts} accounts in {projects} projects agree with the journal")
    if problems:
        raise typer.Exit(1)


def quote(
    account: Annotated[str, typer.Option(help="The account (or project) the job would run under.")],
    time: Annotated[str, typer.Option(help="Its time limit, as Slurm writes it: MM, HH:MM:SS, D-HH:MM.")],
    cpus: Annotated[int, typer.Option(min=0, max=10_000_000, help="CPUs.")] = 1,
    gpus: Annotated[int, typer.Option(min=0, max=10_000_000, help="GPUs.")] = 0,
    nodes: Annotated[int, typer.Option(min=0, max=10_000_000, help="Nodes (charged where the system has a node service).")] = 0,
    partition: Annotated[str | None, typer.Option(help="Partition (its multiplier applies).")] = None,
    qos: Annotated[str | None, typer.Option(help="QoS (its multiplier applies).")] = None,
    system: Annotated[str | None, typer.Option(help="System (default: the configured default_system).")] = None,
    as_json: JsonFlag = False,
) -> None:
    """The most a job would cost, and whether its account can pay that now; exit 1 if not."""
    from shared.rating.directory import Unresolved
    from shared.rating.quote import quote as price
    from shared.slurm.values import time_limit_minutes

    minutes = time_limit_minutes(time)
    if minutes is None or minutes <= 0:
        raise InvalidInput(f"bad --time {time!r}: want a time limit such as 90, 02:00:00 or 1-12:00:00")
    name = system or get_settings().default_system
    if name is None:
        raise InvalidInput("name the --system (no default_system is configured)")
    with session_scope() as s:
        try:
            found = price(s, name, account, minutes=minutes, cpus=cpus, gpus=gpus, nodes=nodes,
                          partition=partition, qos=qos)
        except Unresolved as exc:
            raise InvalidInput(str(exc)) from None
    if as_json:
        emit_json({"account": found.account, "minutes": minutes, "total": found.total, "available": found.available,
                   "credit_limit": found.credit_limit, "affordable": found.affordable,
                   "lines": [vars(line) for line in found.lines]})
    else:
        emit_rows([vars(line) for line in found.lines],
                  ["resource", "service", "count", "hours", "quantity", "rate", "multiplier", "cost"], as_json=False,
                  title=f"at most {display(found.total)} for {minutes} minutes on {found.account}")
        done(f"available {display(found.available)} (credit limit {display(found.credit_limit)}): "
             + ("can pay" if found.affordable else "CANNOT pay"))
    if not found.affordable:
        raise typer.Exit(1)
