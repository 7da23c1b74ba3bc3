"""Per-member spending limits (sub-allocations): a PI caps what one member may spend in a project
per period. The rule, in one place; admission control (services/admission), the CLI (``openacct
limit``, ``openacct balance PROJECT``) and the API read it from here.

- **Period.** ``month``: the calendar month the moment falls in, in UTC, as statements count
  months, so a member's line of the month's statement is what their cap saw. ``allocation``: from
  the start of the earliest of the project's allocations in force, for as long as one is (a
  renewal that starts once the last one ended starts the count again); with none in force only
  open holds count.
- **Spent** = the member's charges in any of the project's accounts effective in the period, as
  re-priced since, less what was refunded of them, plus what their jobs hold now (open holds not
  past their expiry). A refund or re-pricing counts in the period of the charge it corrects: a
  refund of last month's job gives nothing back this month, which that job never took from.
- **Fits**: a job that may cost ``cost`` fits when ``spent + cost <= cap``. A cap of 0 lets the
  member run only what costs nothing.

Only admission control enforces it, as it enforces balances: a charge records use that already
happened and is never refused, so ``spent`` may pass the cap (a job that ran longer than its hold,
or one started under the ``allow`` or ``notify`` policy); ``left`` is then negative.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass
from decimal import Decimal
from typing import Any

from sqlalchemy import case, func, or_, select, union_all
from sqlalchemy.dialects.postgresql import insert
from sqlalchemy.orm import Session, aliased

from shared import ledger
from shared.errors import InvalidInput, NotFound
from shared.models import (
    LIMIT_PERIODS,
    Account,
    Allocation,
    Job,
    LedgerEntry,
    LedgerTransaction,
    MemberLimit,
    OpenHold,
    Project,
    ProjectMember,
    User,
)
from shared.money import money_str, parse_money

ZERO = Decimal(0)


@dataclass(frozen=True)
class MemberUse:
    """A member's cap in a project and what counts against it, in the period of ``at``."""

    project: str
    user: str
    user_id: int
    period: str
    since: dt.datetime
    until: dt.datetime | None  # None: for as long as the allocations in force last
    cap: Decimal
    charged: Decimal  # their charges effective in the period, as re-priced, less refunds
    held: Decimal  # what their jobs hold now
    set_at: dt.datetime
    actor: str

    @property
    def spent(self) -> Decimal:
        return self.charged + self.held

    @property
    def left(self) -> Decimal:
        return self.cap - self.spent

    def fits(self, cost: Decimal) -> bool:
        """Whether a job that may cost ``cost`` keeps the member within their cap."""
        return self.spent + cost <= self.cap

    def amounts(self) -> dict[str, Any]:
        """For tables: amounts as exact Decimals (a table shows them by the display rule)."""
        return {"project": self.project, "user": self.user, "period": self.period, "since": _day(self.since),
                "until": _day(self.until) if self.until else None, "cap": self.cap, "charged": self.charged,
                "held": self.held, "spent": self.spent, "left": self.left}

    def as_dict(self) -> dict[str, Any]:
        """For JSON: exact decimal strings, times in ISO 8601."""
        return {"project": self.project, "user": self.user, "period": self.period, "since": self.since.isoformat(),
                "until": self.until.isoformat() if self.until else None,
                **{k: money_str(getattr(self, k)) for k in ("cap", "charged", "held", "spent", "left")},
                "set_at": self.set_at.isoformat(), "set_by": self.actor}


def _day(moment: dt.datetime) -> dt.date:
    return moment.astimezone(dt.UTC).date()  # UTC, as the months are


def month(at: dt.datetime) -> tuple[dt.datetime, dt.datetime]:
    """The UTC calendar month ``at`` falls in: (the instant it began, the instant it ends)."""
    at = at.astimezone(dt.UTC)
    start = dt.datetime(at.year, at.month, 1, tzinfo=dt.UTC)
    return start, dt.datetime(at.year + at.month // 12, at.month % 12 + 1, 1, tzinfo=dt.UTC)


def period_of(session: Session, period: str, account_ids: list[int], at: dt.datetime) -> tuple[dt.datetime, dt.datetime | None]:
    """[since, until) of a limit of ``period`` over these accounts (a project's) at ``at``."""
    if period == "month":
        return month(at)
    began = session.scalar(select(func.min(Allocation.starts_at)).where(
        Allocation.account_id.in_(account_ids), Allocation.starts_at <= at,
        or_(Allocation.ends_at.is_(None), Allocation.ends_at > at)))
    return (began if began is not None else at), None


def _charged(session: Session, account_ids: list[int], user_ids: list[int], since: dt.datetime,
             until: dt.datetime | None) -> dict[int, Decimal]:
    """Per user: their charges effective in [since, until), as re-priced since, less refunds."""
    t, later = LedgerTransaction, aliased(LedgerTransaction)
    charges = (select(t.id, t.user_id)
               .where(t.kind == "charge", t.account_id.in_(account_ids), t.user_id.in_(user_ids),
                      t.effective_at >= since, *([t.effective_at < until] if until else []))
               .cte("member_charges"))
    # Each charge, and the refunds and re-pricings that refer to it (by the refers_to_id index).
    moves = union_all(
        select(charges.c.id.label("txn"), charges.c.user_id),
        select(later.id, charges.c.user_id).join(charges, later.refers_to_id == charges.c.id)
        .where(later.kind.in_(("refund", "adjustment"))),
    ).subquery()
    net = case((LedgerEntry.bucket == "charged", LedgerEntry.amount), else_=-LedgerEntry.amount)
    return dict(session.execute(
        select(moves.c.user_id, func.sum(net)).select_from(moves)
        .join(LedgerEntry, LedgerEntry.transaction_id == moves.c.txn)
        .where(LedgerEntry.bucket.in_(("charged", "refunded")))
        .group_by(moves.c.user_id)
    ).all())


def _held(session: Session, account_ids: list[int], user_ids: list[int], at: dt.datetime) -> dict[int, Decimal]:
    """Per user: what their jobs hold in these accounts now (holds past their expiry are dead)."""
    return dict(session.execute(
        select(Job.user_id, func.sum(OpenHold.remaining))
        .join(Job, Job.id == OpenHold.job_id)
        .where(OpenHold.account_id.in_(account_ids), Job.user_id.in_(user_ids),
               or_(OpenHold.expires_at.is_(None), OpenHold.expires_at > at))
        .group_by(Job.user_id)
    ).all())


def uses(session: Session, project: Project | None = None, *, user_id: int | None = None,
         at: dt.datetime | None = None) -> list[MemberUse]:
    """Each member's cap, spent and left, by project then user name: of ``project`` (default every
    project with a limit), of the member ``user_id`` only if given. Members without a cap are
    not listed. What the API's GET /projects/NAME and ``openacct balance`` show."""
    at = at or ledger.now()
    query = (select(MemberLimit, User.name, Project).join(User, User.id == MemberLimit.user_id)
             .join(Project, Project.id == MemberLimit.project_id).order_by(Project.name, User.name))
    if project is not None:
        query = query.where(MemberLimit.project_id == project.id)
    if user_id is not None:
        query = query.where(MemberLimit.user_id == user_id)
    rows = session.execute(query.execution_options(populate_existing=True)).all()
    found: list[MemberUse] = []
    for team in dict.fromkeys(p for _, _, p in rows):  # projects in order, once each
        mine = [(limit, name) for limit, name, p in rows if p is team]
        account_ids = list(session.scalars(select(Account.id).where(Account.project_id == team.id)))
        held = _held(session, account_ids, [limit.user_id for limit, _ in mine], at)
        periods = {}
        for period in {limit.period for limit, _ in mine}:
            since, until = period_of(session, period, account_ids, at)
            users = [limit.user_id for limit, _ in mine if limit.period == period]
            periods[period] = (since, until, _charged(session, account_ids, users, since, until))
        for limit, name in mine:
            since, until, charged = periods[limit.period]
            found.append(MemberUse(team.name, name, limit.user_id, limit.period, since, until, limit.amount,
                                   charged.get(limit.user_id, ZERO), held.get(limit.user_id, ZERO),
                                   limit.set_at, limit.actor))
    return found


# --------------------------------------------------------------------------- admission control


def capped(session: Session, account: Account, user_id: int | None) -> MemberLimit | None:
    """The limit of member ``user_id`` in ``account``'s project, if they have one; then every
    account of the project is locked (in id order, as the ledger locks), so that what counts
    against the cap stands still until the transaction ends: two of the member's jobs asking
    at once, on two accounts of the project, cannot both fit. Call it before any other lock."""
    if user_id is None:
        return None
    limit = session.get(MemberLimit, (account.project_id, user_id))
    if limit is not None:
        ledger.lock_accounts(session, *session.scalars(select(Account.id).where(Account.project_id == account.project_id)))
    return limit


def use_of(session: Session, limit: MemberLimit, at: dt.datetime | None = None) -> MemberUse:
    """What counts against one limit now (or at ``at``)."""
    [found] = uses(session, session.get_one(Project, limit.project_id), user_id=limit.user_id, at=at)
    return found


# --------------------------------------------------------------------------- setting them


def _member(session: Session, project: Project, user: User | str) -> User:
    """The user, a member of ``project``; one error for a user who is not a member and one who
    does not exist, so that the API tells a PI nothing about users outside their project."""
    found = session.get(User, user.id) if isinstance(user, User) else session.scalar(select(User).where(User.name == user))
    if found is None or session.get(ProjectMember, (project.id, found.id)) is None:
        name = user.name if isinstance(user, User) else user
        raise NotFound(f"user {name!r} is not a member of project {project.name!r}")
    return found


def set_limit(session: Session, project: Project, user: User | str, amount: object, period: str = "month", *,
              actor: str = "") -> MemberUse:
    """Cap what member ``user`` may spend in ``project`` per ``period`` (month or allocation) at
    ``amount`` (0: nothing that costs money), replacing any cap they had; returns their use."""
    if period not in LIMIT_PERIODS:
        raise InvalidInput(f"period {period!r} is not one of {', '.join(LIMIT_PERIODS)}")
    cap = parse_money(amount, "limit", allow_zero=True)
    member = _member(session, project, user)
    values = {"amount": cap, "period": period, "actor": actor, "set_at": func.now()}
    session.execute(insert(MemberLimit).values(project_id=project.id, user_id=member.id, **values)
                    .on_conflict_do_update(index_elements=["project_id", "user_id"], set_=values))
    [found] = uses(session, project, user_id=member.id)
    return found


def clear_limit(session: Session, project: Project, user: User | str) -> None:
    """Take member ``user``'s cap in ``project`` away: NotFound if they had none."""
    member = _member(session, project, user)
    limit = session.get(MemberLimit, (project.id, member.id))
    if limit is None:
        raise NotFound(f"user {member.name!r} has no spending limit in project {project.name!r}")
    session.delete(limit)
    session.flush()


__all__ = ["MemberUse", "capped", "clear_limit", "month", "period_of", "set_limit", "use_of", "uses"]
