"""One hook run as Slurm makes it: read the environment, spool one event, exit 0 whatever happens.

slurmctld does not retry a hook, and a failing one does harm (a failing PrologSlurmctld requeues
and holds the job; a failing node epilog drains the node), so every outcome is exit 0: an event in
the spool's ``new/``, or the input kept in ``reject/`` with its reason and one line on stderr for a
person to act on. Nothing here touches the network: the relay ships the spool.
"""

from __future__ import annotations

import os
import sys
import time

from shared import spool
from shared.hookconfig import HookSettings, default_data_dir
from shared.job_event import BadInput, encode
from shared.slurm import ctld_state
from shared.slurm import records as slurm

# Annotations only: collections.abc costs a hook run the import of collections.
TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Mapping


def run(hook: str, environ: Mapping[bytes, bytes]) -> int:
    spool_dir, settings = None, None
    try:
        settings = HookSettings(admission=hook == "slurm-prologctld")
        spool_dir = settings.spool_dir
        return _spool_event(hook, _decode(environ), int(time.time()), settings)
    except BadInput as exc:
        _reject(hook, spool_dir, environ, str(exc))
    except Exception as exc:  # a bug, a broken config or a full disk must not fail the job
        _reject(hook, spool_dir, environ, f"internal error: {type(exc).__name__}: {exc}")
    if settings is not None and settings.admission_socket and hook == "slurm-prologctld":
        return 0 if settings.admission_fails_open else 1  # no decision: as configured
    return 0


def _spool_event(hook: str, env: dict[str, str], now: int, settings: HookSettings) -> int:
    """Spool the hook's event; the exit code for Slurm (1: the prolog refuses the job)."""
    spool_dir, default_system = settings.spool_dir, settings.default_system
    if hook == "slurm-jobcomp":
        event = slurm.jobcomp_event(env, now, default_system)
    elif hook == "slurm-prologctld":
        event = slurm.prologctld_event(env, now, default_system)
        if settings.admission_socket:
            from shared.slurm import admission  # its imports cost milliseconds the others need not pay

            verdict = admission.check(env, event, settings, now)
            print(f"openacct hook {hook}: job {event['job_id']}: {verdict.reason}", file=sys.stderr)
            if not verdict.admitted:
                return 1  # Slurm requeues the job; it did not start, so nothing is spooled
            if verdict.submit_time is not None:  # the key jobcomp's event will name the job by
                event = slurm.prologctld_event(env, now, default_system, submit_time=verdict.submit_time)
        ctld_state.record_start(spool_dir, *_job_key(event), now)
    else:
        event = slurm.epilogctld_event(env, now, default_system,
                                       lambda *job: ctld_state.recorded_start(spool_dir, *job))
    spool.write(spool_dir, str(event["event_id"]), encode(event))
    if hook == "slurm-epilogctld":  # only once the event is safe: a rerun finds the start again
        ctld_state.forget(spool_dir, *_job_key(event))
    return 0


def _job_key(event: dict[str, object]) -> tuple[str, str, int | None]:
    return event["system"], event["job_id"], event["array_task_id"]  # type: ignore[return-value]


def _decode(environ: Mapping[bytes, bytes]) -> dict[str, str]:
    # surrogateescape keeps every byte; slurm_values refuses bad bytes where charging depends on them.
    return {k.decode(errors="surrogateescape"): v.decode(errors="surrogateescape") for k, v in environ.items()}


def _raw(environ: Mapping[bytes, bytes]) -> bytes:
    """The input as received: JSON (which ``openacct publish --from`` reads back), or, when it is
    not UTF-8, the exact bytes as /proc/PID/environ has them."""
    try:
        return encode(_decode(environ))
    except UnicodeEncodeError:
        return b"".join(k + b"=" + v + b"\0" for k, v in environ.items())


def _reject(hook: str, spool_dir: str | None, environ: Mapping[bytes, bytes], reason: str) -> None:
    reason = " ".join(reason.split())  # one line, whatever an exception said
    try:
        # Without settings (an unreadable config file) the spool is where they would default to.
        spool_dir = spool_dir or os.environ.get("OPENACCT_SPOOL_DIR") or os.path.join(default_data_dir(), "spool")
        where = f"input kept in {spool.reject(spool_dir, _raw(environ), reason, hook)}"
    except Exception as exc:
        where = f"and the input could not be kept: {type(exc).__name__}: {exc}"
    print(f"openacct hook {hook}: rejected: {reason}; {where}", file=sys.stderr)
