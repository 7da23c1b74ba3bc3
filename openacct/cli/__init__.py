"""The ``openacct`` command. Every user mistake ends in one line on stderr and a non-zero exit."""

from __future__ import annotations

import importlib
import os
import sys
from collections.abc import Iterator, Mapping, MutableMapping, Sequence
from pathlib import Path
from typing import Annotated, Any

import typer
from typer import _click as click  # typer >= 0.29 ships its own click
from typer._click.exceptions import (  # typer >= 0.29 ships its own click
    ClickException,
    NoArgsIsHelpError,
    UsageError,
)
from typer.core import TyperGroup

from openacct.cli.output import NEGATIVE_AMOUNTS, printable
from shared.errors import OpenAcctError

# Each command's module is imported when the command is run, not all of them on every run:
# importing them all (the database layer, the API server, Celery) took 0.7-1 s before any command
# began, which every `openacct publish` of a backfill and every user's `openacct balance` paid.
# name -> (module of openacct.cli, attribute: a Typer of commands, or a command's function; its
# context settings).
COMMANDS: dict[str, tuple[str, str, dict[str, Any] | None]] = {
    "grant": ("center", "grant", None),
    "revoke": ("center", "revoke", None),
    "deposit": ("money", "deposit", NEGATIVE_AMOUNTS),
    "charge": ("money", "charge", None),
    "transfer": ("money", "transfer", NEGATIVE_AMOUNTS),
    "balance": ("money", "balance", None),
    "quote": ("money", "quote", None),
    "estimate": ("user", "estimate", None),
    "transactions": ("money", "transactions", None),
    "shell": ("shell", "shell", None),
    "worker": ("pipeline", "worker", None),
    "relay": ("pipeline", "relay", None),
    "flower": ("pipeline", "flower", None),
    "health": ("health", "health", None),
    "publish": ("publish", "publish", None),
    "refund": ("refunds", "refund", None),
    "incident": ("refunds", "incident", None),
    "rerate": ("refunds", "rerate", None),
    "statement": ("reports", "statement", None),
    "alerts": ("reports", "alerts", None),
    "beat": ("reports", "beat", None),
    # groups of commands
    "local": ("local", "local_app", None),
    "system": ("center", "system_app", None),
    "service": ("center", "service_app", None),
    "user": ("center", "user_app", None),
    "project": ("center", "project_app", None),
    "api": ("api", "api_app", None),
    "token": ("api", "token_app", None),
    "member": ("center", "member_app", None),
    "limit": ("limits", "limit_app", None),
    "account": ("center", "account_app", None),
    "slurm": ("slurm", "slurm_app", None),
    "receive": ("receive", "receive_app", None),
    "admission": ("admission", "admission_app", None),
    "holds": ("admission", "holds_app", None),
    "ledger": ("money", "ledger_app", None),
    "deadletter": ("pipeline", "deadletter_app", None),
    "job": ("pipeline", "job_app", None),
    "events": ("pipeline", "events_app", None),
    "report": ("reports", "report_app", None),
}


def _compile(name: str) -> click.Command:
    """The click command of ``COMMANDS[name]``, as ``app.add_typer`` or ``app.command`` makes it."""
    module, attribute, settings = COMMANDS[name]
    target = getattr(importlib.import_module(f"openacct.cli.{module}"), attribute)
    holder = typer.Typer(add_completion=False)
    holder.callback()(lambda: None)  # a group, whatever it holds: its one member is the command
    if isinstance(target, typer.Typer):
        holder.add_typer(target, name=name)
    else:
        holder.command(name, context_settings=settings)(target)
    group = typer.main.get_command(holder)
    assert isinstance(group, TyperGroup)
    return group.commands[name]


class _Commands(MutableMapping[str, click.Command]):
    """openacct's commands by name, those of ``COMMANDS`` compiled when first looked up: listing
    them (help, "did you mean") sees every name and compiles none."""

    def __init__(self, compiled: Mapping[str, click.Command]) -> None:
        self._compiled = dict(compiled)

    def __getitem__(self, name: str) -> click.Command:
        if name not in self._compiled:
            if name not in COMMANDS:
                raise KeyError(name)
            self._compiled[name] = _compile(name)
        return self._compiled[name]

    def __setitem__(self, name: str, command: click.Command) -> None:
        self._compiled[name] = command

    def __delitem__(self, name: str) -> None:
        del self._compiled[name]

    def __contains__(self, name: object) -> bool:
        return name in self._compiled or name in COMMANDS

    def __iter__(self) -> Iterator[str]:
        return iter([*self._compiled, *(name for name in COMMANDS if name not in self._compiled)])

    def __len__(self) -> int:
        return len(self._compiled.keys() | COMMANDS.keys())


class _Group(TyperGroup):
    """openacct itself: a group whose commands are ``_Commands``."""

    def __init__(self, **attrs: Any) -> None:
        super().__init__(**attrs)
        self.commands = _Commands(self.commands)


app = typer.Typer(
    name="openacct",
    help="OpenAcct: allocations, charges and balances for a research computing center.",
    cls=_Group,
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
db_app = typer.Typer(help="The database schema.", no_args_is_help=True)


def _print_version(asked: bool) -> None:
    if asked:
        from importlib.metadata import version

        typer.echo(f"openacct {version('openacct')}")
        raise typer.Exit()


@app.callback()
def _options(
    version: Annotated[bool | None, typer.Option("--version", callback=_print_version, is_eager=True,
                                                 help="Print the version and exit.")] = None,
) -> None:
    pass  # options of openacct itself, before the command; the help is the app's


@db_app.command("upgrade")
def db_upgrade(revision: str = typer.Argument("head", help="Target revision.")) -> None:
    """Create or migrate the schema to the latest revision."""
    from shared.db import engine
    from shared.migrate import upgrade

    reached = upgrade(engine(), revision)
    typer.echo(f"database is at revision {reached}")


@app.command("hook")
def hook(name: str = typer.Argument(help="slurm-jobcomp, slurm-prologctld or slurm-epilogctld.")) -> None:
    """Run a scheduler hook: spool one job event from the hook's environment (see openacct hook --help)."""
    # ``openacct hook`` normally never gets here: openacct.entry runs the hooks without this CLI.
    from openacct.hooks import main as run_hook

    raise typer.Exit(run_hook([name]))


keys_app = typer.Typer(help="Signing keys: what the workers check every message with.", no_args_is_help=True)
app.add_typer(keys_app, name="keys")


@keys_app.command("generate")
def keys_generate(
    path: Annotated[Path, typer.Argument(help="The key file to write (mode 0600).")],
    role: Annotated[str, typer.Option(help="scheduler (the relay's: job events only) or admin (anything).")] = "admin",
    rotate: Annotated[bool, typer.Option(help="Put the new key first in an existing file; the others still verify.")] = False,
) -> None:
    """Write a new signing key: the first key of a file signs, every key verifies."""
    from shared import signing

    key = signing.generate(path, role, rotate=rotate)
    typer.echo(f"key {key.id} ({key.role}) is first in {path}: give the workers' key files its line too")


@db_app.command("roles")
def db_roles(
    show: bool = typer.Option(False, "--show", help="Print the SQL instead of running it."),
) -> None:
    """Create the least-privilege roles (openacct_reader, _charger, _admin) and their grants."""
    from shared import roles

    if show:
        typer.echo(";\n".join(roles.statements()) + ";")
        return
    from shared.db import engine

    with engine().begin() as connection:
        roles.apply(connection)
    typer.echo(f"roles {', '.join(roles.ROLES)} are in place")


@app.command("demo")
def demo() -> None:
    """Build a small center with a day of jobs charged and print its balances: in the local instance's
    database, which later commands use (or, with a database configured, in openacct_demo beside it)."""
    from openacct.demo import run as run_demo

    run_demo()


app.add_typer(db_app, name="db")


def _first_line(exc: BaseException) -> str:
    text = str(getattr(exc, "orig", None) or exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def run(argv: Sequence[str] | None = None) -> int:
    """Run the CLI and return its exit status instead of raising."""
    command = typer.main.get_command(app)
    try:
        result = command.main(args=list(argv) if argv is not None else None,
                              prog_name="openacct", standalone_mode=False)
        return result if isinstance(result, int) else 0
    except typer.Exit as exc:
        return exc.exit_code
    except NoArgsIsHelpError as exc:  # a bare command: its help is the answer
        exc.show()
        return exc.exit_code
    except UsageError as exc:
        # One line, as every other mistake, instead of click's usage box.
        command = exc.ctx.command_path if exc.ctx is not None else "openacct"
        typer.echo(f"error: {printable(exc.format_message().rstrip('.'))} ({command} --help)", err=True)
        return exc.exit_code
    except ClickException as exc:
        exc.show()
        return exc.exit_code
    except typer.Abort:
        typer.echo("aborted", err=True)
        return 130
    except OpenAcctError as exc:
        typer.echo(f"error: {printable(str(exc))}", err=True)
        return 1
    except KeyboardInterrupt:
        return 130
    except Exception as exc:
        if (said := _database_error(exc)) is not None:
            typer.echo(f"error: {said}", err=True)
            return 1
        if os.environ.get("OPENACCT_DEBUG"):
            raise
        typer.echo(f"internal error: {type(exc).__name__}: {exc} (OPENACCT_DEBUG=1 shows where)", err=True)
        return 70


def _database_error(exc: Exception) -> str | None:
    """What to tell of an error of the database's, or None for any other. A command that never
    imported SQLAlchemy (publish, hook, keys) cannot have met one, nor pay for importing it."""
    if "sqlalchemy" not in sys.modules:
        return None
    from psycopg.errors import UndefinedColumn, UndefinedTable
    from sqlalchemy.exc import DBAPIError, IntegrityError, OperationalError

    if isinstance(exc, IntegrityError):
        # A concurrent writer created the same thing between our check and our insert.
        return f"conflicts with existing data: {_first_line(exc)}"
    if isinstance(exc, OperationalError):
        return f"cannot use the database: {_first_line(exc)}"
    if isinstance(exc, DBAPIError):
        if isinstance(exc.orig, UndefinedTable | UndefinedColumn):
            from shared.db import schema_missing

            return schema_missing()
        return f"the database refused: {_first_line(exc)}"
    return None


def main() -> None:
    sys.exit(run())
