"""``openacct shell``: Python with every shortcut imported, in one transaction.

A script on stdin (or named) runs whole and is committed at the end, or not at all if it fails.
Interactively, the work is committed when the shell exits; ``commit()`` and ``rollback()`` are
there for the moments in between.
"""

from __future__ import annotations

import code
import sys
import traceback
from pathlib import Path
from typing import Annotated, Any

import typer

from openacct import shortcuts
from shared.db import current_session, session_scope
from shared.errors import OpenAcctError

BANNER = """OpenAcct shell: every shortcut is imported (create_project, deposit, charge, balance, ...).
Work is committed when you leave (Ctrl-D); commit() and rollback() act at once."""


def _namespace() -> dict[str, Any]:
    import datetime
    from decimal import Decimal

    namespace: dict[str, Any] = {name: getattr(shortcuts, name) for name in shortcuts.__all__}
    namespace.update(Decimal=Decimal, datetime=datetime, commit=_commit, rollback=_rollback)
    return namespace


def _commit() -> None:
    session = current_session()
    assert session is not None
    session.commit()


def _rollback() -> None:
    session = current_session()
    assert session is not None
    session.rollback()


def shell(
    script: Annotated[Path | None, typer.Argument(help="Python file to run (default: stdin, or interactive on a terminal).")] = None,
) -> None:
    """Python with the OpenAcct shortcuts, committed at the end (nothing on error)."""
    if script is None and sys.stdin.isatty():
        with session_scope():
            try:
                code.interact(banner=BANNER, local=_namespace(), exitmsg="committed")
            except SystemExit:  # exit() or quit(): leaving the shell, as Ctrl-D is
                typer.echo("committed")
        return
    if script is not None and not script.is_file():
        raise typer.BadParameter(f"no file {script}", param_hint="SCRIPT")
    name = str(script) if script else "<stdin>"
    source = script.read_text() if script else sys.stdin.read()
    try:
        compiled = compile(source, name, "exec")
    except SyntaxError as exc:
        typer.echo(f"error: {name} line {exc.lineno}: {exc.msg}; nothing was committed", err=True)
        raise typer.Exit(1) from None
    try:
        with session_scope():
            exec(compiled, _namespace())
    except OpenAcctError as exc:
        line = _script_line(exc, name)
        typer.echo(f"error: {name}{line}: {exc}; nothing was committed", err=True)
        raise typer.Exit(1) from None
    except Exception as exc:
        # The script's own bug: show its frames, not ours.
        frames = [f for f in traceback.extract_tb(exc.__traceback__) if f.filename == name]
        typer.echo("".join(traceback.format_list(frames)).rstrip(), err=True)
        typer.echo(f"error: {type(exc).__name__}: {exc}; nothing was committed", err=True)
        raise typer.Exit(1) from None


def _script_line(exc: BaseException, name: str) -> str:
    lines = [f.lineno for f in traceback.extract_tb(exc.__traceback__) if f.filename == name]
    return f" line {lines[-1]}" if lines else ""
