"""``openacct receive``: servers that scheduler plugins send job records to, which spool them."""

from __future__ import annotations

import ipaddress
import signal
import stat
import sys
from pathlib import Path
from typing import Annotated

import typer

from openacct.cli.api import host_and_port
from shared import networks
from shared.errors import InvalidInput

receive_app = typer.Typer(help="Receive job records that a scheduler sends over the network.", no_args_is_help=True)


@receive_app.command("slurm-elasticsearch")
def slurm_elasticsearch(
    listen: Annotated[str, typer.Option(help="HOST:PORT to listen on. Loopback unless --allow names "
                                             "the clients of another interface.")] = "127.0.0.1:9200",
    allow: Annotated[list[str] | None, typer.Option(
        help="A client address or network (CIDR) that may send records; repeat for more. "
             "Default: loopback only.")] = None,
    credentials_file: Annotated[Path | None, typer.Option(
        help="A file holding USER:PASSWORD, as in JobCompLoc=http://USER:PASSWORD@HOST:PORT/SYSTEM; "
             "then every request must carry them. Readable by its owner only.")] = None,
    log_level: Annotated[str, typer.Option(help="debug, info, warning or error.")] = "info",
) -> None:
    """Take the records of Slurm's jobcomp/elasticsearch plugin (JobCompLoc=http://HOST:PORT/SYSTEM)
    into the spool, each fsynced before Slurm is told it arrived; the relay ships them signed."""
    from shared import logs
    from shared.hookconfig import HookSettings
    from shared.slurm import receiver

    if log_level not in ("debug", "info", "warning", "error"):
        raise InvalidInput(f"unknown log level {log_level!r}")
    host, port = host_and_port(listen)
    allowed = _networks(allow) if allow else receiver.LOOPBACK
    if not allow and not _loopback(host):
        raise InvalidInput(f"--listen {listen} is not loopback: name the clients that may send records "
                           "with --allow (slurmctld's address)")
    credentials = _credentials(credentials_file) if credentials_file else None
    logs.setup("receiver", log_level)
    spool_dir = HookSettings().spool_dir  # the spool the hooks write, by the hooks' rules

    def stop(signum: int, _frame: object) -> None:
        raise KeyboardInterrupt  # leaves serve_forever; closing answers what is in flight

    signal.signal(signal.SIGTERM, stop)

    def ready(address: tuple[str, int]) -> None:
        print(f"openacct receive slurm-elasticsearch: listening on {address[0]}:{address[1]}, "
              f"spooling into {spool_dir}", file=sys.stderr, flush=True)

    try:
        receiver.serve((host, port), str(spool_dir), allowed=allowed, credentials=credentials, ready=ready)
    except KeyboardInterrupt:
        pass
    except OSError as exc:
        raise InvalidInput(f"cannot listen on {listen}: {exc.strerror or exc}") from None


def _loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _networks(allow: list[str]) -> list[str]:
    """``allow``, checked here so that a bad one is an error of the command line."""
    try:
        networks.parse(allow)
    except ValueError as exc:
        raise InvalidInput(f"--allow {exc}") from None
    return allow


def _credentials(path: Path) -> str:
    try:
        info = path.stat()
        text = path.read_text(encoding="utf-8").strip()
    except OSError as exc:
        raise InvalidInput(f"--credentials-file {path}: {exc.strerror or exc}") from None
    except UnicodeDecodeError:
        raise InvalidInput(f"--credentials-file {path} is not UTF-8 text") from None
    if info.st_mode & (stat.S_IRWXG | stat.S_IRWXO):
        raise InvalidInput(f"--credentials-file {path} is readable by others (mode {stat.S_IMODE(info.st_mode):o}): "
                           f"chmod 600 {path}")
    user, colon, password = text.partition(":")
    if not colon or not user or not password or "\n" in text:
        raise InvalidInput(f"--credentials-file {path} must hold one line USER:PASSWORD")
    return text
