"""Scheduler hooks and ``openacct publish``, on the environments a real Slurm 22.05 gave its hooks
(tests/fixtures/slurm-22.05-hook-env.jsonl): every record becomes an event the charger's contract
accepts; bad input is kept in the spool's reject/ with its reason and never fails the hook.

Most cases call the conversions in process; a handful run the installed ``openacct hook`` the way
slurmctld does, with the hook's own environment and nothing else. No database is needed.
"""

from __future__ import annotations

import datetime as dt
import io
import json
import os
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from openacct.cli import run as cli
from shared import spool
from shared.config import get_settings
from shared.events import parse_event
from shared.job_event import BadInput, encode
from shared.slurm import ctld_state
from shared.slurm import hook as run
from shared.slurm import records as slurm
from shared.slurm import values as slurm_values

FIXTURE = Path(__file__).parent / "fixtures" / "slurm-22.05-hook-env.jsonl"
RECORDS = [json.loads(line) for line in FIXTURE.read_text().splitlines() if line.strip()]
OPENACCT = Path(sys.executable).with_name("openacct")
NOW = int(time.time())
HEAVY = {"pydantic", "pydantic_core", "sqlalchemy", "celery", "kombu", "typer", "rich", "click", "psycopg"}


def fixture_records(hook: str) -> list[dict]:
    return [r for r in RECORDS if r["hook"] == hook]


def env_of(hook: str, variant: str, **match: str) -> dict[str, str]:
    (found,) = [r["env"] for r in fixture_records(hook)
                if r["variant"] == variant and all(r["env"].get(k) == v for k, v in match.items())]
    return dict(found)


def record_id(record: dict) -> str:
    env = record["env"]
    return f"{record['variant']}-{env.get('JOBNAME') or env.get('SLURM_JOB_NAME')}-{env.get('JOBID') or env.get('SLURM_JOB_ID')}"


def epoch(moment: dt.datetime | None) -> int | None:
    return None if moment is None else int(moment.timestamp())


def spooled(spool_dir: Path) -> list[dict]:
    return [json.loads(data) for data in spool.pending_events(spool_dir)]


def rejected(spool_dir: Path) -> list[tuple[str, bytes]]:
    """(reason, raw input) of each reject, oldest first."""
    reasons = sorted((spool_dir / spool.REJECT).glob("*.reason"))
    return [(p.read_text(), p.with_suffix(".raw").read_bytes()) for p in reasons]


# -- jobcomp/script, in process -------------------------------------------------------------

@pytest.mark.parametrize("record", fixture_records("jobcomp"), ids=record_id)
def test_every_jobcomp_record_becomes_a_valid_event(record: dict) -> None:
    env = record["env"]
    event = parse_event(encode(slurm.jobcomp_event(env, NOW, "lab")))

    assert event.kind == "job.completed" and event.source == "slurm-jobcomp"
    assert event.system == "lab" and event.job_id == env["JOBID"]
    assert (event.user, event.name, event.partition) == (env["USERNAME"], env["JOBNAME"], env["PARTITION"])
    assert (event.account, event.qos) == (env["ACCOUNT"] or None, env["QOS"] or None)
    assert (epoch(event.submit_time), epoch(event.start_time), epoch(event.end_time)) == (
        int(env["SUBMIT"]), int(env["START"]), int(env["END"]))
    assert (event.state, event.exit_code) == (env["JOBSTATE"], int(env["EXITCODE"].split(":")[0]))
    assert (event.cpus, event.node_count, event.node_list) == (int(env["PROCS"]), int(env["NODECNT"]), env["NODES"] or None)
    assert event.time_limit_minutes == (1 if env["LIMIT"] == "00:01:00" else None)


def test_a_failed_job_keeps_its_exit_code() -> None:
    event = parse_event(encode(slurm.jobcomp_event(env_of("jobcomp", "with-slurmdbd", JOBNAME="fail3"), NOW, None)))
    assert (event.state, event.exit_code) == ("FAILED", 3)


def test_array_tasks_name_their_array() -> None:
    def array_of(job_id: str) -> tuple[str | None, int | None]:
        event = slurm.jobcomp_event(env_of("jobcomp", "no-slurmdbd", JOBID=job_id), NOW, "lab")
        return event["array_job_id"], event["array_task_id"]

    assert array_of("12") == ("5", 1)
    assert array_of("5") == ("5", 3)  # the last task keeps the array's own id
    assert array_of("1") == (None, None)  # ARRAYJOBID=0, ARRAYTASKID=4294967294


def test_a_job_cancelled_while_pending_used_nothing() -> None:
    event = parse_event(encode(slurm.jobcomp_event(env_of("jobcomp", "no-slurmdbd", JOBNAME="cancel_pd"), NOW, "lab")))
    assert (event.state, event.cpus, event.node_count, event.node_list) == ("CANCELLED", 0, 0, None)
    assert event.start_time == event.end_time


def test_the_same_record_always_gives_the_same_event_id() -> None:
    env = env_of("jobcomp", "with-slurmdbd", JOBNAME="ok")
    first, again = slurm.jobcomp_event(env, NOW - 30, None), slurm.jobcomp_event(env, NOW, None)
    assert first["event_id"] == again["event_id"] and first["emitted_at"] != again["emitted_at"]


def test_cancelled_by_a_user_is_cancelled() -> None:
    env = {**env_of("jobcomp", "with-slurmdbd", JOBNAME="cancel_r"), "JOBSTATE": "CANCELLED by 0"}
    assert parse_event(encode(slurm.jobcomp_event(env, NOW, None))).state == "CANCELLED"


@pytest.mark.parametrize("name", ["caf\udce9", "caf\ud800"], ids=["from-environb", "from-json"])
def test_a_job_name_with_bad_bytes_is_still_charged(name: str) -> None:
    env = {**env_of("jobcomp", "with-slurmdbd", JOBNAME="ok"), "JOBNAME": name, "STDOUT": "/x/\udcff"}
    assert parse_event(encode(slurm.jobcomp_event(env, NOW, None))).name == "caf\ufffd"


@pytest.mark.parametrize("text", ["plain", 'a "quote" and a \\ backslash', "tab\tnew\nline\x00\x1f\x7f", "café ☃ 𝄞 \u2028", ""])
def test_events_are_encoded_as_json(text: str) -> None:
    flat = {"name": text, "count": 3, "none": None, text: "as a key"}
    encoded = encode(flat)
    assert json.loads(encoded) == flat and encoded.endswith(b"}\n") and encoded.count(b"\n") == 1
    with pytest.raises(TypeError):
        encode({"flag": True})


OK_START = int(env_of("jobcomp", "with-slurmdbd", JOBNAME="ok")["START"])


@pytest.mark.parametrize(("change", "default_system", "reason"), [
    ({"JOBID": None}, None, "JOBID is missing"),
    ({"JOBID": "12a"}, None, "JOBID is '12a', not a whole number"),
    ({"START": "yesterday"}, None, "START is 'yesterday', not a whole number"),
    ({"END": str(OK_START - 10)}, None, "end_time (2026"),
    ({"END": "0"}, None, "END is 0: the job has not ended"),
    ({"SUBMIT": "0", "START": "0"}, None, "neither a submit time nor a start time"),
    ({"CLUSTER": ""}, None, "no cluster name: set default_system in the config"),
    ({"CLUSTER": "../etc"}, None, "cluster name '../etc' is not a system name"),
    ({"USERNAME": ""}, None, "USERNAME is empty"),
    ({"USERNAME": "r\udcffot"}, None, "USERNAME is not UTF-8 (bad byte at offset 1)"),
    ({"PROCS": "-1"}, None, "PROCS is '-1', not a whole number"),
    ({"JOBSTATE": None}, None, "JOBSTATE is missing"),
], ids=lambda value: str(value)[:40])
def test_a_bad_jobcomp_record_says_why(change: dict, default_system: str | None, reason: str) -> None:
    env = env_of("jobcomp", "with-slurmdbd", JOBNAME="ok")
    env.update({key: value for key, value in change.items() if value is not None})
    for key in [key for key, value in change.items() if value is None]:
        del env[key]
    with pytest.raises(BadInput) as caught:
        slurm.jobcomp_event(env, NOW, default_system)
    assert reason in str(caught.value)


@pytest.mark.parametrize(("limit", "minutes"), [
    ("UNLIMITED", None), ("365-00:00:00", None), ("Partition_Limit", None), ("", None), ("soon", None),
    ("00:01:00", 1), ("1-02:03:04", 1563), ("30:00", 30), ("45", 45), ("2-12", 3600), ("2-12:30", 3630),
])
def test_time_limits_read_as_minutes(limit: str, minutes: int | None) -> None:
    assert slurm_values.time_limit_minutes(limit) == minutes


# -- PrologSlurmctld and EpilogSlurmctld, in process ----------------------------------------

def _epilog_of(prolog: dict) -> dict[str, str]:
    return env_of("epilogctld", prolog["variant"], SLURM_JOB_ID=prolog["env"]["SLURM_JOB_ID"])


@pytest.mark.parametrize("prolog", fixture_records("prologctld"), ids=record_id)
def test_every_ctld_job_becomes_valid_started_and_completed_events(prolog: dict, tmp_path: Path) -> None:
    env, epilog_env = prolog["env"], _epilog_of(prolog)
    start = NOW - 60
    started = parse_event(encode(slurm.prologctld_event(env, start, None)))
    ctld_state.record_start(tmp_path, started.system, started.job_id, started.array_task_id, start)
    completed = parse_event(encode(slurm.epilogctld_event(
        epilog_env, NOW, None, lambda *job: ctld_state.recorded_start(tmp_path, *job))))

    assert (started.kind, completed.kind) == ("job.started", "job.completed")
    assert epoch(started.start_time) == epoch(completed.start_time) == start and epoch(completed.end_time) == NOW
    assert started.submit_time is None and completed.submit_time is None
    for event in (started, completed):
        assert (event.system, event.job_id, event.user) == ("lab", env["SLURM_JOB_ID"], env["SLURM_JOB_USER"])
        assert event.cpus == int(env["SLURM_JOB_CPUS_PER_NODE"]) and event.node_count == 1
        assert event.account == (None if env["SLURM_JOB_ACCOUNT"] == "(null)" else env["SLURM_JOB_ACCOUNT"])
        assert event.array_task_id == (int(env["SLURM_ARRAY_TASK_ID"]) if "SLURM_ARRAY_TASK_ID" in env else None)
    failed = epilog_env["SLURM_JOB_EXIT_CODE2"] != "0:0"
    assert (completed.state, completed.exit_code) == (("FAILED", 3) if failed else ("COMPLETED", 0))


def test_the_epilog_reads_a_raw_wait_status_when_that_is_all_it_has() -> None:
    env = env_of("epilogctld", "no-slurmdbd", SLURM_JOB_NAME="fail3")
    del env["SLURM_JOB_EXIT_CODE2"]  # SLURM_JOB_EXIT_CODE=768 is exit 3
    event = slurm.epilogctld_event(env, NOW, None, lambda *job: NOW - 5)
    assert (event["state"], event["exit_code"]) == ("FAILED", 3)


@pytest.mark.parametrize(("per_node", "cpus"), [("2(x3),1", 7), ("4", 4), ("1,1", 2), ("2(x3", None), ("x", None)])
def test_cpus_per_node_are_summed(per_node: str, cpus: int | None) -> None:
    env = {"SLURM_JOB_CPUS_PER_NODE": per_node}
    if cpus is None:
        with pytest.raises(BadInput, match="SLURM_JOB_CPUS_PER_NODE"):
            slurm_values.cpus_per_node(env, "SLURM_JOB_CPUS_PER_NODE")
    else:
        assert slurm_values.cpus_per_node(env, "SLURM_JOB_CPUS_PER_NODE") == cpus


# -- the hook's own error handling, in process ----------------------------------------------

def _environb(env: dict[str, str]) -> dict[bytes, bytes]:
    return {k.encode(): v.encode() for k, v in env.items()}


@pytest.fixture
def hook_settings(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    config = tmp_path / "openacct.toml"
    config.write_text("")
    monkeypatch.setenv("OPENACCT_CONFIG", str(config))
    monkeypatch.setenv("OPENACCT_SPOOL_DIR", str(tmp_path / "spool"))
    monkeypatch.delenv("OPENACCT_DEFAULT_SYSTEM", raising=False)
    return tmp_path / "spool"


def test_an_unexpected_error_still_exits_0_and_keeps_the_input(
    hook_settings: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    def broken(*args: object, **kwargs: object) -> dict:
        raise RuntimeError("boom\nsecond line")

    monkeypatch.setattr(slurm, "jobcomp_event", broken)
    env = env_of("jobcomp", "with-slurmdbd", JOBNAME="ok")
    assert run.run("slurm-jobcomp", _environb(env)) == 0

    ((reason, raw),) = rejected(hook_settings)
    assert reason == "slurm-jobcomp: internal error: RuntimeError: boom second line\n"
    assert json.loads(raw) == env and spooled(hook_settings) == []
    assert capsys.readouterr().err.count("\n") == 1


def test_a_spool_that_cannot_be_written_still_exits_0(
    tmp_path: Path, hook_settings: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    not_a_directory = tmp_path / "file"
    not_a_directory.write_text("")
    monkeypatch.setenv("OPENACCT_SPOOL_DIR", str(not_a_directory))
    assert run.run("slurm-jobcomp", _environb(env_of("jobcomp", "with-slurmdbd", JOBNAME="ok"))) == 0
    err = capsys.readouterr().err
    assert "internal error: NotADirectoryError" in err and "could not be kept" in err and err.count("\n") == 1


def test_an_unreadable_config_file_still_keeps_the_input(
    tmp_path: Path, hook_settings: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    broken = tmp_path / "broken.toml"
    broken.write_text("spool_dir = [unclosed\n")
    monkeypatch.setenv("OPENACCT_CONFIG", str(broken))
    assert run.run("slurm-jobcomp", _environb(env_of("jobcomp", "with-slurmdbd", JOBNAME="ok"))) == 0
    ((reason, _),) = rejected(hook_settings)  # in the spool the settings would have named
    assert reason.startswith("slurm-jobcomp: internal error: TOMLDecodeError")
    assert capsys.readouterr().err.count("\n") == 1


# -- the installed command, as slurmctld runs it --------------------------------------------

@dataclass
class HookRun:
    code: int
    err: str


@pytest.fixture
def hook(tmp_path: Path) -> Callable[..., HookRun]:
    """Run ``openacct hook NAME`` with exactly a hook's environment plus where to spool."""
    config = tmp_path / "openacct.toml"
    config.write_text("")
    settings = {"OPENACCT_SPOOL_DIR": str(tmp_path / "spool"), "OPENACCT_CONFIG": str(config)}

    def invoke(name: str, env: dict, **extra: str) -> HookRun:
        if any(isinstance(k, bytes) for k in env):
            env = {**env, **_environb({**settings, **extra})}
        else:
            env = {**env, **settings, **extra}
        done = subprocess.run([str(OPENACCT), "hook", name], env=env, capture_output=True, timeout=60)
        assert b"Traceback" not in done.stderr, done.stderr
        return HookRun(done.returncode, done.stderr.decode())

    return invoke


def test_the_hook_spools_a_valid_event(hook: Callable[..., HookRun], tmp_path: Path) -> None:
    env = env_of("jobcomp", "with-slurmdbd", JOBNAME="fail3")
    assert hook("slurm-jobcomp", env) == HookRun(0, "")
    (event,) = spooled(tmp_path / "spool")
    parsed = parse_event(json.dumps(event))
    assert (parsed.system, parsed.job_id, parsed.state, parsed.exit_code) == ("lab", "3", "FAILED", 3)


def test_without_a_cluster_name_the_hook_uses_default_system(hook: Callable[..., HookRun], tmp_path: Path) -> None:
    env = env_of("jobcomp", "no-slurmdbd", JOBID="12")
    assert hook("slurm-jobcomp", env, OPENACCT_DEFAULT_SYSTEM="cluster1").code == 0
    assert hook("slurm-jobcomp", env, OPENACCT_DEFAULT_SYSTEM="cluster1").code == 0
    first, again = spooled(tmp_path / "spool")
    assert first["system"] == "cluster1" and (first["array_job_id"], first["array_task_id"]) == ("5", 1)
    assert first["event_id"] == again["event_id"]  # a repeated hook is the same event to the charger
    assert parse_event(json.dumps(first)).event_id == first["event_id"]


def test_malformed_input_is_kept_with_its_reason(hook: Callable[..., HookRun], tmp_path: Path) -> None:
    env = env_of("jobcomp", "no-slurmdbd", JOBNAME="ok")
    no_job_id = {k: v for k, v in env.items() if k != "JOBID"}
    outcomes = [hook("slurm-jobcomp", no_job_id), hook("slurm-jobcomp", env)]  # the second: no cluster name

    assert [o.code for o in outcomes] == [0, 0] and spooled(tmp_path / "spool") == []
    reasons = [reason for reason, _ in rejected(tmp_path / "spool")]
    assert reasons == ["slurm-jobcomp: JOBID is missing\n",
                       "slurm-jobcomp: no cluster name: set default_system in the config\n"]
    kept = json.loads(rejected(tmp_path / "spool")[0][1])  # the whole environment, settings included
    assert kept.items() >= no_job_id.items()
    for outcome in outcomes:
        assert outcome.err.startswith("openacct hook slurm-jobcomp: rejected: ") and outcome.err.count("\n") == 1


def test_input_that_is_not_utf8_is_kept_byte_for_byte(hook: Callable[..., HookRun], tmp_path: Path) -> None:
    env = {**_environb(env_of("jobcomp", "with-slurmdbd", JOBNAME="ok")), b"USERNAME": b"r\xffot"}
    outcome = hook("slurm-jobcomp", env)
    assert outcome.code == 0 and "USERNAME is not UTF-8" in outcome.err
    ((reason, raw),) = rejected(tmp_path / "spool")
    assert reason == "slurm-jobcomp: USERNAME is not UTF-8 (bad byte at offset 1)\n"
    assert b"\0USERNAME=r\xffot\0" in raw and b"JOBNAME=ok\0" in raw


@pytest.mark.parametrize("job", [{"SLURM_JOB_NAME": "fail3"}, {"SLURM_JOB_ID": "12"}], ids=["failed", "array-task"])
def test_prolog_then_epilog_give_the_job_its_start(hook: Callable[..., HookRun], tmp_path: Path, job: dict) -> None:
    spool_dir = tmp_path / "spool"
    assert hook("slurm-prologctld", env_of("prologctld", "no-slurmdbd", **job)) == HookRun(0, "")
    state_files = list((spool_dir / ctld_state.STATE).iterdir())
    assert [p.name for p in state_files] == [{"fail3": "lab-3"}.get(job.get("SLURM_JOB_NAME"), "lab-12_1")]
    assert hook("slurm-epilogctld", env_of("epilogctld", "no-slurmdbd", **job)) == HookRun(0, "")

    started, completed = (parse_event(json.dumps(e)) for e in spooled(spool_dir))
    assert (started.kind, completed.kind) == ("job.started", "job.completed")
    assert completed.start_time == started.start_time <= completed.end_time
    assert completed.state == ("FAILED" if "SLURM_JOB_NAME" in job else "COMPLETED")
    assert list((spool_dir / ctld_state.STATE).iterdir()) == []  # forgotten once the job ended


def test_an_epilog_without_its_prolog_is_rejected(hook: Callable[..., HookRun], tmp_path: Path) -> None:
    assert hook("slurm-epilogctld", env_of("epilogctld", "no-slurmdbd", SLURM_JOB_NAME="ok")).code == 0
    ((reason, _),) = rejected(tmp_path / "spool")
    assert reason == ("slurm-epilogctld: no start time for job 1: configure PrologSlurmctld with "
                      "OpenAcct's hook, or use jobcomp/script\n")


def test_the_hook_imports_no_heavy_package(tmp_path: Path) -> None:
    config = tmp_path / "openacct.toml"
    config.write_text(f'spool_dir = "{tmp_path / "spool"}"\n')
    env = {**env_of("jobcomp", "with-slurmdbd", JOBNAME="ok"), "OPENACCT_CONFIG": str(config)}
    done = subprocess.run([sys.executable, "-X", "importtime", str(OPENACCT), "hook", "slurm-jobcomp"],
                          env=env, capture_output=True, text=True, timeout=60)
    imported = {line.rsplit("|", 1)[1].strip().split(".")[0]
                for line in done.stderr.splitlines() if line.startswith("import time:")}
    assert done.returncode == 0 and "openacct" in imported, done.stderr[-2000:]
    assert imported & HEAVY == set()
    assert "json" not in imported  # job_event.encode spares every hook run its import time
    # Nor what reading the receiver's times would cost every hook run (~10 ms: calendar, strptime),
    # nor collections (annotations import it only for type checkers).
    assert imported & {"calendar", "datetime", "_strptime", "re", "locale", "collections", "contextlib", "functools"} == set()
    assert len(spooled(tmp_path / "spool")) == 1


def test_an_unknown_hook_is_a_usage_error(hook: Callable[..., HookRun]) -> None:
    outcome = hook("slurm-jobcompp", {})
    assert outcome.code == 2 and outcome.err.startswith("usage: openacct hook {slurm-jobcomp|")


# -- openacct publish ---------------------------------------------------------------------

@dataclass
class Published:
    code: int
    out: str
    err: str


@pytest.fixture
def publish(hook_settings: Path, monkeypatch: pytest.MonkeyPatch,
            capsys: pytest.CaptureFixture[str]) -> Iterator[Callable[..., Published]]:
    monkeypatch.delenv("OPENACCT_DEBUG", raising=False)

    def invoke(*argv: str) -> Published:
        get_settings.cache_clear()  # the test may have changed the environment since
        code = cli(["publish", *argv])
        out, err = capsys.readouterr()
        assert "Traceback" not in err, err
        return Published(code, out, err)

    yield invoke
    get_settings.cache_clear()


def _jobcomp_event(**match: str) -> dict:
    return slurm.jobcomp_event(env_of("jobcomp", "with-slurmdbd", **match), NOW, None, source="test")


def test_publish_spools_one_event(publish: Callable[..., Published], hook_settings: Path, tmp_path: Path) -> None:
    event = _jobcomp_event(JOBNAME="ok")
    (tmp_path / "event.json").write_text(json.dumps(event, indent=2))  # one document over many lines
    assert publish(str(tmp_path / "event.json")) == Published(0, "spooled 1, rejected 0\n", "")
    assert spooled(hook_settings) == [event]


def test_publish_rejects_bad_lines_and_spools_the_rest(
    publish: Callable[..., Published], hook_settings: Path, tmp_path: Path
) -> None:
    forged = {**_jobcomp_event(JOBNAME="phys"), "job_id": "999"}  # its id no longer matches its job
    lines = [json.dumps(_jobcomp_event(JOBNAME="ok")), "", "{not json", json.dumps(forged),
             json.dumps(_jobcomp_event(JOBNAME="fail3"))]
    (tmp_path / "events.jsonl").write_text("\n".join(lines) + "\n")
    result = publish(str(tmp_path / "events.jsonl"))

    assert (result.code, result.out) == (1, "spooled 2, rejected 2\n")
    errors = result.err.splitlines()
    assert [e.split(":")[0] for e in errors] == ["line 3", "line 4"] and "does not match its job" in errors[1]
    assert [e["job_id"] for e in spooled(hook_settings)] == ["1", "3"]
    assert [raw for _, raw in rejected(hook_settings)] == [lines[2].encode(), lines[3].encode()]


def test_publish_of_json_lines_whose_first_line_is_broken(
    publish: Callable[..., Published], hook_settings: Path, tmp_path: Path
) -> None:
    lines = ["{not json", json.dumps(_jobcomp_event(JOBNAME="ok")), json.dumps(_jobcomp_event(JOBNAME="fail3"))]
    (tmp_path / "events.jsonl").write_text("\n".join(lines))
    result = publish(str(tmp_path / "events.jsonl"))
    assert (result.code, result.out) == (1, "spooled 2, rejected 1\n") and result.err.startswith("line 1: ")


def test_publish_backfills_from_jobcomp_records(
    publish: Callable[..., Published], hook_settings: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("OPENACCT_DEFAULT_SYSTEM", "lab")
    result = publish("--from", "slurm-jobcomp", str(FIXTURE))
    assert result == Published(0, "spooled 24, rejected 0, skipped 88 records of other hooks\n", "")
    events = spooled(hook_settings)
    hook_ids = {slurm.jobcomp_event(r["env"], NOW, "lab")["event_id"] for r in fixture_records("jobcomp")}
    assert {e["event_id"] for e in events} == hook_ids  # the same events the hook writes
    assert {e["source"] for e in events} == {"publish:slurm-jobcomp"}


def test_publish_from_jobcomp_without_a_cluster_name_rejects(
    publish: Callable[..., Published], hook_settings: Path
) -> None:
    result = publish("--from", "slurm-jobcomp", str(FIXTURE))
    assert (result.code, result.out) == (1, "spooled 11, rejected 13, skipped 88 records of other hooks\n")
    assert result.err.splitlines()[0].startswith("line 1: no cluster name: set default_system in the config")


def test_a_rejected_hook_input_can_be_published_once_fixed(
    hook: Callable[..., HookRun], publish: Callable[..., Published], hook_settings: Path,
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    env = env_of("jobcomp", "no-slurmdbd", JOBNAME="fail3")
    assert hook("slurm-jobcomp", env).code == 0  # no cluster name, no default_system: rejected
    ((_, raw),) = rejected(tmp_path / "spool")
    monkeypatch.setenv("OPENACCT_DEFAULT_SYSTEM", "lab")
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(raw)))
    assert publish("--from", "slurm-jobcomp", "-").out == "spooled 1, rejected 0\n"
    assert spooled(hook_settings)[0]["event_id"] == slurm.jobcomp_event(env, NOW, "lab")["event_id"]


def test_publish_spools_a_big_file_in_batches_and_a_pipe_line_by_line_as_it_comes(
    hook_settings: Path, tmp_path: Path
) -> None:
    """One fsync per batch of lines for a file (a backfill); a pipe that has nothing more for now
    does not keep what it sent waiting for a batch to fill."""
    env = {**os.environ, "OPENACCT_SPOOL_DIR": str(hook_settings), "OPENACCT_DEFAULT_SYSTEM": "lab"}
    record = env_of("jobcomp", "with-slurmdbd", JOBNAME="ok")
    lines = [json.dumps({**record, "JOBID": str(10_000 + i)}) + "\n" for i in range(5000)]
    # A file is converted a batch of lines per process, on every core: a bad line in the third
    # batch is named by its own line number, and every other line is spooled.
    bad = lines[4000]
    lines[4000] = json.dumps({**record, "JOBID": "x"}) + "\n"
    (tmp_path / "jobcomp.jsonl").write_text("".join(lines))
    done = subprocess.run([OPENACCT, "publish", "--from", "slurm-jobcomp", str(tmp_path / "jobcomp.jsonl")],
                          env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 1 and done.stdout == "spooled 4999, rejected 1\n", done.stderr
    assert done.stderr.startswith("line 4001: JOBID is 'x'"), done.stderr
    assert sorted(e["job_id"] for e in spooled(hook_settings)) == sorted(str(10_000 + i) for i in range(5000)
                                                                        if i != 4000)
    lines[4000] = bad

    piped = tmp_path / "piped"
    env["OPENACCT_SPOOL_DIR"] = str(piped)
    with subprocess.Popen([OPENACCT, "publish", "--from", "slurm-jobcomp", "-"], env=env, stdin=subprocess.PIPE,
                          stdout=subprocess.PIPE, text=True) as process:
        assert process.stdin is not None
        for i, line in enumerate(lines[:2], 1):
            process.stdin.write(line)
            process.stdin.flush()
            deadline = time.monotonic() + 20
            while len(spooled(piped)) < i and time.monotonic() < deadline:
                time.sleep(0.05)
            assert len(spooled(piped)) == i  # spooled while the pipe stays open
        process.stdin.close()
        assert process.wait(timeout=30) == 0


def test_publish_reads_jobcomp_records_as_json_loads_does_and_takes_numbers_as_text() -> None:
    """A record is read as json.loads reads it, its errors too (word for word), though a line of
    a backfill skips json.loads's preamble; numbers (and JSON's true and false) are taken as text,
    anything else is refused."""
    from openacct.cli.publish import _from_jobcomp

    env = env_of("jobcomp", "with-slurmdbd", JOBNAME="ok")
    as_text = json.loads(_from_jobcomp(json.dumps(env).encode(), "lab"))
    numbers = {k: int(v) if v.isdigit() and k not in ("JOBNAME", "LIMIT") else v for k, v in env.items()}
    assert json.loads(_from_jobcomp(json.dumps(numbers).encode(), "lab"))["event_id"] == as_text["event_id"]
    assert json.loads(_from_jobcomp(json.dumps({**env, "JOBNAME": True}).encode(), "lab"))["name"] == "True"
    assert json.loads(_from_jobcomp(json.dumps({"env": env}).encode("utf-16"), "lab"))["event_id"] == as_text["event_id"]
    for value in (1.5, None, [1], {"a": "b"}):
        with pytest.raises(BadInput, match="^not a jobcomp environment: want a JSON object of variable names"):
            _from_jobcomp(json.dumps({**env, "JOBNAME": value}).encode(), "lab")
    for raw in (b'{"JOBID":"1"}x', b"{", b'{"JOBID":"\xff"}', b'{"a":1} {"b":2}', b"\xff{}", b'{\x00"a"}'):
        try:
            json.loads(raw)
        except (ValueError, RecursionError) as exc:
            expected = f"not JSON: {type(exc).__name__}: {exc}"
        with pytest.raises(BadInput) as refused:
            _from_jobcomp(raw, "lab")
        assert str(refused.value) == expected
    with pytest.raises(BadInput, match="^not JSON: RecursionError: maximum recursion depth exceeded"):
        _from_jobcomp(b'{"a":[' * 100_000, "lab")  # which of object or array it names depends on the stack


def test_publish_of_a_missing_file_is_an_error(publish: Callable[..., Published]) -> None:
    assert publish("/no/such/file") == Published(1, "", "error: cannot read /no/such/file: No such file or directory\n")
