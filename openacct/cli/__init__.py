"""The ``openacct`` command. Every user mistake ends in one line on stderr and a non-zero exit."""

from __future__ import annotations

import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Annotated

import typer
from psycopg.errors import UndefinedColumn, UndefinedTable
from sqlalchemy.exc import DBAPIError, IntegrityError, OperationalError
from typer._click.exceptions import (  # typer >= 0.29 ships its own click
    ClickException,
    NoArgsIsHelpError,
    UsageError,
)

from openacct.cli import (
    admission,
    api,
    center,
    health,
    local,
    money,
    pipeline,
    publish,
    receive,
    refunds,
    reports,
    slurm,
    user,
)
from openacct.cli.limits import limit_app
from openacct.cli.output import NEGATIVE_AMOUNTS, printable
from openacct.cli.shell import shell
from shared.errors import OpenAcctError

app = typer.Typer(
    name="openacct",
    help="OpenAcct: allocations, charges and balances for a research computing center.",
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
app.add_typer(local.local_app, name="local")
app.add_typer(center.system_app, name="system")
app.add_typer(center.service_app, name="service")
app.add_typer(center.user_app, name="user")
app.add_typer(center.project_app, name="project")
center.project_app.add_typer(api.manager_app, name="manager")
app.add_typer(api.api_app, name="api")
app.add_typer(api.token_app, name="token")
app.add_typer(center.member_app, name="member")
app.add_typer(limit_app, name="limit")
app.add_typer(center.account_app, name="account")
app.add_typer(slurm.slurm_app, name="slurm")
app.add_typer(receive.receive_app, name="receive")
app.add_typer(admission.admission_app, name="admission")
app.add_typer(admission.holds_app, name="holds")
app.command("grant")(center.grant)
app.command("revoke")(center.revoke)
app.command("deposit", context_settings=NEGATIVE_AMOUNTS)(money.deposit)
app.command("charge")(money.charge)
app.command("transfer", context_settings=NEGATIVE_AMOUNTS)(money.transfer)
app.command("balance")(money.balance)
app.command("quote")(money.quote)
app.command("estimate")(user.estimate)
pipeline.job_app.command("cost")(user.job_cost)
app.command("transactions")(money.transactions)
app.add_typer(money.ledger_app, name="ledger")
app.command("shell")(shell)
app.command("worker")(pipeline.worker)
app.command("relay")(pipeline.relay)
app.command("flower")(pipeline.flower)
app.command("health")(health.health)
app.add_typer(pipeline.deadletter_app, name="deadletter")
app.add_typer(pipeline.job_app, name="job")
app.add_typer(pipeline.events_app, name="events")
app.command("publish")(publish.publish)
app.command("refund")(refunds.refund)
app.command("incident")(refunds.incident)
app.command("rerate")(refunds.rerate)
app.command("statement")(reports.statement)
app.command("alerts")(reports.alerts)
app.command("beat")(reports.beat)
app.add_typer(reports.report_app, name="report")


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
    except IntegrityError as exc:
        # A concurrent writer created the same thing between our check and our insert.
        typer.echo(f"error: conflicts with existing data: {_first_line(exc)}", err=True)
        return 1
    except OperationalError as exc:
        typer.echo(f"error: cannot use the database: {_first_line(exc)}", err=True)
        return 1
    except DBAPIError as exc:
        if isinstance(exc.orig, UndefinedTable | UndefinedColumn):
            from shared.db import schema_missing

            typer.echo(f"error: {schema_missing()}", err=True)
        else:
            typer.echo(f"error: the database refused: {_first_line(exc)}", err=True)
        return 1
    except KeyboardInterrupt:
        return 130
    except Exception as exc:
        if os.environ.get("OPENACCT_DEBUG"):
            raise
        typer.echo(f"internal error: {type(exc).__name__}: {exc} (OPENACCT_DEBUG=1 shows where)", err=True)
        return 70


def main() -> None:
    sys.exit(run())
