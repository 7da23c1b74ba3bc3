"""What a job would cost at most, priced as the charger would price it, and whether its account
can pay that now: the question admission control asks before a job starts."""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass, field
from decimal import Decimal
from fractions import Fraction
from types import SimpleNamespace

from sqlalchemy.orm import Session

from shared import ledger
from shared.models import Account
from shared.rating.directory import Directory
from shared.rating.price import price, rate_at, rounded


@dataclass
class QuoteLine:
    resource: str
    service: str
    count: int
    hours: Decimal
    quantity: Decimal
    rate: Decimal
    multiplier: Decimal
    cost: Decimal


@dataclass
class Quote:
    account: str
    total: Decimal
    available: Decimal
    credit_limit: Decimal
    lines: list[QuoteLine] = field(default_factory=list)
    account_id: int = 0
    system_id: int = 0
    user_id: int | None = None

    @property
    def affordable(self) -> bool:
        """Whether the account can pay the most the job may cost, within its credit limit."""
        return self.total <= self.available + self.credit_limit


def quote(session: Session, system: str, account: str | None, *, minutes: int, cpus: int = 0, gpus: int = 0,
          nodes: int = 0, partition: str | None = None, qos: str | None = None, user: str | None = None,
          at: dt.datetime | None = None, gpus_where_charged: bool = False) -> Quote:
    """Price ``cpus``/``gpus``/``nodes`` for ``minutes`` on ``account``; raises ``Unresolved``
    with the charger's own reasons (unknown account, no access to a service, a ``user`` who is
    not a member, …). With ``gpus_where_charged``, GPUs count only on a system with a service
    for them, as the charger counts a Slurm job's (its end record does not name them)."""
    at = at or ledger.now()
    directory = Directory.load(session, [SimpleNamespace(system=system, user=user or "", account=account)])
    found = directory.system(system)
    target = directory.account(found, account)
    user_id = directory.user(found, user) if user is not None else None
    if user is not None:
        directory.check_member(target, user_id, user)
    directory.check_open(target, at)
    hours = Fraction(minutes, 60)
    multiplier = found.multiplier(partition, qos)
    lines = []
    for resource, count in (("cpu", cpus), ("gpu", gpus), ("node", nodes)):
        optional = resource == "node" or (resource == "gpu" and gpus_where_charged)
        if count <= 0 or (optional and resource not in found.services):
            continue
        service_id, service_name = directory.service(found, resource, target)
        rate = rate_at(session, service_id, at, service_name)
        lines.append(QuoteLine(resource, service_name, count, rounded(hours), rounded(count * hours), rate,
                               multiplier, price(count * hours, rate, multiplier)))
    balance = ledger.account_balance(session, session.get_one(Account, target.id), at)
    return Quote(target.name, sum((line.cost for line in lines), Decimal(0)), balance.available,
                 balance.credit_limit, lines, account_id=target.id, system_id=found.id, user_id=user_id)
