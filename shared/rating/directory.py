"""The scheduler's names mapped to OpenAcct's, loaded once per batch with a few set queries.

A job event names a cluster, a user and an account as the scheduler knows them. The cluster is a
system (or a system alias); the user a user (or a user alias on that system); the account string
an account, or a project whose default account pays (or an account alias on that system).
"""

from __future__ import annotations

import datetime as dt
from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass, field
from decimal import Decimal

from sqlalchemy import select, tuple_
from sqlalchemy.orm import Session

from shared.events import JobCompleted, JobStarted
from shared.models import (
    Account,
    Alias,
    ChargeMultiplier,
    Project,
    ProjectMember,
    ResourceService,
    Service,
    ServiceGrant,
    System,
    User,
)

# Without a resource_services row, a service is recognised by its units.
UNITS_FOR_RESOURCE = {"cpu": "core-hours", "gpu": "gpu-hours", "node": "node-hours"}


class Unresolved(Exception):
    """An event names something OpenAcct does not know; the message says what and how to fix it."""


@dataclass(frozen=True)
class AccountInfo:
    id: int
    name: str
    project_id: int
    project_name: str
    active: bool
    expires_at: dt.datetime | None


@dataclass
class SystemInfo:
    id: int
    name: str
    services: dict[str, tuple[int, str]] = field(default_factory=dict)  # resource -> (id, name)
    multipliers: dict[tuple[str, str], Decimal] = field(default_factory=dict)
    # (partition, qos) -> what ``charge_multipliers`` gives: a batch asks the same few pairs
    _charging: dict[tuple[str | None, str | None], tuple[Decimal, str, str]] = field(
        default_factory=dict, repr=False, compare=False)

    def multiplier(self, partition: str | None, qos: str | None) -> Decimal:
        """What a job in this partition and QoS pays per unit, times the rate."""
        return (self.multipliers.get(("partition", partition or ""), Decimal(1))
                * self.multipliers.get(("qos", qos or ""), Decimal(1)))

    def charging(self, partition: str | None, qos: str | None) -> tuple[Decimal, str, str]:
        """(multiplier, the partition's alone, the QoS's alone, both as text): what a charge
        records, computed once per pair (the directory, and so this, lives for one batch)."""
        found = self._charging.get((partition, qos))
        if found is None:
            found = self._charging[(partition, qos)] = (
                self.multiplier(partition, qos), str(self.multiplier(partition, None)), str(self.multiplier(None, qos)))
        return found


@dataclass
class Directory:
    systems: dict[str, SystemInfo]
    users: dict[tuple[int, str], int]
    accounts: dict[tuple[int, str], AccountInfo]
    members: set[tuple[int, int]]
    grants: set[tuple[int, int]]

    @classmethod
    def load(cls, session: Session, events: Iterable[JobStarted | JobCompleted]) -> Directory:
        # The distinct names first: a batch names a few systems, users and accounts thousands of times.
        named = {(e.system, e.user, e.account) for e in events}
        systems = _systems(session, {system for system, _, _ in named})
        sys_ids = {name: s.id for name, s in systems.items()}
        users = _names(session, User, "user", {(sys_ids[system], user) for system, user, _ in named if system in sys_ids})
        accounts = _accounts(session, {(sys_ids[system], account) for system, _, account in named
                                       if system in sys_ids and account})
        project_ids = {a.project_id for a in accounts.values()}
        account_ids = {a.id for a in accounts.values()}
        members = set(map(tuple, session.execute(
            select(ProjectMember.project_id, ProjectMember.user_id)
            .where(ProjectMember.project_id.in_(project_ids), ProjectMember.user_id.in_(set(users.values())))
        )))
        grants = set(map(tuple, session.execute(
            select(ServiceGrant.account_id, ServiceGrant.service_id)
            .where(ServiceGrant.account_id.in_(account_ids), ServiceGrant.revoked_at.is_(None))
        )))
        return cls(systems, users, accounts, members, grants)

    def system(self, name: str) -> SystemInfo:
        try:
            return self.systems[name]
        except KeyError:
            raise Unresolved(f"unknown system {name!r} (add it, or an alias for it)") from None

    def user(self, system: SystemInfo, name: str) -> int:
        try:
            return self.users[(system.id, name)]
        except KeyError:
            raise Unresolved(f"unknown user {name!r} on system {system.name!r}") from None

    def account(self, system: SystemInfo, name: str | None) -> AccountInfo:
        if not name:
            raise Unresolved("the job names no account, and OpenAcct charges every job to one")
        try:
            account = self.accounts[(system.id, name)]
        except KeyError:
            raise Unresolved(f"unknown account {name!r} on system {system.name!r}: no account, "
                             "project or alias by that name") from None
        if not account.active:
            raise Unresolved(f"account {account.name!r} is not active")
        return account

    def check_open(self, account: AccountInfo, at: dt.datetime) -> None:
        if account.expires_at is not None and at >= account.expires_at:
            raise Unresolved(f"account {account.name!r} expired on {account.expires_at.isoformat()}, "
                             f"before the job's {at.isoformat()}")

    def check_member(self, account: AccountInfo, user_id: int, user_name: str) -> None:
        if (account.project_id, user_id) not in self.members:
            raise Unresolved(f"user {user_name!r} is not a member of project {account.project_name!r}")

    def service(self, system: SystemInfo, resource: str, account: AccountInfo) -> tuple[int, str]:
        found = system.services.get(resource)
        if found is None:
            raise Unresolved(f"system {system.name!r} has no service for {resource} use (map one, or "
                             f"add a service with units {UNITS_FOR_RESOURCE[resource]!r})")
        if (account.id, found[0]) not in self.grants:
            raise Unresolved(f"account {account.name!r} has no access to service {found[1]!r}")
        return found


def system_named(session: Session, name: str) -> SystemInfo | None:
    """A system by its name or one of its aliases, as job events name it."""
    return _systems(session, {name}).get(name)


def _systems(session: Session, names: set[str]) -> dict[str, SystemInfo]:
    found: dict[str, SystemInfo] = {}
    for system in session.scalars(select(System).where(System.name.in_(names))):
        found[system.name] = SystemInfo(system.id, system.name)
    for alias, system_id, name in session.execute(
        select(Alias.alias, System.id, System.name).join(System, System.id == Alias.target_id)
        .where(Alias.kind == "system", Alias.alias.in_(names - set(found)))
    ):
        found[alias] = SystemInfo(system_id, name)
    by_id = {s.id: s for s in found.values()}
    mapped: dict[int, dict[str, tuple[int, str]]] = defaultdict(dict)
    for system_id, resource, service_id, name in session.execute(
        select(ResourceService.system_id, ResourceService.resource, Service.id, Service.name)
        .join(Service, Service.id == ResourceService.service_id)
        .where(ResourceService.system_id.in_(by_id))
    ):
        mapped[system_id][resource] = (service_id, name)
    by_units = {units: resource for resource, units in UNITS_FOR_RESOURCE.items()}
    for service in session.scalars(select(Service).where(Service.system_id.in_(by_id)).order_by(Service.id)):
        resource = by_units.get(service.units)
        if resource is not None:
            mapped[service.system_id].setdefault(resource, (service.id, service.name))
    for system_id, kind, name, multiplier in session.execute(
        select(ChargeMultiplier.system_id, ChargeMultiplier.kind, ChargeMultiplier.name, ChargeMultiplier.multiplier)
        .where(ChargeMultiplier.system_id.in_(by_id))
    ):
        by_id[system_id].multipliers[(kind, name)] = multiplier
    for info in found.values():
        info.services = mapped[info.id]
        info.multipliers = by_id[info.id].multipliers
    return found


def _names(session: Session, model: type[User], kind: str, wanted: set[tuple[int, str]]) -> dict[tuple[int, str], int]:
    """(system id, scheduler name) -> id: aliases on that system first, then the name itself."""
    found: dict[tuple[int, str], int] = {}
    if not wanted:
        return found
    for system_id, alias, target in session.execute(
        select(Alias.system_id, Alias.alias, Alias.target_id)
        .where(Alias.kind == kind, tuple_(Alias.system_id, Alias.alias).in_(wanted))
    ):
        found[(system_id, alias)] = target
    by_name = dict(session.execute(
        select(model.name, model.id).where(model.name.in_({n for _, n in wanted}))
    ).all())
    for system_id, name in wanted:
        if (system_id, name) not in found and name in by_name:
            found[(system_id, name)] = by_name[name]
    return found


def _accounts(session: Session, wanted: set[tuple[int, str]]) -> dict[tuple[int, str], AccountInfo]:
    found: dict[tuple[int, str], AccountInfo] = {}
    if not wanted:
        return found
    columns = (Account.id, Account.name, Project.id, Project.name, Account.active, Account.expires_at)
    aliased = {
        (system_id, alias): target for system_id, alias, target in session.execute(
            select(Alias.system_id, Alias.alias, Alias.target_id)
            .where(Alias.kind == "account", tuple_(Alias.system_id, Alias.alias).in_(wanted))
        )
    }
    names = {n for _, n in wanted}
    by_id = {row[0]: AccountInfo(*row) for row in session.execute(
        select(*columns).join(Project, Project.id == Account.project_id)
        .where(Account.id.in_(set(aliased.values())) | Account.name.in_(names))
    )}
    by_name = {a.name: a for a in by_id.values()}
    defaults = {row[3]: AccountInfo(*row) for row in session.execute(
        select(*columns).join(Project, Project.id == Account.project_id)
        .where(Project.name.in_(names), Account.is_default)
    )}
    for key in wanted:
        _, name = key
        account = by_id.get(aliased[key]) if key in aliased else by_name.get(name) or defaults.get(name)
        if account is not None:
            found[key] = account
    return found
