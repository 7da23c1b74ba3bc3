"""``openacct limit``: what a member may spend in a project per calendar month or allocation
(the rule: shared/member_limits.py; admission control enforces it)."""

from __future__ import annotations

from typing import Annotated

import typer

from openacct import shortcuts as sc
from openacct.cli.api import cli_actor
from openacct.cli.output import NEGATIVE_AMOUNTS, JsonFlag, done, emit_json, emit_rows
from shared import member_limits
from shared.db import session_scope
from shared.member_limits import MemberUse
from shared.money import display

limit_app = typer.Typer(help="Per-member spending limits: what a member may spend in a project per period.",
                        no_args_is_help=True)

COLUMNS = ["project", "user", "period", "since", "cap", "spent", "left"]


def show(uses: list[MemberUse], *, as_json: bool, title: str | None = None) -> None:
    """Caps as a table (spent: charged less refunds in the period, plus what running jobs hold)."""
    if as_json:
        emit_json([u.as_dict() for u in uses])
    else:
        emit_rows([u.amounts() for u in uses], COLUMNS, as_json=False, title=title)


@limit_app.command("set", context_settings=NEGATIVE_AMOUNTS)
def limit_set(
    project: str,
    user: str,
    amount: Annotated[str, typer.Argument(help="The most they may spend per period (0: nothing that costs money).")],
    period: Annotated[str, typer.Option(help="month (a calendar month, UTC, as statements) or allocation "
                                             "(while the project's allocations in force last).")] = "month",
) -> None:
    """Cap what a member may spend in a project; admission control refuses a job that would pass it."""
    with session_scope() as s:
        use = member_limits.set_limit(s, sc.get_project(project), user, amount, period, actor=cli_actor())
    done(f"{user} may spend {display(use.cap)} per {use.period} in {project}: "
         f"{display(use.spent)} spent, {display(use.left)} left")


@limit_app.command("clear")
def limit_clear(project: str, user: str) -> None:
    """Take a member's cap away: they may spend what the project has."""
    with session_scope() as s:
        member_limits.clear_limit(s, sc.get_project(project), user)
    done(f"{user} has no spending limit in {project}")


@limit_app.command("list")
def limit_list(
    project: Annotated[str | None, typer.Argument(help="Default: every project with a limit.")] = None,
    as_json: JsonFlag = False,
) -> None:
    """Each capped member's cap, what they spent of it this period (charges less refunds, and
    what their running jobs hold) and what is left."""
    with session_scope() as s:
        uses = member_limits.uses(s, sc.get_project(project) if project is not None else None)
    show(uses, as_json=as_json)
