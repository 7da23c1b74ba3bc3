"""The OpenAcct Python API: model a center and move money in a few readable lines.

Every argument naming a model takes its name or the object itself; an unknown name raises
``NotFound`` naming it. Inside ``openacct shell`` (or a ``shared.db.session_scope()`` block) the
calls share one database transaction committed at the end; called on their own, each call
commits by itself.

    cluster = create_system("cluster", description="A Cluster")
    service = create_service("cluster-core-hours", system=cluster, units="core-hours",
                             charge_rate="0.05")
    phys = create_project("phys", pi=create_user("bob"))
    grant_service_access(service, project=phys)
    deposit("phys", "1000")
    charge("phys", service, quantity="12.5", user="bob")
    balance("phys").available   # Decimal('999.375000')
"""

from __future__ import annotations

import datetime as dt
import functools
from collections.abc import Callable
from decimal import Decimal
from typing import Any, ParamSpec, TypeVar

from sqlalchemy import exists, select
from sqlalchemy.dialects.postgresql import insert
from sqlalchemy.orm import Session

from shared import ledger
from shared.config import get_settings
from shared.db import current_session, session_scope
from shared.errors import AlreadyExists, InvalidInput, NotFound
from shared.events import NAME
from shared.jobs import job_key, upsert_jobs
from shared.ledger import Balance
from shared.models import (
    Account,
    Allocation,
    Job,
    LedgerTransaction,
    MembershipEvent,
    Project,
    ProjectManager,
    ProjectMember,
    Service,
    ServiceGrant,
    ServiceRate,
    System,
    User,
)
from shared.money import parse_rate
from shared.timestamps import parse_time

P = ParamSpec("P")
R = TypeVar("R")

# The first rate of a service applies to all earlier use, so history can be backfilled.
BEGINNING = dt.datetime(1970, 1, 1, tzinfo=dt.UTC)


def unit_of_work(fn: Callable[P, R]) -> Callable[P, R]:
    """Run in the current session, or in a session of its own committed on return."""

    @functools.wraps(fn)
    def wrapper(*args: P.args, **kwargs: P.kwargs) -> R:
        if current_session() is not None:
            return fn(*args, **kwargs)
        with session_scope():
            return fn(*args, **kwargs)

    return wrapper


def _session() -> Session:
    session = current_session()
    assert session is not None, "shortcuts run inside unit_of_work"
    return session


def _when(value: object, what: str) -> dt.datetime | None:
    return None if value is None else parse_time(value, what, get_settings().zone)


def _check_name(name: object, what: str) -> str:
    if not isinstance(name, str) or not NAME.fullmatch(name):
        raise InvalidInput(
            f"{what} name {name!r} is not valid: use 1 to 64 letters, digits, '.', '_', '-', "
            "'@' or '+', starting with a letter or digit"
        )
    return name


# --------------------------------------------------------------------------- lookups


def _by_name(model: type[Any], value: object, what: str) -> Any:
    session = _session()
    if isinstance(value, model):
        found = session.get(model, value.id)
        if found is None:
            raise NotFound(f"{what} {value.name!r} does not exist (was it rolled back?)")
        return found
    if isinstance(value, str):
        found = session.scalar(select(model).where(model.name == value))
        if found is None:
            raise NotFound(f"no {what} named {value!r}")
        return found
    raise InvalidInput(f"{what} must be given by name or object, not {type(value).__name__}")


@unit_of_work
def get_system(system: System | str) -> System:
    return _by_name(System, system, "system")


@unit_of_work
def get_user(user: User | str) -> User:
    return _by_name(User, user, "user")


@unit_of_work
def get_project(project: Project | str) -> Project:
    return _by_name(Project, project, "project")


@unit_of_work
def get_service(service: Service | str, system: System | str | None = None) -> Service:
    """A service by object, by ``name`` (unique across systems, or with ``system``), or by
    ``system/name``."""
    session = _session()
    if isinstance(service, Service):
        return _by_name(Service, service, "service")
    if not isinstance(service, str):
        raise InvalidInput(f"service must be given by name or object, not {type(service).__name__}")
    name = service
    if system is None and "/" in service:
        system, name = service.split("/", 1)
    query = select(Service).join(System).where(Service.name == name)
    if system is not None:
        query = query.where(Service.system_id == get_system(system).id)
    found = session.scalars(query.order_by(System.name)).all()
    if not found:
        where = f" on system {system if isinstance(system, str) else system.name!r}" if system else ""
        raise NotFound(f"no service named {name!r}{where}")
    if len(found) > 1:
        systems = ", ".join(s.system.name for s in found)
        raise InvalidInput(
            f"service {name!r} exists on several systems ({systems}): name it as SYSTEM/{name}"
        )
    return found[0]


@unit_of_work
def get_account(account: Account | Project | str) -> Account:
    """An account by object or name; a project (or its name) stands for its default account."""
    session = _session()
    if isinstance(account, Account):
        return _by_name(Account, account, "account")
    if isinstance(account, Project):
        return _default_account(get_project(account))
    if not isinstance(account, str):
        raise InvalidInput(f"account must be given by name or object, not {type(account).__name__}")
    found = session.scalar(select(Account).where(Account.name == account))
    if found is not None:
        return found
    project = session.scalar(select(Project).where(Project.name == account))
    if project is None:
        raise NotFound(f"no account or project named {account!r}")
    return _default_account(project)


def _default_account(project: Project) -> Account:
    found = _session().scalar(
        select(Account).where(Account.project_id == project.id, Account.is_default)
    )
    if found is None:
        raise NotFound(f"project {project.name!r} has no default account")
    return found


# --------------------------------------------------------------------------- the center


@unit_of_work
def create_system(name: str, *, description: str = "") -> System:
    session = _session()
    _check_name(name, "system")
    if session.scalar(select(exists().where(System.name == name))):
        raise AlreadyExists(f"system {name!r} already exists")
    system = System(name=name, description=description)
    session.add(system)
    session.flush()
    return system


@unit_of_work
def create_service(
    name: str,
    *,
    system: System | str,
    units: str,
    charge_rate: object,
    description: str = "",
    effective_from: object = None,
) -> Service:
    """A service of ``system`` charged ``charge_rate`` per unit, from ``effective_from``
    (default: for all time, so that earlier use can be backfilled)."""
    session = _session()
    _check_name(name, "service")
    owner = get_system(system)
    if not isinstance(units, str) or not units.strip():
        raise InvalidInput("units must be a non-empty string such as 'core-hours'")
    if len(units.strip()) > 64:
        raise InvalidInput(f"units {units.strip()!r} are longer than 64 characters")
    rate = parse_rate(charge_rate)
    if session.scalar(select(exists().where(Service.system_id == owner.id, Service.name == name))):
        raise AlreadyExists(f"service {name!r} already exists on system {owner.name!r}")
    service = Service(name=name, system=owner, units=units.strip(), description=description)
    session.add(service)
    session.flush()
    session.add(ServiceRate(service_id=service.id, rate=rate,
                            effective_from=_when(effective_from, "effective date") or BEGINNING))
    session.flush()
    return service


@unit_of_work
def set_service_rate(service: Service | str, charge_rate: object, *, effective_from: object) -> ServiceRate:
    """A new rate for ``service`` from ``effective_from`` on; earlier use keeps its rate."""
    session = _session()
    target = get_service(service)
    rate = parse_rate(charge_rate)
    start = _when(effective_from, "effective date")
    assert start is not None
    if session.scalar(select(exists().where(ServiceRate.service_id == target.id,
                                            ServiceRate.effective_from == start))):
        raise AlreadyExists(f"service {target.name!r} already has a rate from {start.isoformat()}")
    row = ServiceRate(service_id=target.id, rate=rate, effective_from=start)
    session.add(row)
    session.flush()
    return row


@unit_of_work
def create_user(name: str, *, full_name: str = "", email: str = "") -> User:
    session = _session()
    _check_name(name, "user")
    if session.scalar(select(exists().where(User.name == name))):
        raise AlreadyExists(f"user {name!r} already exists")
    user = User(name=name, full_name=full_name, email=email)
    session.add(user)
    session.flush()
    return user


@unit_of_work
def create_project(
    name: str,
    *,
    pi: User | str,
    description: str = "",
    parent: Project | str | None = None,
    active: bool = True,
) -> Project:
    """A project led by ``pi``, who becomes its first member, with a default active account of
    the same name."""
    session = _session()
    _check_name(name, "project")
    leader = get_user(pi)
    parent_project = get_project(parent) if parent is not None else None
    if session.scalar(select(exists().where(Project.name == name))):
        raise AlreadyExists(f"project {name!r} already exists")
    if session.scalar(select(exists().where(Account.name == name))):
        raise AlreadyExists(f"an account named {name!r} already exists")
    project = Project(name=name, pi=leader, description=description, active=active,
                      parent_id=parent_project.id if parent_project else None)
    session.add(project)
    session.flush()
    session.add(Account(name=name, project_id=project.id, is_default=True,
                        description=f"default account of {name}"))
    _join(project, leader)
    session.flush()
    return project


@unit_of_work
def create_account(
    name: str, *, project: Project | str, expires_at: object = None, description: str = ""
) -> Account:
    session = _session()
    _check_name(name, "account")
    owner = get_project(project)
    if session.scalar(select(exists().where(Account.name == name))):
        raise AlreadyExists(f"account {name!r} already exists")
    account = Account(name=name, project_id=owner.id, description=description,
                      expires_at=_when(expires_at, "expiry"))
    session.add(account)
    session.flush()
    return account


def _join(project: Project, user: User, actor: str = "") -> None:
    session = _session()
    session.add(ProjectMember(project_id=project.id, user_id=user.id))
    session.add(MembershipEvent(project_id=project.id, user_id=user.id, kind="added", actor=actor))


def is_member(project: Project, user: User) -> bool:
    return _session().get(ProjectMember, (project.id, user.id)) is not None


@unit_of_work
def add_user_to_project(user: User | str, project: Project | str, *, actor: str = "") -> ProjectMember:
    """``actor``: who did it, kept in membership_events (the API's caller, say)."""
    member, team = get_user(user), get_project(project)
    if is_member(team, member):
        raise AlreadyExists(f"user {member.name!r} is already a member of project {team.name!r}")
    _join(team, member, actor)
    _session().flush()
    return _session().get_one(ProjectMember, (team.id, member.id))


@unit_of_work
def remove_user_from_project(user: User | str, project: Project | str, *, actor: str = "") -> None:
    """A manager who leaves the project stops managing it."""
    session = _session()
    member, team = get_user(user), get_project(project)
    row = session.get(ProjectMember, (team.id, member.id))
    if row is None:
        raise NotFound(f"user {member.name!r} is not a member of project {team.name!r}")
    if team.pi_id == member.id:
        raise InvalidInput(
            f"user {member.name!r} is the PI of project {team.name!r}: name another PI first"
        )
    session.delete(row)
    manager = session.get(ProjectManager, (team.id, member.id))
    if manager is not None:
        session.delete(manager)
    session.add(MembershipEvent(project_id=team.id, user_id=member.id, kind="removed", actor=actor))
    session.flush()


@unit_of_work
def add_project_manager(user: User | str, project: Project | str, *, actor: str = "") -> ProjectManager:
    """Let a member manage the project's membership with its PI (NERSC Iris's membership manager)."""
    session = _session()
    member, team = get_user(user), get_project(project)
    if not is_member(team, member):
        raise InvalidInput(f"user {member.name!r} is not a member of project {team.name!r}: add them first")
    if team.pi_id == member.id:
        raise InvalidInput(f"user {member.name!r} is the PI of project {team.name!r}, who manages it already")
    if session.get(ProjectManager, (team.id, member.id)) is not None:
        raise AlreadyExists(f"user {member.name!r} already manages project {team.name!r}")
    manager = ProjectManager(project_id=team.id, user_id=member.id, actor=actor)
    session.add(manager)
    session.flush()
    return manager


@unit_of_work
def remove_project_manager(user: User | str, project: Project | str) -> None:
    session = _session()
    member, team = get_user(user), get_project(project)
    manager = session.get(ProjectManager, (team.id, member.id))
    if manager is None:
        raise NotFound(f"user {member.name!r} does not manage project {team.name!r}")
    session.delete(manager)
    session.flush()


@unit_of_work
def project_managers(project: Project | str) -> list[User]:
    team = get_project(project)
    return list(_session().scalars(
        select(User).join(ProjectManager, ProjectManager.user_id == User.id)
        .where(ProjectManager.project_id == team.id).order_by(User.name)))


@unit_of_work
def change_project_pi(project: Project | str, pi: User | str) -> Project:
    """Make ``pi`` lead ``project``, adding them as a member if they are not one."""
    session = _session()
    team, leader = get_project(project), get_user(pi)
    if team.pi_id == leader.id:
        raise InvalidInput(f"user {leader.name!r} already leads project {team.name!r}")
    if not is_member(team, leader):
        _join(team, leader)
    manager = session.get(ProjectManager, (team.id, leader.id))
    if manager is not None:  # the PI manages the project as its PI
        session.delete(manager)
    team.pi_id = leader.id
    session.add(MembershipEvent(project_id=team.id, user_id=leader.id, kind="pi_changed"))
    session.flush()
    return team


def _target_accounts(project: Project | str | None, account: Account | str | None) -> list[Account]:
    if (project is None) == (account is None):
        raise InvalidInput("name exactly one of project= or account=")
    if account is not None:
        return [get_account(account)]
    team = get_project(project)  # type: ignore[arg-type]
    accounts = [a for a in team.accounts if a.active]
    if not accounts:
        raise InvalidInput(f"project {team.name!r} has no active account")
    return accounts


def has_access(account: Account, service: Service) -> bool:
    return bool(_session().scalar(select(exists().where(
        ServiceGrant.account_id == account.id, ServiceGrant.service_id == service.id,
        ServiceGrant.revoked_at.is_(None),
    ))))


@unit_of_work
def grant_service_access(
    service: Service | str, project: Project | str | None = None, *, account: Account | str | None = None
) -> list[ServiceGrant]:
    """Let an account (or every active account of a project) use ``service``. Accounts that
    already have access are left as they are; the new grants are returned."""
    session = _session()
    target = get_service(service)
    grants = []
    for acct in _target_accounts(project, account):
        row = session.execute(
            insert(ServiceGrant).values(account_id=acct.id, service_id=target.id)
            .on_conflict_do_nothing(index_elements=["account_id", "service_id"],
                                    index_where=ServiceGrant.revoked_at.is_(None))
            .returning(ServiceGrant.id)
        ).scalar()
        if row is not None:
            grants.append(session.get_one(ServiceGrant, row))
    return grants


@unit_of_work
def revoke_service_access(
    service: Service | str, project: Project | str | None = None, *, account: Account | str | None = None
) -> int:
    """Stop an account (or every account of a project) using ``service``; returns how many
    grants were revoked."""
    session = _session()
    target = get_service(service)
    accounts = _target_accounts(project, account)
    open_grants = session.scalars(select(ServiceGrant).where(
        ServiceGrant.service_id == target.id,
        ServiceGrant.account_id.in_([a.id for a in accounts]),
        ServiceGrant.revoked_at.is_(None),
    )).all()
    if not open_grants:
        names = ", ".join(a.name for a in accounts)
        raise NotFound(f"account {names} has no access to service {target.name!r} to revoke")
    revoked_at = ledger.now()
    for grant in open_grants:
        grant.revoked_at = revoked_at
    session.flush()
    return len(open_grants)


# --------------------------------------------------------------------------- jobs


JOB_FIELDS = ("array_job_id", "array_task_id", "het_offset", "start_time", "end_time",
              "partition", "qos", "state", "exit_code", "node_count", "node_list", "cpus",
              "gpus", "memory_mb", "time_limit_minutes")


@unit_of_work
def record_job(
    system: System | str,
    job_id: str | int,
    *,
    submit_time: object,
    user: User | str | None = None,
    account: Account | Project | str | None = None,
    **fields: Any,
) -> Job:
    """Create or update a job by its natural key (system, job id, array task, het offset,
    submit time). Fields given later (end time, state) fill in what earlier events did not say."""
    session = _session()
    unknown = set(fields) - set(JOB_FIELDS)
    if unknown:
        raise InvalidInput(f"unknown job field(s): {', '.join(sorted(unknown))}")
    for name in ("start_time", "end_time"):
        if fields.get(name) is not None:
            fields[name] = _when(fields[name], name.replace("_", " "))
    values: dict[str, Any] = {
        "system_id": get_system(system).id,
        "job_id": str(job_id),
        "submit_time": _when(submit_time, "submit time"),
        "user_id": get_user(user).id if user is not None else None,
        "account_id": get_account(account).id if account is not None else None,
        "array_task_id": None,
        "het_offset": None,
        **fields,
    }
    start, end = values.get("start_time"), values.get("end_time")
    if start is not None and end is not None and end < start:
        raise InvalidInput("job end time is before its start time")
    job_pk = upsert_jobs(session, [values])[job_key(values)]
    session.expire_all()
    return session.get_one(Job, job_pk)


# --------------------------------------------------------------------------- money


@unit_of_work
def deposit(
    account: Account | Project | str,
    amount: object,
    *,
    start: object = None,
    end: object = None,
    credit_limit: object = 0,
    key: str | None = None,
    description: str = "",
) -> LedgerTransaction:
    """Fund an account (a project means its default account) with a new allocation."""
    return ledger.deposit(
        _session(), get_account(account), amount, starts_at=_when(start, "start"),
        ends_at=_when(end, "end"), credit_limit=credit_limit, key=key, description=description,
    )


@unit_of_work
def charge(
    account: Account | Project | str,
    service: Service | str,
    quantity: object,
    *,
    user: User | str | None = None,
    job: Job | None = None,
    effective_at: object = None,
    key: str | None = None,
    description: str = "",
) -> LedgerTransaction:
    """Charge for ``quantity`` units of ``service`` used by ``account`` (storage, consulting, a
    job). The account must have access to the service, and the user be a project member."""
    acct, svc = get_account(account), get_service(service)
    if not has_access(acct, svc):
        raise InvalidInput(
            f"account {acct.name!r} has no access to service {svc.name!r} "
            f"(grant it: openacct grant {svc.name} --account {acct.name})"
        )
    who = get_user(user) if user is not None else None
    if who is not None and not is_member(acct.project, who):
        raise InvalidInput(f"user {who.name!r} is not a member of project {acct.project.name!r}")
    return ledger.charge(
        _session(), acct, svc, quantity, user=who, job=job, key=key, description=description,
        effective_at=_when(effective_at, "effective time"),
    )


def _transaction(txn: LedgerTransaction | int) -> LedgerTransaction:
    session = _session()
    if isinstance(txn, LedgerTransaction):
        txn = txn.id
    if isinstance(txn, bool) or not isinstance(txn, int):
        raise InvalidInput(f"transaction must be a transaction or its number, not {txn!r}")
    found = session.get(LedgerTransaction, txn)
    if found is None:
        raise NotFound(f"no transaction #{txn}")
    return found


@unit_of_work
def refund(
    transaction: LedgerTransaction | int,
    amount: object = None,
    *,
    reason: str = "",
    key: str | None = None,
) -> LedgerTransaction:
    """Refund a charge, wholly (default) or ``amount`` of it."""
    return ledger.refund(_session(), _transaction(transaction), amount, key=key, reason=reason)


@unit_of_work
def transfer(
    source: Account | Project | str,
    target: Account | Project | str,
    amount: object,
    *,
    key: str | None = None,
    description: str = "",
) -> LedgerTransaction:
    return ledger.transfer(_session(), get_account(source), get_account(target), amount,
                           key=key, description=description)


@unit_of_work
def record_transaction(kind: str, account: Account | Project | str | None = None, **kwargs: Any) -> LedgerTransaction:
    """Any ledger operation by kind, for importing another system's history:
    ``record_transaction("charge", "phys", service=..., quantity=...)`` is ``charge(...)``."""
    verbs: dict[str, Callable[..., LedgerTransaction]] = {
        "deposit": deposit, "charge": charge, "transfer": transfer,
    }
    if kind == "refund":
        return refund(**kwargs)
    if kind in ("hold", "release", "adjustment"):
        return _record_raw(kind, account, **kwargs)
    if kind not in verbs:
        raise InvalidInput(
            f"unknown transaction kind {kind!r}: deposit, charge, refund, transfer, hold, "
            "release or adjustment"
        )
    if account is None:
        raise InvalidInput(f"a {kind} needs an account")
    return verbs[kind](account, **kwargs)


def _record_raw(kind: str, account: Account | Project | str | None, **kwargs: Any) -> LedgerTransaction:
    session = _session()
    if kind == "release":
        return ledger.release(session, _transaction(kwargs.pop("hold")), **kwargs)
    if account is None:
        raise InvalidInput(f"a {kind} needs an account")
    if kind == "hold":
        return ledger.hold(session, get_account(account), **kwargs)
    allocation = kwargs.pop("allocation", None)
    if allocation is not None:
        number = allocation.id if isinstance(allocation, Allocation) else allocation
        allocation = session.get(Allocation, number) if isinstance(number, int) and not isinstance(number, bool) else None
        if allocation is None:
            raise NotFound(f"no allocation #{number}")
    refers_to = kwargs.pop("refers_to", None)
    return ledger.adjust(session, get_account(account), allocation=allocation,
                         refers_to=_transaction(refers_to) if refers_to is not None else None,
                         **kwargs)


@unit_of_work
def balance(target: Account | Project | str | None = None, *, at: object = None) -> Balance | list[Balance]:
    """The balance of a project (all its accounts) or an account; with no target, of every
    active project. ``at`` reads the journal as it stood then."""
    session = _session()
    moment = _when(at, "time")
    as_of = moment is not None
    if target is None:
        projects = session.scalars(select(Project).where(Project.active).order_by(Project.name)).all()
        return [ledger.project_balance(session, p, moment, as_of=as_of) for p in projects]
    if isinstance(target, Project):
        return ledger.project_balance(session, get_project(target), moment, as_of=as_of)
    if isinstance(target, str):
        project = session.scalar(select(Project).where(Project.name == target))
        if project is not None:
            return ledger.project_balance(session, project, moment, as_of=as_of)
    return ledger.account_balance(session, get_account(target), moment, as_of=as_of)


__all__ = [
    "add_project_manager", "add_user_to_project", "balance", "change_project_pi", "charge", "create_account",
    "create_project", "create_service", "create_system", "create_user", "deposit",
    "get_account", "get_project", "get_service", "get_system", "get_user",
    "grant_service_access", "project_managers", "record_job", "record_transaction", "refund",
    "remove_project_manager", "remove_user_from_project", "revoke_service_access", "set_service_rate", "transfer",
    "Decimal",
]
