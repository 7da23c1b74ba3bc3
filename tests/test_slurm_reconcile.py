"""``openacct slurm reconcile`` on what a real Slurm 22.05 printed: sacct's records of ended jobs
become the very events the jobcomp hook built for the same jobs, and the ledger is compared
with them.

tests/fixtures/slurm-22.05-sacct.txt is the output of, on a single-node Slurm with slurmdbd::

    TZ=UTC SLURM_TIME_FORMAT=%s sacct -a -X -P -n -D -S ... -E now -s <shared.slurm.sacct.ENDED> -o <FIELDS>

and tests/fixtures/slurm-22.05-sacct-jobcomp.jsonl holds the jobcomp/script environments of the
same jobs, recorded by a hook that saved its environment (completed, failed, array tasks, two
CPUs, a name with a pipe and one with a newline, another user, cancelled pending and running,
timeout, srun, GPUs, and a requeued job, whose first run jobcomp reports as PENDING).
"""

from __future__ import annotations

import datetime as dt
import json
import os
import sys
import time
from decimal import Decimal as D
from pathlib import Path

import pytest
from sqlalchemy import select

from openacct import shortcuts
from services.charger.batch import charge_events
from shared import config, ledger
from shared.db import session_scope
from shared.job_event import encode, job_event
from shared.models import ChargeMultiplier, LedgerTransaction, ParkedEvent
from shared.slurm import records as slurm
from shared.slurm import sacct
from shared.slurm.reconcile import reconcile
from shared.slurm.sacct import FIELDS, parse

FIXTURES = Path(__file__).parent / "fixtures"
SACCT = (FIXTURES / "slurm-22.05-sacct.txt").read_text()
JOBCOMP = [json.loads(line)["env"] for line in (FIXTURES / "slurm-22.05-sacct-jobcomp.jsonl").read_text().splitlines()]
HOOK_ENV = [json.loads(line) for line in (FIXTURES / "slurm-22.05-hook-env.jsonl").read_text().splitlines()]
NOW = int(time.time())
WINDOW = ("--since", "2026-12-04T14:00:00Z", "--until", "2026-12-04T16:00:00Z")


def records() -> list[sacct.Record]:
    found, unreadable = parse(SACCT)
    assert unreadable == []
    return found


def final_jobcomp() -> list[dict[str, str]]:
    return [env for env in JOBCOMP if env["JOBSTATE"] not in ("PENDING", "REQUEUED")]


def same_job(env: dict[str, str]) -> tuple[str, str]:
    return env["JOBID"], env["SUBMIT"]


def without_provenance(event: dict[str, object]) -> dict[str, object]:
    return {k: v for k, v in event.items() if k not in ("source", "emitted_at")}


def test_the_captured_output_reads_as_one_record_per_job_whatever_the_names() -> None:
    found = records()
    assert [r.fields["JobID"] for r in found] == [
        "1", "2", "4", "5", "6", "7", "8", "9", "3_1", "3_2", "3_3", "12", "13", "14", "15", "16"]
    names = {r.fields["JobID"]: r.fields["JobName"] for r in found}
    assert names["5"] == "name|with pipe" and names["16"] == "new\nline"
    assert {r.fields["JobID"]: r.gpus for r in found if r.gpus} == {"13": 2, "14": 1}
    assert {r.state for r in found} == {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT"}


def test_every_ended_job_gives_the_event_its_jobcomp_hook_gave() -> None:
    hook = {same_job(env): slurm.jobcomp_event(env, NOW, None) for env in final_jobcomp()}
    ours = {same_job(r.jobcomp_env()): slurm.jobcomp_event(r.jobcomp_env(), NOW + 60, None, source="slurm-reconcile")
            for r in records()}
    assert set(ours) == set(hook)  # the requeued run is in neither: jobcomp said PENDING, sacct REQUEUED
    for job, event in ours.items():
        assert without_provenance(event) == without_provenance(hook[job]), job
    assert len({e["event_id"] for e in ours.values()}) == len(ours)


def as_sacct_prints(env: dict[str, str]) -> dict[str, str]:
    """A jobcomp environment's job as sacct prints it (observed on the captured pair, and
    checked against it below): array tasks as ARRAY_TASK, and a job that never ran with the one
    node and CPU it asked for, "None assigned" and the partition's limit."""
    ran = bool(env["NODES"])
    array = env["ARRAYTASKID"] != sacct.NO_VAL
    return {
        "JobIDRaw": env["JOBID"], "JobID": f"{env['ARRAYJOBID']}_{env['ARRAYTASKID']}" if array else env["JOBID"],
        "Cluster": env["CLUSTER"], "Submit": env["SUBMIT"], "Start": env["START"], "End": env["END"],
        "State": "CANCELLED by 0" if env["JOBSTATE"] == "CANCELLED" else env["JOBSTATE"],
        "ExitCode": env["EXITCODE"], "User": env["USERNAME"], "Account": env["ACCOUNT"],
        "Partition": env["PARTITION"], "QOS": env["QOS"], "NNodes": env["NODECNT"] if ran else "1",
        "NodeList": env["NODES"] if ran else "None assigned", "AllocCPUS": env["PROCS"] if ran else "1",
        "AllocTRES": f"billing={env['PROCS']},cpu={env['PROCS']},node={env['NODECNT']}" if ran else "",
        "Timelimit": env["LIMIT"] if ran else "Partition_Limit", "JobName": env["JOBNAME"],
    }


def test_the_printing_rules_reproduce_the_captured_sacct_lines() -> None:
    printed = {same_job(env): as_sacct_prints(env) for env in final_jobcomp()}
    for record in records():
        fields = dict(record.fields)
        want = printed[same_job(record.jobcomp_env())]
        if "gres/gpu" in fields["AllocTRES"]:  # jobcomp knows nothing of GPUs
            fields["AllocTRES"] = want["AllocTRES"]
        assert fields == want


@pytest.mark.parametrize("env", [r["env"] for r in HOOK_ENV if r["hook"] == "jobcomp" and r["variant"] == "with-slurmdbd"],
                         ids=lambda env: f"{env['JOBNAME']}-{env['JOBID']}")
def test_the_jobs_of_the_hook_fixture_give_the_hooks_events_too(env: dict[str, str]) -> None:
    line = "|".join(as_sacct_prints(env)[f] for f in FIELDS)
    (record,), _ = parse(line + "\n")
    ours = slurm.jobcomp_event(record.jobcomp_env(), NOW, None, source="slurm-reconcile")
    assert without_provenance(ours) == without_provenance(slurm.jobcomp_event(env, NOW, None))


def test_a_job_name_cannot_forge_a_record() -> None:
    real = records()[0].fields
    forged = "|".join({**real, "JobIDRaw": "99", "JobID": "99", "User": "victim"}[f] for f in FIELDS)
    delimiter = "~5eed~"
    line = delimiter.join({**real, "JobName": f"x\n{forged}"}[f] for f in FIELDS)
    found, unreadable = parse(line + "\n", delimiter)
    assert [(r.fields["JobIDRaw"], r.fields["JobName"]) for r in found] == [("1", f"x\n{forged}")]
    assert unreadable == []


def test_the_never_started_tasks_of_an_array_cancelled_together_are_one_job_that_used_nothing() -> None:
    [pending] = [r for r in records() if r.fields["JobID"] == "6"]  # cancelled while pending
    tasks = sacct.Record({**pending.fields, "JobIDRaw": "40", "JobID": "40_[4-10]"}, 1)
    event = slurm.jobcomp_event(tasks.jobcomp_env(), NOW, None, source="slurm-reconcile")
    assert (event["job_id"], event.get("array_task_id"), event["cpus"]) == ("40", None, 0)
    assert event["start_time"] == event["end_time"]


def test_lines_that_are_no_record_are_reported() -> None:
    found, unreadable = parse("junk\n" + SACCT)
    assert len(found) == 16 and unreadable == ["line 1: not a sacct record of 18 fields: 'junk'"]


def test_the_sacct_command_asks_for_ended_allocations_of_every_user_in_utc() -> None:
    import datetime as dt

    since = dt.datetime(2026, 12, 4, 15, 0, tzinfo=dt.timezone(dt.timedelta(hours=1)))
    args = sacct.command("/usr/bin/sacct", since, since + dt.timedelta(hours=1), "lab", "~d~")
    assert args[:7] == ["/usr/bin/sacct", "-a", "-X", "-P", "-n", "-D", "--delimiter=~d~"]
    assert args[7:11] == ["-S", "2026-12-04T14:00:00", "-E", "2026-12-04T15:00:00"]
    assert "SPECIAL_EXIT" not in args[12] and {"COMPLETED", "CANCELLED", "TIMEOUT"} <= set(args[12].split(","))
    assert args[13:] == ["-M", "lab", "-o", ",".join(FIELDS)]


# -- against the ledger ---------------------------------------------------------------------


@pytest.fixture
def recon(quickstart: None) -> None:
    """The captured cluster beside the quick-start center: core-hours at 0.05; root leads project
    root and is a member of phys; recuser is not known to OpenAcct (so job 7 is parked)."""
    system = shortcuts.create_system("recon")
    service = shortcuts.create_service("recon-core-hours", system=system, units="core-hours", charge_rate="0.05")
    shortcuts.create_user("root")
    shortcuts.create_project("root", pi="root")
    shortcuts.add_user_to_project("root", "phys")
    for project in ("root", "phys"):
        shortcuts.grant_service_access(service, project=project)
        shortcuts.deposit(project, "100", start="2000-01-01")


def hook_raw(env: dict[str, str]) -> bytes:
    return encode(slurm.jobcomp_event(env, NOW, None))


def charge(raws: list[bytes]) -> None:
    with session_scope() as s:
        charge_events(s, [r.decode() for r in raws])


def run_reconcile(publish: bool = True, end_hook: str = "jobcomp") -> tuple[object, list[tuple[str, bytes]]]:
    published: list[tuple[str, bytes]] = []
    with session_scope() as s:
        result = reconcile(s, records(), now=NOW, publish=published.extend if publish else None, end_hook=end_hook)
    return result, published


def by_job(result) -> dict[str, str]:  # type: ignore[no-untyped-def]
    return {f.job: f.status for f in result.findings}


@pytest.mark.usefixtures("recon")
def test_lost_jobs_are_published_once_and_delivered_ones_match() -> None:
    delivered = [env for env in final_jobcomp() if env["JOBID"] in ("1", "2", "10", "6")]
    charge([hook_raw(env) for env in delivered])

    result, published = run_reconcile()
    status = by_job(result)
    assert {j for j, s in status.items() if s == "matches"} == {"1", "2", "3_1", "6"}
    assert {j for j, s in status.items() if s == "published"} == set(status) - {"1", "2", "3_1", "6"}
    hook_ids = {json.loads(hook_raw(env))["event_id"] for env in final_jobcomp()}
    assert {event_id for event_id, _ in published} <= hook_ids  # the hook's own ids
    assert result.reconciled

    charge([raw for _, raw in published])  # as the charger applies them
    again, republished = run_reconcile()
    assert republished == [] and by_job(again)["7"] == "parked"  # recuser is unknown
    assert {s for j, s in by_job(again).items() if j != "7"} == {"matches"}
    assert not again.reconciled and again.counts["parked"] == 1
    with session_scope() as s:
        assert "unknown user 'recuser'" in s.scalar(select(ParkedEvent.reason))
        charged = s.scalars(select(LedgerTransaction.idempotency_key).where(LedgerTransaction.kind == "charge")).all()
    ran = [r for r in records() if r.fields["Start"] != r.fields["End"] and r.fields["User"] == "root"]
    assert sorted(charged) == sorted(f"{json.loads(hook_raw(r.jobcomp_env()))['event_id']}/cpu" for r in ran)


@pytest.mark.usefixtures("recon")
def test_a_job_charged_otherwise_than_sacct_says_is_listed_with_both_amounts_and_not_published() -> None:
    (two,) = [env for env in final_jobcomp() if env["JOBNAME"] == "two"]  # 2 CPUs for 2 s
    charge([hook_raw({**two, "PROCS": "1"})])  # a record that disagrees with sacct
    result, published = run_reconcile()
    (finding,) = [f for f in result.findings if f.job == "4"]
    assert finding.status == "differs" and str(finding.expected) == "0.000056" and str(finding.charged) == "0.000028"
    assert finding.event_id not in {event_id for event_id, _ in published}


@pytest.mark.usefixtures("recon")
def test_a_job_the_ctld_hooks_recorded_by_its_start_is_not_charged_again() -> None:
    (ok,) = [env for env in final_jobcomp() if env["JOBNAME"] == "ok"]
    job = {**slurm.jobcomp_event(ok, NOW, None)}
    keep = ("system", "job_id", "array_job_id", "array_task_id", "name", "user", "account", "partition",
            "node_count", "node_list", "cpus", "state", "exit_code")
    ctld = {k: job[k] for k in keep} | {"qos": None, "start_time": int(ok["START"]) + 1, "end_time": int(ok["END"]) + 1}
    charge([encode(job_event("job.completed", "slurm-epilogctld", NOW, ctld))])
    result, published = run_reconcile()
    assert by_job(result)["1"] == "matches"
    assert json.loads(hook_raw(ok))["event_id"] not in {event_id for event_id, _ in published}


def ctld_events(env: dict[str, str], start_shift: int, end_shift: int) -> tuple[bytes, bytes]:
    """The job.started and job.completed the ctld hooks give the job of jobcomp ``env``, by
    their own clocks, ``start_shift`` and ``end_shift`` seconds off Slurm's."""
    job = slurm.jobcomp_event(env, NOW, None)
    keep = ("system", "job_id", "array_job_id", "array_task_id", "name", "user", "account", "partition",
            "node_count", "node_list", "cpus")
    started = {k: job[k] for k in keep} | {"qos": None, "start_time": int(env["START"]) + start_shift}
    ended = started | {"end_time": int(env["END"]) + end_shift, "state": job["state"], "exit_code": job["exit_code"]}
    return (encode(job_event("job.started", "slurm-prologctld", NOW, started)),
            encode(job_event("job.completed", "slurm-epilogctld", NOW, ended)))


def charges() -> int:
    with session_scope() as s:
        return len(s.scalars(select(LedgerTransaction).where(LedgerTransaction.kind == "charge")).all())


@pytest.mark.usefixtures("recon")
def test_where_the_epilog_reports_ends_a_job_it_has_not_yet_is_published_under_its_id() -> None:
    (two,) = [env for env in final_jobcomp() if env["JOBNAME"] == "two"]
    started, ended = ctld_events(two, 1, 1)
    charge([started])  # the prolog's event is in; the epilog's is still on its way
    result, published = run_reconcile(end_hook="epilogctld")
    assert by_job(result)["4"] == "published"
    [(event_id, raw_event)] = [(i, r) for i, r in published if json.loads(r)["job_id"] == "4"]
    assert event_id == json.loads(ended)["event_id"] != json.loads(hook_raw(two))["event_id"]
    charge([raw_event, ended])  # reconcile's, then the epilog's after all: charged once
    assert charges() == 1


@pytest.mark.usefixtures("recon")
def test_where_jobcomp_reports_ends_a_job_only_its_prolog_recorded_is_published_under_jobcomps_id() -> None:
    (two,) = [env for env in final_jobcomp() if env["JOBNAME"] == "two"]
    started, _ = ctld_events(two, 0, 0)  # PrologSlurmctld beside jobcomp, without admission control
    charge([started])
    result, published = run_reconcile()
    [(event_id, raw_event)] = [(i, r) for i, r in published if json.loads(r)["job_id"] == "4"]
    assert event_id == json.loads(hook_raw(two))["event_id"]
    charge([raw_event, hook_raw(two)])  # reconcile's, then jobcomp's record after all: charged once
    assert charges() == 1


@pytest.mark.usefixtures("recon")
def test_a_prolog_clock_past_saccts_end_is_listed_and_does_not_stop_the_reconcile() -> None:
    (two,) = [env for env in final_jobcomp() if env["JOBNAME"] == "two"]
    late = {**two, "START": str(int(two["END"]) + 30), "END": str(int(two["END"]) + 31)}
    charge([ctld_events(late, 0, 0)[0]])  # the prolog ran 30 s after Slurm says the job ended
    result, published = run_reconcile(end_hook="epilogctld")
    [finding] = [f for f in result.findings if f.job == "4"]
    assert finding.status == "invalid" and "before" in finding.note, finding.note  # for a person to see
    assert len(result.findings) == len(records()) and "4" not in {json.loads(r)["job_id"] for _, r in published}


@pytest.mark.usefixtures("recon")
def test_a_job_the_ctld_hooks_timed_a_few_seconds_off_sacct_matches() -> None:
    (two,) = [env for env in final_jobcomp() if env["JOBNAME"] == "two"]
    charge(list(ctld_events(two, 1, 3)))  # ran 2 s longer by the hooks' clocks
    result, _ = run_reconcile()
    [finding] = [f for f in result.findings if f.job == "4"]
    assert finding.status == "matches" and "ctld hooks' clocks" in finding.note
    assert finding.charged != finding.expected


@pytest.mark.usefixtures("recon")
def test_a_ctld_charge_off_by_more_than_clocks_or_at_another_multiplier_differs() -> None:
    (two,) = [env for env in final_jobcomp() if env["JOBNAME"] == "two"]
    (ok,) = [env for env in final_jobcomp() if env["JOBNAME"] == "ok"]
    charge(list(ctld_events(two, 0, 30)))  # charged 30 s too long
    with session_scope() as s:  # sacct's QoS costs double; the ctld hooks see no QoS
        s.add(ChargeMultiplier(system_id=shortcuts.get_system("recon").id, kind="qos", name="normal", multiplier=D("2")))
    charge(list(ctld_events(ok, 0, 0)))
    result, _ = run_reconcile()
    assert by_job(result)["4"] == by_job(result)["1"] == "differs"


@pytest.mark.usefixtures("recon")
def test_where_gpus_are_charged_a_lost_jobs_gpus_come_from_sacct_and_a_hooks_charge_without_them_differs() -> None:
    gpu_hours = shortcuts.create_service("recon-gpu-hours", system="recon", units="gpu-hours", charge_rate="3.6")
    shortcuts.grant_service_access(gpu_hours, project="root")
    shortcuts.grant_service_access(gpu_hours, project="phys")
    (gpu1,) = [env for env in final_jobcomp() if env["JOBNAME"] == "gpu1"]
    charge([hook_raw(gpu1)])  # jobcomp's record alone: no GPUs in it, and no prolog recorded any
    result, published = run_reconcile()
    [lost] = [json.loads(r) for _, r in published if json.loads(r)["job_id"] == "13"]
    assert lost["gpus"] == 2 and lost["event_id"] == json.loads(hook_raw(
        next(env for env in final_jobcomp() if env["JOBNAME"] == "gpu2")))["event_id"]
    [short] = [f for f in result.findings if f.job == "14"]
    assert short.status == "differs" and short.expected_quantity["gpu"] == D("0.000278")
    assert "gpu" not in short.charged_quantity


@pytest.mark.usefixtures("recon")
def test_a_dry_run_publishes_nothing() -> None:
    result, published = run_reconcile(publish=False)
    assert published == [] and result.counts["missing"] == 16 and not result.reconciled


# -- the command ----------------------------------------------------------------------------


@pytest.fixture
def captured_sacct(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An sacct on PATH that prints the captured output, with the delimiter it is asked for
    (for the command's own handling: the live tier runs the real one)."""
    script = tmp_path / "bin" / "sacct"
    script.parent.mkdir()
    script.write_text(f"""#!{sys.executable}
import sys
delimiter = next(a.split("=", 1)[1] for a in sys.argv if a.startswith("--delimiter="))
for line in open({str(FIXTURES / "slurm-22.05-sacct.txt")!r}).read().split("\\n"):
    sys.stdout.write(line.replace("|", delimiter, {len(FIELDS) - 1}) + "\\n" if line else "")
""")
    script.chmod(0o755)
    monkeypatch.setenv("PATH", f"{script.parent}:{os.environ['PATH']}")
    return script


@pytest.mark.usefixtures("recon", "captured_sacct")
def test_the_command_publishes_the_missing_to_the_spool_and_says_so(cli, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    from shared import spool
    from shared.config import get_settings

    dry = cli("slurm", "reconcile", *WINDOW, "--dry-run", "--json")
    assert dry.code == 1 and dry.json()["counts"]["missing"] == 16 and dry.json()["counts"]["published"] == 0
    assert spool.pending_events(get_settings().spool_path) == []

    done = cli("slurm", "reconcile", *WINDOW, "--json")
    assert done.code == 0, done.err
    report = done.json()
    assert report["counts"]["published"] == 16 and report["not_ended"] == 0
    spooled = {json.loads(e)["event_id"] for e in spool.pending_events(get_settings().spool_path)}
    assert spooled == {j["event_id"] for j in report["jobs"]}
    table = cli("slurm", "reconcile", *WINDOW, "--dry-run")
    assert "missing" in table.out and "16 missing jobs would be published (dry run)" in table.out


@pytest.mark.usefixtures("recon")
@pytest.mark.parametrize(("args", "code", "message"), [
    (("--since", "yesterday"), 1, "error: --since 'yesterday' is not a date or time"),
    (("--since", "2026-12-04", "--until", "2026-12-03"), 1, "error: --until 2026-12-03T00:00:00+00:00 is not after --since"),
    (("--since", "2026-12-04", "--cluster", "-M"), 1, "error: --cluster '-M' is not a Slurm cluster name"),
    (("--since", "2026-12-04", "--end-hook", "epilog"), 1, "error: --end-hook 'epilog' is not jobcomp or epilogctld"),
    ((), 2, "Missing option '--since'"),
])
def test_bad_input_is_one_line(cli, args: tuple[str, ...], code: int, message: str) -> None:  # type: ignore[no-untyped-def]
    result = cli("slurm", "reconcile", *args)
    assert result.code == code and message in result.err
    if code == 1:
        assert len(result.err.strip().splitlines()) == 1


@pytest.mark.usefixtures("recon")
def test_without_sacct_the_command_says_so(cli, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:  # type: ignore[no-untyped-def]
    monkeypatch.setenv("PATH", str(tmp_path))
    settings = config.get_settings().model_copy(update={"slurm_bin_dir": str(tmp_path)})
    monkeypatch.setattr(config, "get_settings", lambda: settings)
    result = cli("slurm", "reconcile", "--since", "2026-12-04")
    assert result.code == 3 and result.err.strip() == (
        f"error: sacct is neither on PATH nor in slurm_bin_dir ({tmp_path}): run this where Slurm's client "
        "tools are and slurmdbd answers")


@pytest.mark.usefixtures("recon")
def test_a_failing_sacct_is_one_line_with_its_reason(cli, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:  # type: ignore[no-untyped-def]
    script = tmp_path / "sacct"
    script.write_text("#!/bin/sh\necho 'sacct: error: Sending PersistInit msg: Connection refused' >&2\n"
                      "echo 'sacct: error: Problem talking to the database: Connection refused' >&2\nexit 1\n")
    script.chmod(0o755)
    monkeypatch.setenv("PATH", f"{tmp_path}:{os.environ['PATH']}")
    result = cli("slurm", "reconcile", "--since", "2026-12-04")
    assert result.code == 3 and result.err.strip() == (
        "error: sacct failed (exit 1): sacct: error: Problem talking to the database: Connection refused")


@pytest.mark.parametrize(("setting", "entry", "task"), [
    ("reconcile_schedule", "slurm-reconcile", "reporter.reconcile"),
    ("slurm_limits_schedule", "slurm-limits", "reporter.slurm_limits"),
])
def test_the_beat_runs_slurms_tasks_only_when_scheduled(setting: str, entry: str, task: str) -> None:
    from celery import Celery

    from shared.celery_app import configure
    from shared.config import Settings

    off, on = Celery("off"), Celery("on")
    configure(off, Settings(broker_url="redis://localhost:1/0"))
    configure(on, Settings(broker_url="redis://localhost:1/0", **{setting: "*/30 * * * *"}))
    assert entry not in off.conf.beat_schedule
    scheduled = on.conf.beat_schedule[entry]
    assert scheduled["task"] == task and scheduled["options"]["queue"] == "reporter"
    assert str(scheduled["schedule"].minute) == "{0, 30}"


@pytest.mark.usefixtures("recon")
def test_where_the_epilog_reports_ends_a_job_admission_recorded_with_its_submit_time_is_charged_once() -> None:
    """Admission control's prolog records the job under its real submit time (from squeue), and
    the epilog's event finds that row by its start: reconcile publishes under the epilog's id."""
    from shared.jobs import upsert_jobs

    (two,) = [env for env in final_jobcomp() if env["JOBNAME"] == "two"]
    _, ended = ctld_events(two, 1, 1)
    with session_scope() as s:
        system = shortcuts.get_system("recon").id
        upsert_jobs(s, [{"system_id": system, "job_id": "4", "array_task_id": None, "het_offset": None,
                         "submit_time": dt.datetime.fromtimestamp(int(two["SUBMIT"]), dt.UTC),
                         "start_time": dt.datetime.fromtimestamp(int(two["START"]) + 1, dt.UTC),
                         "user_id": shortcuts.get_user("root").id, "account_id": shortcuts.get_account("root").id,
                         "state": "RUNNING", "cpus": 2}])
    result, published = run_reconcile(end_hook="epilogctld")
    assert by_job(result)["4"] == "published"
    [(event_id, raw_event)] = [(i, r) for i, r in published if json.loads(r)["job_id"] == "4"]
    assert event_id == json.loads(ended)["event_id"]  # not jobcomp's: the epilog's may still come
    charge([raw_event, ended])  # reconcile's, then the epilog's own: one charge, one job row
    assert charges() == 1
    with session_scope() as s:
        assert ledger.verify(s) == []


def test_sacct_is_asked_one_bounded_window_at_a_time_and_never_for_a_list_of_jobs(
    captured_sacct: Path, tmp_path: Path
) -> None:
    """slurmdbd answers a short window at once; a long job id list has held it for minutes."""
    calls = tmp_path / "calls"
    text = captured_sacct.read_text().replace(
        "import sys\n", f"import sys\nopen({str(calls)!r}, 'a').write(' '.join(sys.argv[1:]) + '\\n')\n", 1)
    captured_sacct.write_text(text)
    since = dt.datetime(2026, 12, 4, 12, tzinfo=dt.UTC)
    found, _ = sacct.query(since, since + dt.timedelta(hours=4, minutes=30), None)
    asked = [line.split() for line in calls.read_text().splitlines()]
    windows = [(args[args.index("-S") + 1], args[args.index("-E") + 1]) for args in asked]
    assert windows == [("2026-12-04T11:59:59", "2026-12-04T13:00:01"), ("2026-12-04T12:59:59", "2026-12-04T14:00:01"),
                       ("2026-12-04T13:59:59", "2026-12-04T15:00:01"), ("2026-12-04T14:59:59", "2026-12-04T16:00:01"),
                       ("2026-12-04T15:59:59", "2026-12-04T16:30:01")]
    assert not any(flag in args for args in asked for flag in ("-j", "--jobs"))
    # Every captured job ended in the span, each once however
    # many windows printed it.
    once, _ = sacct.query(since, since + dt.timedelta(hours=4, minutes=30), None, window=dt.timedelta(days=1))
    assert len(found) == 16 and sorted(r.line for r in found) == sorted(r.line for r in once)
    assert len(found) == len(set(
        (r.fields["JobIDRaw"], r.fields["Submit"]) for r in found))
