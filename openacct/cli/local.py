"""``openacct local``: the local instance, the embedded PostgreSQL and Redis that stay up in the
background under the data directory when no database or broker URL is configured."""

from __future__ import annotations

from typing import Annotated, Any

import typer

from openacct.cli.output import JsonFlag, emit_json
from shared import local_instance
from shared.config import get_settings

# The exit status of a status command whose program is not running (LSB's, systemctl's).
NOT_RUNNING = 3

local_app = typer.Typer(
    help="The local instance: the embedded PostgreSQL and Redis that commands start under the data "
    "directory when no database or broker URL is configured, and that keep running for the next ones.",
    no_args_is_help=True,
)


@local_app.command("status")
def status(as_json: JsonFlag = False) -> None:
    """Show the local instance's servers and the URLs that reach them (exit 3 if neither runs)."""
    found = local_instance.describe(get_settings().data_dir)
    if as_json:
        emit_json(found)
    else:
        _show(found)
    if found["postgres"] is None and found["redis"] is None:
        raise typer.Exit(NOT_RUNNING)


@local_app.command("start")
def start() -> None:
    """Start the local instance's servers (any command that needs one starts it too)."""
    data_dir = get_settings().data_dir
    local_instance.database_url(data_dir)
    local_instance.broker_url(data_dir)
    _show(local_instance.describe(data_dir))


@local_app.command("stop")
def stop(
    delete_data: Annotated[bool, typer.Option(
        "--delete-data", help="Also delete the servers' files: the local databases and queued messages.")] = False,
) -> None:
    """Stop the local instance's servers; nothing of it keeps running."""
    data_dir = get_settings().data_dir
    stopped = local_instance.stop(data_dir, delete_data=delete_data)
    typer.echo(f"stopped {' and '.join(stopped)}" if stopped else f"no local instance was running under {data_dir}")
    if delete_data:
        typer.echo("and deleted their files")


def _show(found: dict[str, Any]) -> None:
    settings = get_settings()
    typer.echo(f"local instance under {found['data_dir']}")
    for name, label, variable, configured in (("postgres", "PostgreSQL", "OPENACCT_DATABASE_URL", settings.database_url),
                                              ("redis", "Redis", "OPENACCT_BROKER_URL", settings.broker_url)):
        server = found[name]
        if server is None:
            typer.echo(f"  {label}: not running")
            continue
        answers = "" if server["answers"] else ", NOT ANSWERING"
        runs_as = f", runs as {server['runs_as']}" if server.get("runs_as") else ""
        typer.echo(f"  {label}: running, pid {server['pid']}{answers}{runs_as}; files in {server['files']}")
        typer.echo(f"    {variable}='{server['url']}'")
        if configured:
            typer.echo(f"    ({variable} is set: commands use that, not this server)")
    if found["postgres"] is not None:
        typer.echo(f"  psql: {found['postgres']['psql']} '{found['postgres']['url']}'")
