"""``openacct api serve``, the API's tokens (``openacct token``) and the managers a PI names
(``openacct project manager``)."""

from __future__ import annotations

from typing import Annotated, Literal

import typer

from openacct import shortcuts as sc
from openacct.cli.output import JsonFlag, done, emit_rows
from shared.db import session_scope
from shared.errors import InvalidInput

api_app = typer.Typer(help="The JSON API and the web portal.", no_args_is_help=True)
token_app = typer.Typer(help="Bearer tokens of the API (stored as hashes only).", no_args_is_help=True)
manager_app = typer.Typer(help="Members a PI names to manage the project's membership with them.",
                          no_args_is_help=True)


def host_and_port(listen: str) -> tuple[str, int]:
    """HOST:PORT, [IPv6]:PORT or :PORT (every interface)."""
    host, colon, port = listen.rpartition(":")
    if not colon or not port.isdigit() or not 0 < int(port) < 65536:
        raise InvalidInput(f"--listen {listen!r} is not HOST:PORT (127.0.0.1:8080)")
    return host.strip("[]") or "0.0.0.0", int(port)


@api_app.command("serve")
def serve(
    listen: Annotated[str, typer.Option(help="HOST:PORT to listen on; behind an SSO proxy, its loopback.")]
    = "127.0.0.1:8080",
    log_level: Annotated[str, typer.Option(help="debug, info, warning or error.")] = "info",
) -> None:
    """Serve the JSON API (/api/v1, docs at /api/docs) and the portal (/) with uvicorn."""
    import uvicorn

    from openacct.api.app import create_app

    if log_level not in ("debug", "info", "warning", "error"):
        raise InvalidInput(f"unknown log level {log_level!r}")
    host, port = host_and_port(listen)
    # One process: the database is the bottleneck, and more processes are more uvicorns behind
    # the proxy. No proxy headers: the peer address is what api_trusted_proxies is checked against.
    uvicorn.run(create_app(), host=host, port=port, log_level=log_level, proxy_headers=False,
                server_header=False, date_header=False)


# Tokens expire unless told otherwise: one left in a script outlives the reason it was made.
DEFAULT_EXPIRY_DAYS = 90


@token_app.command("create")
def token_create(
    user: Annotated[str, typer.Argument(help="Whose token: it acts as this user.")],
    scope: Annotated[Literal["read", "manage"], typer.Option(help="read, or manage (membership too).")] = "read",
    expires: Annotated[str, typer.Option(
        help="Days until it expires (1-3660), or never: until revoked. A token that nobody remembers "
        "stops working by itself.")] = str(DEFAULT_EXPIRY_DAYS),
    label: Annotated[str, typer.Option(help="What it is for (shown by token list).")] = "",
) -> None:
    """Make a token; it is printed once, as the last line, and stored only as a hash."""
    from openacct.api import tokens

    with session_scope() as s:
        row, token = tokens.create(s, sc.get_user(user), scope=scope, expires_days=_days(expires), label=label,
                                   actor=cli_actor())
        until = f"until {row.expires_at:%Y-%m-%d %H:%M %Z}" if row.expires_at else "until revoked"
    done(f"token #{row.id} for {user}, scope {scope}, {until}: it is shown this once")
    typer.echo(token)


def _days(expires: str) -> int | None:
    if expires == "never":
        return None
    if not (expires.isascii() and expires.isdigit()):
        raise InvalidInput(f"--expires is a number of days from 1 to 3660, or never; not {expires!r}")
    return int(expires)


@token_app.command("list")
def token_list(
    user: Annotated[str | None, typer.Option(help="This user's tokens only.")] = None,
    as_json: JsonFlag = False,
) -> None:
    """The tokens (never the tokens themselves: they are not stored)."""
    import datetime as dt

    from openacct.api import tokens

    now = dt.datetime.now(dt.UTC)
    with session_scope() as s:
        rows = [{"id": t.id, "user": t.user.name, "scope": t.scope, "label": t.label,
                 "created_at": t.created_at, "expires_at": t.expires_at, "last_used_at": t.last_used_at,
                 "state": tokens.unusable(t, now) or "usable"}
                for t in tokens.listed(s, sc.get_user(user) if user else None)]
    emit_rows(rows, ["id", "user", "scope", "label", "created_at", "expires_at", "last_used_at", "state"],
              as_json=as_json)


@token_app.command("revoke")
def token_revoke(token_id: Annotated[int, typer.Argument(metavar="ID", help="From token list.")]) -> None:
    """Revoke a token: from now on it lets nobody in."""
    from openacct.api import tokens

    with session_scope() as s:
        row = tokens.revoke(s, token_id)
        owner = row.user.name
    done(f"token #{token_id} of {owner} is revoked")


@manager_app.command("add")
def manager_add(project: str, user: str) -> None:
    """Let a member manage the project's membership (and see every member's use)."""
    with session_scope():
        sc.add_project_manager(user, project, actor=cli_actor())
    done(f"{user} manages {project}")


@manager_app.command("remove")
def manager_remove(project: str, user: str) -> None:
    """Stop a member managing the project (they stay a member)."""
    with session_scope():
        sc.remove_project_manager(user, project)
    done(f"{user} no longer manages {project}")


@manager_app.command("list")
def manager_list(project: str, as_json: JsonFlag = False) -> None:
    """The project's managers (besides its PI)."""
    with session_scope():
        rows = [{"user": u.name, "full_name": u.full_name} for u in sc.project_managers(project)]
    emit_rows(rows, ["user", "full_name"], as_json=as_json)


def cli_actor() -> str:
    """Who ran the command, for the record: the login, as the CLI has no other identity."""
    import getpass

    try:
        return f"cli:{getpass.getuser()}"
    except (KeyError, OSError):
        return "cli"
