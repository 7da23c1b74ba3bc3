"""PrologSlurmctld's admission check: may this job start? Standard library only.

Slurm tells the prolog neither the job's time limit nor its submit time, so ``squeue`` is asked
for them (with a format of fields no user can write into: a job name or comment cannot pass for
a time limit), then ``openacct admission serve`` decides and holds the money (see
``services.admission``). Everything runs against one deadline, ``admission_timeout``: a prolog that
hangs would stall the job, so when no answer comes in time the job starts or not as
``admission_on_error`` says, and an alarm ends the process should anything block past it.

A refused job gets the reason in its AdminComment, which its user reads with ``scontrol show job``.
"""

from __future__ import annotations

import os
import select
import signal
import socket
import time
from collections.abc import Mapping

from shared.hookconfig import HookSettings
from shared.job_event import BadInput, encode, iso_utc
from shared.slurm import values as v

# squeue's fields: time limit, submit time (epoch with SLURM_TIME_FORMAT=%s), QOS, TRES per node.
SQUEUE_FORMAT = "%l|%V|%q|%b"
REASON_MAX = 400


class NoDecision(Exception):
    """No decision could be had in time; the message says why."""


class Verdict:
    def __init__(self, admitted: bool, reason: str, submit_time: int | None = None) -> None:
        self.admitted, self.reason, self.submit_time = admitted, reason, submit_time


def check(env: Mapping[str, str], started: dict[str, object], settings: HookSettings, now: int) -> Verdict:
    """The verdict on the job of ``started`` (its job.started event), with its submit time
    when squeue told it."""
    deadline = time.monotonic() + settings.admission_timeout
    # The alarm is the last resort: it fires a little after the deadline, if a call ignored it.
    armed = [True]  # once the check is done, an alarm that was on its way does nothing
    signal.signal(signal.SIGALRM, _alarm(settings, armed))
    signal.setitimer(signal.ITIMER_REAL, settings.admission_timeout + 0.5)
    submit = None
    try:
        job = _from_squeue(env, started, settings.slurm_bin_dir, deadline)
        submit = int(job.pop("submit_epoch"))  # type: ignore[call-overload]
        answer_by_ms = int((time.time() + deadline - time.monotonic()) * 1000)
        verb, why = _ask(settings.admission_socket, {**_request(started, now), **job, "answer_by_ms": answer_by_ms},
                         deadline)
        armed[0] = False
    except (NoDecision, BadInput) as exc:
        armed[0] = False
        return Verdict(*failed(settings, str(exc)), submit)
    finally:
        armed[0] = False
        signal.setitimer(signal.ITIMER_REAL, 0)
    if verb == "error":
        return Verdict(*failed(settings, why), submit)
    verdict = Verdict(verb == "admit", why, submit)
    if not verdict.admitted:
        _tell_user(started, settings.slurm_bin_dir, verdict.reason, deadline + 1)
    return verdict


def failed(settings: HookSettings, why: str) -> tuple[bool, str]:
    verdict = "starts (admission_on_error = open)" if settings.admission_fails_open else \
        "does not start (admission_on_error = closed)"
    return settings.admission_fails_open, f"no admission decision ({why}); the job {verdict}"


def _alarm(settings: HookSettings, armed: list[bool]):  # type: ignore[no-untyped-def]
    """The first alarm ends the check as a failure to decide, so that the job's start is still
    recorded; should that be stuck too, a second one ends the process."""
    def first(*_: object) -> None:
        if not armed[0]:
            return
        signal.signal(signal.SIGALRM, lambda *_: _give_up(settings))
        signal.setitimer(signal.ITIMER_REAL, 1.0)
        raise NoDecision("the admission check ran past admission_timeout")

    return first


def _give_up(settings: HookSettings) -> None:
    os.write(2, b"openacct hook slurm-prologctld: admission check timed out\n")
    os._exit(0 if settings.admission_fails_open else 1)


def _request(started: dict[str, object], now: int) -> dict[str, object]:
    fields = ("system", "job_id", "array_job_id", "array_task_id", "user", "account", "partition", "node_list")
    return {**{k: started.get(k) for k in fields}, "cpus": started["cpus"], "nodes": started["node_count"],
            "start_time": iso_utc(now)}


def _job_ref(started: dict[str, object]) -> str:
    if started.get("array_task_id") is not None:
        return f"{started['array_job_id']}_{started['array_task_id']}"
    return str(started["job_id"])


def _run(argv: list[str], deadline: float) -> str:
    """``argv``'s output, by posix_spawn and select: the subprocess module alone would cost the
    prolog more to import than the command takes to run."""
    env = {"SLURM_TIME_FORMAT": "%s", "PATH": "/usr/bin:/bin"}
    if "SLURM_CONF" in os.environ:
        env["SLURM_CONF"] = os.environ["SLURM_CONF"]
    name = os.path.basename(argv[0])
    read_end, write_end = os.pipe()
    try:
        pid = os.posix_spawn(argv[0], argv, env, file_actions=[
            (os.POSIX_SPAWN_OPEN, 0, "/dev/null", os.O_RDONLY, 0), (os.POSIX_SPAWN_DUP2, write_end, 1),
            (os.POSIX_SPAWN_DUP2, write_end, 2), (os.POSIX_SPAWN_CLOSE, read_end)])
    except OSError as exc:
        os.close(read_end)
        raise NoDecision(f"cannot run {argv[0]}: {exc.strerror}") from None
    finally:
        os.close(write_end)
    output = b""
    try:
        while True:
            ready, _, _ = select.select([read_end], [], [], max(0.0, deadline - time.monotonic()))
            if not ready:
                raise NoDecision(f"{name} did not answer in time")
            chunk = os.read(read_end, 65536)
            if not chunk:
                break
            output += chunk
    except BaseException:  # its deadline, or the alarm: the child must not outlive the wait for it
        os.kill(pid, signal.SIGKILL)
        raise
    finally:
        os.close(read_end)
        status = os.waitpid(pid, 0)[1]
    text = output.decode(errors="replace")
    if os.waitstatus_to_exitcode(status) != 0:
        raise NoDecision(f"{name} failed: {text.strip()[:200]}")
    return text


def _from_squeue(env: Mapping[str, str], started: dict[str, object], bin_dir: str, deadline: float) -> dict[str, object]:
    out = _run([os.path.join(bin_dir, "squeue"), "-h", "-j", _job_ref(started), "-o", SQUEUE_FORMAT], deadline)
    line = out.strip().splitlines()[0] if out.strip() else ""
    parts = line.split("|")
    if len(parts) != 4:
        raise NoDecision(f"squeue gave {line[:100]!r} for job {_job_ref(started)}")
    limit, submit, qos, tres = parts
    if not (submit.isascii() and submit.isdigit()):
        raise NoDecision(f"squeue gave submit time {submit[:40]!r}")
    restarts = v.optional(env, "SLURM_JOB_RESTART_COUNT")
    return {"time_limit_minutes": v.time_limit_minutes(limit), "submit_time": iso_utc(int(submit)),
            "submit_epoch": int(submit),
            "qos": None if qos in ("", "N/A", "(null)") else qos,
            "gpus": _gpus_per_node(tres) * int(started["node_count"] or 1),  # type: ignore[call-overload]
            "restart_count": int(restarts) if restarts and restarts.isdigit() else 0}


def _gpus_per_node(tres: str) -> int:
    """GPUs per node from squeue's %b: "gres:gpu:2", "gres/gpu:a100:2", "gres/gpu=2", "N/A"."""
    total = 0
    for item in tres.split(","):
        name, sep, count = item.replace("=", ":").rpartition(":")
        if "gpu" in name and sep and count.isascii() and count.isdigit():
            total += int(count)
        elif item.endswith(("gres:gpu", "gres/gpu")):
            total += 1
    return total


def _ask(path: str | None, request: dict[str, object], deadline: float) -> tuple[str, str]:
    """The service's verdict: ("admit" | "reject" | "error", why)."""
    if not path:
        raise NoDecision("admission_socket is not set")
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as conn:
            conn.settimeout(max(0.05, deadline - time.monotonic()))
            conn.connect(path)
            conn.sendall(encode(request))
            reply = b""
            while not reply.endswith(b"\n"):
                conn.settimeout(max(0.05, deadline - time.monotonic()))
                chunk = conn.recv(65536)
                if not chunk:
                    break
                reply += chunk
    except TimeoutError:
        raise NoDecision("the admission service did not answer in time") from None
    except OSError as exc:
        raise NoDecision(f"cannot reach the admission service at {path}: {exc.strerror or exc}") from None
    verb, tab, why = reply.decode(errors="replace").rstrip("\n").partition("\t")
    if not tab or verb not in ("admit", "reject", "error"):
        raise NoDecision(f"the admission service answered {reply[:100]!r}")
    return verb, why


def _tell_user(started: dict[str, object], bin_dir: str, reason: str, deadline: float) -> None:
    """Best effort: the job's AdminComment says why it waits. It cannot fail the decision."""
    text = ("OpenAcct: job not started: " + reason)[:REASON_MAX].replace("'", "").replace('"', "")
    try:
        _run([os.path.join(bin_dir, "scontrol"), "update", f"JobId={_job_ref(started)}", f"AdminComment={text}"],
             deadline)
    except NoDecision:
        pass
