"""Admission control's commands: the decision service, policies, and the holds it places."""

from __future__ import annotations

import datetime as dt
from typing import Annotated

import typer
from sqlalchemy import select

from openacct import shortcuts as sc
from openacct.cli.output import JsonFlag, done, emit_rows
from openacct.cli.pipeline import MetricsPort
from shared.config import get_settings
from shared.db import session_scope
from shared.errors import ConfigError, InvalidInput
from shared.models import ADMISSION_POLICIES, Account, Job, LedgerTransaction, OpenHold, System

admission_app = typer.Typer(help="Admission control: a job starts only if its account can pay.", no_args_is_help=True)
holds_app = typer.Typer(help="Money held for running jobs.", no_args_is_help=True)


@admission_app.command("serve")
def serve(
    loglevel: Annotated[str, typer.Option(help="debug, info, warning or error.")] = "info",
    metrics_port: MetricsPort = None,
) -> None:
    """The decision service PrologSlurmctld asks, on the admission_socket (run it on the controller, as SlurmUser)."""
    from services.admission.server import serve as run_server
    from shared import logs

    if loglevel.lower() not in ("debug", "info", "warning", "error"):
        raise InvalidInput(f"unknown log level {loglevel!r}")
    settings = get_settings()
    if settings.admission_socket is None:
        raise ConfigError("admission_socket is not set: it names the unix socket to listen on")
    logs.setup("admission", loglevel)
    if metrics_port is not None:
        from shared import metrics

        metrics.admission()  # its series show from the start, at zero
        metrics.serve(metrics_port, metrics.HoldsOpen())
    run_server(settings)


@admission_app.command("policy")
def policy(
    choice: Annotated[str | None, typer.Argument(help="reject, allow, notify, or default (inherit). Omit to show.")] = None,
    system: Annotated[str | None, typer.Option(help="Set the policy of this system.")] = None,
    account: Annotated[str | None, typer.Option(help="Set the policy of this account (or project's default account).")] = None,
    as_json: JsonFlag = False,
) -> None:
    """Show or set admission policies: an account's own, else its system's, else the site's admission_policy."""
    if system and account:
        raise InvalidInput("give --system or --account, not both")
    if choice is not None and choice not in (*ADMISSION_POLICIES, "default"):
        raise InvalidInput(f"unknown policy {choice!r}: one of {', '.join(ADMISSION_POLICIES)} or default")
    if choice is not None and not (system or account):
        raise InvalidInput("say which: --system NAME or --account NAME (the site's default is the admission_policy setting)")
    with session_scope() as s:
        if choice is not None:
            target = sc.get_system(system) if system else sc.get_account(account)
            target.admission_policy = None if choice == "default" else choice
            done(f"admission policy of {'system' if system else 'account'} {target.name!r}: "
                 f"{choice if choice != 'default' else 'inherited'}")
            return
        site = get_settings().admission_policy
        rows = [{"kind": "site", "name": "(admission_policy setting)", "policy": site}]
        rows += [{"kind": "system", "name": n, "policy": p} for n, p in
                 s.execute(select(System.name, System.admission_policy).where(System.admission_policy.is_not(None))
                           .order_by(System.name))]
        rows += [{"kind": "account", "name": n, "policy": p} for n, p in
                 s.execute(select(Account.name, Account.admission_policy).where(Account.admission_policy.is_not(None))
                           .order_by(Account.name))]
        emit_rows(rows, ["kind", "name", "policy"], as_json=as_json, title="Admission policies")


@holds_app.command("list")
def holds_list(
    account: Annotated[str | None, typer.Option(help="Only this account's holds.")] = None,
    as_json: JsonFlag = False,
) -> None:
    """Holds with money still held: their job, amount left and expiry."""
    with session_scope() as s:
        query = (select(OpenHold.hold_id, Account.name, Job.job_id, OpenHold.remaining, OpenHold.expires_at,
                        LedgerTransaction.effective_at)
                 .join(Account, Account.id == OpenHold.account_id)
                 .join(LedgerTransaction, LedgerTransaction.id == OpenHold.hold_id)
                 .outerjoin(Job, Job.id == OpenHold.job_id).order_by(OpenHold.hold_id))
        if account:
            query = query.where(OpenHold.account_id == sc.get_account(account).id)
        rows = [{"hold": h, "account": a, "job": j, "held": r, "since": since, "expires": e}
                for h, a, j, r, e, since in s.execute(query)]
    emit_rows(rows, ["hold", "account", "job", "held", "since", "expires"], as_json=as_json, title="Open holds")


@holds_app.command("expire")
def holds_expire() -> None:
    """Release every hold past its expiry (jobs that never reported back); the reporter does this on a schedule."""
    from shared import ledger

    with session_scope() as s:
        released = ledger.expire_holds(s, dt.datetime.now(dt.UTC))
    done(f"released {len(released)} expired hold{'s' if len(released) != 1 else ''}")
