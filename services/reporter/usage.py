"""Usage: a daily rollup of the ledger's charges and refunds, and reports read from it.

The rollup of a day is computed from the journal and replaces that day's rows in one statement
pair (delete, insert) inside the caller's transaction: rolling a day up again gives the same
rows, so the reporter simply re-rolls the last few days on each run, and late events (a job
whose completion arrives days later) are picked up while they are within that window;
``openacct report rollup --from --to`` re-rolls any range.
"""

from __future__ import annotations

import datetime as dt
from typing import Any

from sqlalchemy import Date, Numeric, and_, cast, delete, exists, func, literal_column, or_, select, text
from sqlalchemy.orm import Session, aliased

from shared.models import Account, Job, LedgerTransaction, Project, Service, System, UsageDaily, User

# What a report can be broken down by, and the column that says it.
DIMENSIONS = ("project", "pi", "account", "user", "system", "service", "partition", "size", "day", "month")
# Job size classes by CPUs, as sreport's job size reports group them.
SIZE_CLASS = ("CASE WHEN jobs.cpus IS NULL THEN '' WHEN jobs.cpus <= 1 THEN '1' WHEN jobs.cpus <= 8 THEN '2-8' "
              "WHEN jobs.cpus <= 64 THEN '9-64' WHEN jobs.cpus <= 512 THEN '65-512' ELSE '513+' END")


def rollup(session: Session, first: dt.date, last: dt.date) -> int:
    """Roll up the days ``first`` to ``last`` (UTC); returns the rows written."""
    if last < first:
        raise ValueError("the last day to roll up is before the first")
    start = dt.datetime.combine(first, dt.time(), dt.UTC)
    end = dt.datetime.combine(last + dt.timedelta(days=1), dt.time(), dt.UTC)
    session.execute(delete(UsageDaily).where(UsageDaily.day >= first, UsageDaily.day <= last))
    t, charge, earlier = LedgerTransaction, aliased(LedgerTransaction), aliased(LedgerTransaction)
    # An adjustment (re-rating) carries none of its charge's attributes: they come from the charge.
    service_id = func.coalesce(t.service_id, charge.service_id)
    user_id = func.coalesce(t.user_id, charge.user_id)
    # Literals, not parameters: the same expression must read the same in SELECT and GROUP BY.
    day = cast(func.timezone(literal_column("'UTC'"), t.effective_at), Date)
    partition = func.coalesce(Job.partition, literal_column("''"))
    size = literal_column(SIZE_CLASS)
    delta = cast(t.details["delta"].astext, Numeric)
    # A job charged for several services (CPUs and GPUs) counts once: with its first charge.
    first_charge = and_(t.kind == "charge", t.job_id.is_not(None), ~exists().where(
        earlier.job_id == t.job_id, earlier.kind == "charge", earlier.id < t.id))
    source = (
        select(
            day.label("day"), Service.system_id, service_id, Account.project_id, t.account_id, user_id,
            partition.label("partition"), size.label("job_size"),
            func.count(t.job_id).filter(first_charge).label("jobs"),
            func.coalesce(func.sum(t.quantity).filter(t.kind == "charge"), 0).label("quantity"),
            (func.coalesce(func.sum(t.amount).filter(t.kind == "charge"), 0)
             + func.coalesce(func.sum(delta).filter(t.kind == "adjustment"), 0)).label("charged"),
            func.coalesce(func.sum(t.amount).filter(t.kind == "refund"), 0).label("refunded"),
        )
        .outerjoin(charge, and_(charge.id == t.refers_to_id, charge.kind == "charge"))
        .join(Service, Service.id == service_id)
        .join(Account, Account.id == t.account_id)
        .outerjoin(Job, Job.id == func.coalesce(t.job_id, charge.job_id))
        .where(or_(t.kind.in_(("charge", "refund")), and_(t.kind == "adjustment", charge.id.is_not(None))),
               t.effective_at >= start, t.effective_at < end)
        .group_by(day, Service.system_id, service_id, Account.project_id, t.account_id, user_id, partition, size)
    )
    columns = ["day", "system_id", "service_id", "project_id", "account_id", "user_id", "partition", "job_size",
               "jobs", "quantity", "charged", "refunded"]
    session.execute(UsageDaily.__table__.insert().from_select(columns, source))
    return session.scalar(select(func.count()).where(UsageDaily.day >= first, UsageDaily.day <= last)) or 0


def report(session: Session, first: dt.date, last: dt.date, by: list[str]) -> list[dict[str, Any]]:
    """Usage from the rollup, summed by the given dimensions, biggest charge first."""
    unknown = [b for b in by if b not in DIMENSIONS]
    if unknown or not by:
        raise ValueError(f"break usage down by one or more of {', '.join(DIMENSIONS)}, not {', '.join(unknown) or 'nothing'}")
    u = UsageDaily
    pi = aliased(User)
    column = {
        "project": Project.name, "pi": pi.name, "account": Account.name, "user": func.coalesce(User.name, ""),
        "system": System.name, "service": Service.name, "partition": u.partition, "size": u.job_size, "day": u.day,
        "month": func.to_char(u.day, literal_column("'YYYY-MM'")),
    }
    keys = [column[b].label(b) for b in by]
    # Quantities are in each service's own units: summed only service by service.
    quantity = [func.sum(u.quantity).label("quantity")] if "service" in by else []
    query = (
        select(*keys, func.sum(u.jobs).label("jobs"), *quantity,
               func.sum(u.charged).label("charged"), func.sum(u.refunded).label("refunded"),
               (func.sum(u.charged) - func.sum(u.refunded)).label("net"))
        .join(Project, Project.id == u.project_id)
        .join(pi, pi.id == Project.pi_id)
        .join(Account, Account.id == u.account_id)
        .join(System, System.id == u.system_id)
        .join(Service, Service.id == u.service_id)
        .outerjoin(User, User.id == u.user_id)
        .where(u.day >= first, u.day <= last)
        .group_by(*keys)
        .order_by(text("net DESC"), *keys)
    )
    return [dict(row._mapping) for row in session.execute(query)]
