"""``openacct slurm``: Slurm kept in step with OpenAcct (associations, missed jobs, limits).
The adapter itself is shared/slurm/; these are its commands."""

from __future__ import annotations

import datetime as dt
from typing import TYPE_CHECKING, Annotated

import typer

from openacct.cli.output import JsonFlag, done, emit_rows
from shared import ledger
from shared.db import session_scope
from shared.errors import InvalidInput

if TYPE_CHECKING:
    from shared.slurm.reconcile import Reconciliation


slurm_app = typer.Typer(help="Keep Slurm in step with OpenAcct.", no_args_is_help=True)


@slurm_app.command("sync")
def slurm_sync(
    cluster: Annotated[str | None, typer.Option(help="Slurm cluster name (default: the configured default_system).")] = None,
    dry_run: Annotated[bool, typer.Option(help="Print the sacctmgr commands; run none.")] = False,
) -> None:
    """Add the Slurm accounts and user associations OpenAcct's projects and members need, and
    remove associations of members who left (accounts OpenAcct does not know are left alone)."""
    import shlex
    import subprocess

    from shared.config import get_settings
    from shared.slurm import sync

    name = cluster or get_settings().default_system
    if name is None:
        raise InvalidInput("name the --cluster (no default_system is configured)")
    have_accounts, have_users = sync.slurm_associations(name)
    with session_scope() as s:
        commands = sync.plan(sync.wanted(s), have_accounts, have_users, name)
    for command in commands:
        typer.echo(shlex.join(command))
        if not dry_run:
            result = subprocess.run(command, capture_output=True, text=True, timeout=sync.SACCTMGR_TIMEOUT)
            if result.returncode != 0:
                raise InvalidInput(f"{shlex.join(command)} failed: {result.stderr.strip() or result.stdout.strip()}")
    done(f"{len(commands)} sacctmgr commands {'to run' if dry_run else 'run'}; Slurm {'would match' if dry_run else 'matches'} OpenAcct")


@slurm_app.command("reconcile")
def slurm_reconcile(
    since: Annotated[str, typer.Option(help="Jobs that ended at or after this time (ISO 8601; the configured timezone unless it says).")],
    until: Annotated[str | None, typer.Option(help="...and before this time (default: now).")] = None,
    cluster: Annotated[str | None, typer.Option(help="The Slurm cluster sacct reports on (default: sacct's own, from slurm.conf).")] = None,
    dry_run: Annotated[bool, typer.Option(help="Compare and list; publish nothing.")] = False,
    end_hook: Annotated[str | None, typer.Option(
        help="The hook that reports job ends here: jobcomp or epilogctld (default: slurm_end_hook).")] = None,
    as_json: JsonFlag = False,
) -> None:
    """Charge the jobs Slurm's accounting (sacct) says ended that the ledger never charged (their
    jobcomp record was lost), by publishing the event the jobcomp hook would have, and list
    the jobs charged otherwise than sacct implies. Exit 0: every job is charged as sacct says or
    was published now; 1: some job differs, is parked or cannot be read (with --dry-run: or is
    missing); 3: sacct is missing, failed or cannot reach slurmdbd."""
    import time

    from shared.config import get_settings
    from shared.events import NAME
    from shared.slurm import reconcile as rec
    from shared.slurm import sacct
    from shared.timestamps import parse_time

    settings = get_settings()
    start = parse_time(since, "--since", settings.zone)
    end = parse_time(until, "--until", settings.zone) if until is not None else ledger.now()
    if cluster is not None and not NAME.fullmatch(cluster):
        raise InvalidInput(f"--cluster {cluster!r} is not a Slurm cluster name")
    if end_hook not in (None, "jobcomp", "epilogctld"):
        raise InvalidInput(f"--end-hook {end_hook!r} is not jobcomp or epilogctld")
    try:
        records, unreadable = sacct.query(start, end, cluster)
    except sacct.SacctUnavailable as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(3) from None
    with session_scope() as s:
        result = rec.reconcile(s, records, unreadable, now=int(time.time()), end_hook=end_hook,
                               publish=None if dry_run else rec.spool_publisher(settings.spool_path))
    _reconcile_report(result, start, end, cluster, dry_run, as_json)
    if not result.reconciled:
        raise typer.Exit(1)


def _reconcile_report(result: Reconciliation, start: dt.datetime, end: dt.datetime, cluster: str | None,
                      dry_run: bool, as_json: bool) -> None:
    from dataclasses import asdict

    from openacct.cli.output import emit_json

    listed = [asdict(f) for f in result.findings if f.status != "matches"]
    if as_json:
        emit_json({"since": start, "until": end, "cluster": cluster, "dry_run": dry_run, "counts": result.counts,
                   "not_ended": result.not_ended, "jobs": listed})
        return
    done(f"jobs that ended from {start.isoformat()} to {end.isoformat()}" + (f" on {cluster}" if cluster else ""))
    emit_rows([{"status": k, "jobs": v} for k, v in result.counts.items()] + [{"status": "not ended", "jobs": result.not_ended}],
              ["status", "jobs"], as_json=False)
    if listed:
        emit_rows(listed, ["job", "status", "state", "user", "account", "end", "elapsed_seconds", "cpus", "gpus",
                           "expected", "charged", "note"], as_json=False)
    missing = result.counts["missing"]
    done(f"{missing} missing jobs would be published (dry run)" if dry_run else
         f"{result.counts['published']} missing jobs published to the spool for the relay")


@slurm_app.command("limits")
def slurm_limits(
    dry_run: Annotated[bool, typer.Option(help="Print the limits that would change; set none.")] = False,
    as_json: JsonFlag = False,
) -> None:
    """Set each Slurm account's GrpTRESMins (billing) to what Slurm counted as used plus the
    billing minutes its OpenAcct account can still pay (limits mode: docs/slurm.md). Only the
    limits that change are set. Exit 1 if sacctmgr did not take one."""
    import shlex

    from shared.slurm import limits

    with session_scope() as s:
        found, failures = limits.keep_in_step(s, dry_run=dry_run)
    for warning in found.warnings:
        typer.echo(f"warning: {warning}", err=True)
    rows = [limit.as_dict() for limit in found.limits]
    if as_json:
        from openacct.cli.output import emit_json

        emit_json({"cluster": found.cluster, "system": found.system, "dry_run": dry_run,
                   "billing_minute_price": str(found.price_shown), "limits": rows, "warnings": found.warnings,
                   "failures": failures})
    else:
        emit_rows(rows, ["slurm_account", "account", "payable", "used", "pending", "current", "wanted", "changed"],
                  as_json=False, title=f"GrpTRESMins billing on {found.cluster} (a billing minute costs {found.price_shown})")
        for limit in found.limits:
            if limit.changed:
                typer.echo(("would run: " if dry_run else "") + shlex.join(limit.command(found.cluster)))
        for failure in failures:
            typer.echo(f"error: {failure}", err=True)
        changed = sum(limit.changed for limit in found.limits)
        done(f"{changed} limits {'would change (dry run)' if dry_run else 'set'}; "
             f"{len(found.limits) - changed} already in step")
    if failures:
        raise typer.Exit(1)


def limits_after_money_moved() -> None:
    """In limits mode, after a deposit or transfer: Slurm's limits follow at once. The money has
    moved whatever happens here, so a failure is a warning: the scheduled run catches up."""
    from shared.config import get_settings

    if not get_settings().slurm_limits:
        return
    from shared.errors import OpenAcctError
    from shared.slurm import limits

    try:
        with session_scope() as s:
            found, failures = limits.keep_in_step(s)
    except OpenAcctError as exc:
        failures = [str(exc)]
    else:
        changed = [f"{limit.slurm_account}={limit.wanted}" for limit in found.limits if limit.changed]
        if changed and len(failures) < len(changed):
            typer.echo(f"Slurm limits (GrpTRESMins billing) set: {' '.join(changed)}", err=True)
    for failure in failures:
        typer.echo(f"warning: Slurm's limits were not updated ({failure}); the money moved, and the scheduled "
                   "`openacct slurm limits` run will catch up", err=True)
