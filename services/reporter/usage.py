"""Usage: a daily rollup of the ledger's charges and refunds, and reports read from it.

The rollup of a day is computed from the journal and replaces that day's rows in one statement
pair (delete, insert) inside the caller's transaction: rolling a day up again gives the same
rows, so the reporter simply re-rolls the last few days on each run, and late events (a job
whose completion arrives days later) are picked up while they are within that window;
``openacct report rollup --from --to`` re-rolls any range. Each day rolled up is noted, with when
(``usage_rollups``).

A report needs no rollup to be right. It reads from the rollup only the days it has settled:
rolled up after they ended, and past the window the reporter still rolls up again. Every other
day of the report (today, the days of that window, a day never rolled up since it ended: a
new site, a beat that was down) it adds up from the ledger as it runs, with the very query the
rollup writes its rows with, in the same statement as it reads the rest. That is cheaper than
rolling those days up first, which would do the same sum and then write it, and it writes
nothing: a report needs no privilege to write, and never contends with the reporter's rollup.
Usually that is the window's few days of the ledger, which PostgreSQL reads through the index on
(account, effective time); the months before come from the rollup.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Collection
from typing import Any

from sqlalchemy import (
    Date,
    Integer,
    Numeric,
    Select,
    Subquery,
    and_,
    cast,
    delete,
    exists,
    func,
    literal_column,
    or_,
    select,
    text,
    union_all,
)
from sqlalchemy.dialects.postgresql import insert
from sqlalchemy.orm import Session, aliased

from shared.models import (
    Account,
    Job,
    LedgerTransaction,
    Project,
    Service,
    System,
    UsageDaily,
    UsageRollup,
    User,
)

# What a report can be broken down by, and the column that says it.
DIMENSIONS = ("project", "pi", "account", "user", "system", "service", "partition", "size", "day", "month")
# Job size classes by CPUs, as sreport's job size reports group them.
SIZE_CLASS = ("CASE WHEN jobs.cpus IS NULL THEN '' WHEN jobs.cpus <= 1 THEN '1' WHEN jobs.cpus <= 8 THEN '2-8' "
              "WHEN jobs.cpus <= 64 THEN '9-64' WHEN jobs.cpus <= 512 THEN '65-512' ELSE '513+' END")
# The days before today that each scheduled rollup does again: late job events land within them.
ROLLED_AGAIN_DAYS = 3
# What a row of usage says, in the order of usage_daily's columns.
COLUMNS = ["day", "system_id", "service_id", "project_id", "account_id", "user_id", "partition", "job_size",
           "jobs", "quantity", "charged", "refunded"]


def rollup(session: Session, first: dt.date, last: dt.date) -> int:
    """Roll up the days ``first`` to ``last`` (UTC); returns the rows written."""
    if last < first:
        raise ValueError("the last day to roll up is before the first")
    session.execute(delete(UsageDaily).where(UsageDaily.day >= first, UsageDaily.day <= last))
    session.execute(UsageDaily.__table__.insert().from_select(COLUMNS, from_ledger(first, last)))
    days = [{"day": first + dt.timedelta(days=n)} for n in range((last - first).days + 1)]
    session.execute(insert(UsageRollup).values(days)
                    .on_conflict_do_update(index_elements=["day"], set_={"rolled_at": func.now()}))
    return session.scalar(select(func.count()).where(UsageDaily.day >= first, UsageDaily.day <= last)) or 0


def from_ledger(first: dt.date, last: dt.date, *, leaving_out: Collection[dt.date] = ()) -> Select[Any]:
    """The rows of usage (COLUMNS) of the days ``first`` to ``last`` but those left out, added up
    from the ledger: what a rollup writes."""
    start = dt.datetime.combine(first, dt.time(), dt.UTC)
    end = dt.datetime.combine(last + dt.timedelta(days=1), dt.time(), dt.UTC)
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
    query = (
        select(
            day.label("day"), Service.system_id, service_id.label("service_id"), Account.project_id,
            t.account_id, user_id.label("user_id"), partition.label("partition"), size.label("job_size"),
            cast(func.count(t.job_id).filter(first_charge), Integer).label("jobs"),  # as usage_daily has it
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
    if leaving_out:
        query = query.where(day.not_in(sorted(leaving_out)))
    return query


def usage_now(session: Session, first: dt.date, last: dt.date) -> Subquery:
    """The rows of usage (COLUMNS) of the days ``first`` to ``last`` as the ledger stands now: the
    rollup's of the days it has settled, the ledger's own sums of the others."""
    today = dt.datetime.now(dt.UTC).date()
    still_rolled_again = today - dt.timedelta(days=ROLLED_AGAIN_DAYS)
    settled = {
        day for day, rolled_at in session.execute(
            select(UsageRollup.day, UsageRollup.rolled_at)
            .where(UsageRollup.day >= first, UsageRollup.day <= last, UsageRollup.day < still_rolled_again))
        if rolled_at >= dt.datetime.combine(day + dt.timedelta(days=1), dt.time(), dt.UTC)  # after it ended
    }
    unsettled = [first + dt.timedelta(days=n) for n in range((last - first).days + 1)]
    unsettled = [day for day in unsettled if day not in settled]
    rolled = select(*(getattr(UsageDaily, c) for c in COLUMNS)).where(UsageDaily.day.in_(sorted(settled)))
    if not unsettled:
        return rolled.subquery()
    added_up = from_ledger(unsettled[0], unsettled[-1],
                           leaving_out=[day for day in settled if unsettled[0] < day < unsettled[-1]])
    return union_all(rolled, added_up).subquery() if settled else added_up.subquery()


def report(session: Session, first: dt.date, last: dt.date, by: list[str], *,
           project_id: int | None = None, user_id: int | None = None) -> list[dict[str, Any]]:
    """Usage of the days ``first`` to ``last`` as the ledger stands now (``usage_now``), summed by
    the given dimensions, biggest charge first; of one project, or one user's, if given."""
    unknown = [b for b in by if b not in DIMENSIONS]
    if unknown or not by:
        raise ValueError(f"break usage down by one or more of {', '.join(DIMENSIONS)}, not {', '.join(unknown) or 'nothing'}")
    usage = usage_now(session, first, last)
    u = usage.c
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
        .select_from(usage)
        .join(Project, Project.id == u.project_id)
        .join(pi, pi.id == Project.pi_id)
        .join(Account, Account.id == u.account_id)
        .join(System, System.id == u.system_id)
        .join(Service, Service.id == u.service_id)
        .outerjoin(User, User.id == u.user_id)
        .where(*([u.project_id == project_id] if project_id is not None else []),
               *([u.user_id == user_id] if user_id is not None else []))
        .group_by(*keys)
        .order_by(text("net DESC"), *keys)
    )
    return [dict(row._mapping) for row in session.execute(query)]
