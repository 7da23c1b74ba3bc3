"""The receiver of Slurm's jobcomp/elasticsearch plugin (``openacct receive slurm-elasticsearch``),
fed the records a real Slurm 22.05 POSTed (tests/fixtures/slurm-22.05-jobcomp-elasticsearch.jsonl):
what it answers (Slurm keeps a record unless told 200/201), what it spools, what it never keeps,
and whom it listens to. tests/slurm/test_receiver_slurm.py runs it under a live slurmctld."""

from __future__ import annotations

import base64
import calendar
import http.client
import json
import os
import time
from collections.abc import Iterator
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import Engine, select
from sqlalchemy.orm import Session

from shared import db, spool
from shared.event_id import job_event_id
from shared.job_event import BadInput
from shared.models import Job, LedgerTransaction, Service
from shared.slurm import values
from shared.slurm.records import elasticsearch_event, jobcomp_event
from tests.pipeline import Process, RedisServer, free_port, wait_for

FIXTURE = Path(__file__).parent / "fixtures" / "slurm-22.05-jobcomp-elasticsearch.jsonl"
RECORDS = [json.loads(line) for line in FIXTURE.read_text().splitlines()]
SCRIPT_TEXT = "This script was created by sbatch"  # in every recorded record's script


def utc(text: str) -> int:
    return calendar.timegm(time.strptime(text, "%Y-%m-%dT%H:%M:%S"))


def test_a_recorded_record_is_the_event_jobcomp_script_gives_for_the_same_job() -> None:
    record = RECORDS[0]  # job 1: COMPLETED, 2 CPUs, account phys
    as_jobcomp = {"JOBID": "1", "ARRAYJOBID": "0", "ARRAYTASKID": "4294967294", "USERNAME": "root",
                  "ACCOUNT": "phys", "PARTITION": "debug", "JOBNAME": "wrap", "JOBSTATE": "COMPLETED",
                  "EXITCODE": "0:0", "SUBMIT": str(utc("2026-12-06T07:54:46")),
                  "START": str(utc("2026-12-06T07:54:46")), "END": str(utc("2026-12-06T07:54:49")),
                  "NODECNT": "1", "PROCS": "2", "NODES": "vm", "LIMIT": "525600"}
    now = int(time.time())
    event = elasticsearch_event(record, "lab", now)
    assert event == {**jobcomp_event(as_jobcomp, now, "lab"), "source": "slurm-elasticsearch"}
    assert event["start_time"] == "2026-12-06T07:54:46+00:00"  # UTC, as the plugin's gmtime_r wrote it
    assert event["cpus"] == 2 and event["account"] == "phys" and "gpus" not in event


@pytest.mark.parametrize("record", RECORDS, ids=[f"job{r['jobid']}" for r in RECORDS])
def test_every_recorded_record_keeps_its_job_state_and_times(record: dict[str, Any]) -> None:
    event = elasticsearch_event(record, "lab", int(time.time()))
    assert event["event_id"] == job_event_id("job.completed", "lab", str(record["jobid"]), None, None,
                                             utc(record["@submit"]), utc(record["@start"]))
    assert event["state"] == record["state"]
    assert event["exit_code"] == int(record["exit_code"].split(":")[0])
    assert event["account"] == record.get("account")  # job 2 named none
    assert event["cpus"] == record["total_cpus"]


def test_the_plugins_times_are_read_as_utc_whatever_the_date() -> None:
    """The hook side reads them without calendar or strptime (their imports cost each hook run
    ~10 ms): checked against calendar.timegm over dates from 1970 to 2128, leap days included."""
    import random

    rng = random.Random(15)
    moments = [rng.randrange(0, 5_000_000_000) for _ in range(20_000)] + [
        utc("2024-02-29T23:59:59"), utc("2000-02-29T00:00:00"), utc("2100-03-01T00:00:00"), 1]
    for moment in moments:
        text = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(moment))
        event = elasticsearch_event({**RECORDS[0], "@submit": text, "@start": text, "@end": text}, "lab", 0)
        assert event["start_time"] == time.strftime("%Y-%m-%dT%H:%M:%S+00:00", time.gmtime(moment))
    for wrong in ("2026-02-29T00:00:00", "2100-02-29T00:00:00", "2026-13-01T00:00:00", "2026-12-06T24:00:00",
                  "2026-12-06 07:54:46", "1969-12-31T23:59:59", "2026-12-06T07:54:4x"):
        with pytest.raises(BadInput, match="not a time"):
            elasticsearch_event({**RECORDS[0], "@end": wrong}, "lab", 0)


def test_array_tasks_cancelled_pending_jobs_and_a_cluster_name_are_read_as_slurm_means_them() -> None:
    base = {**RECORDS[2], "array_job_id": 40, "array_task_id": 3, "jobid": 43}
    task = elasticsearch_event(base, "lab", 0)
    assert (task["job_id"], task["array_job_id"], task["array_task_id"]) == ("43", "40", 3)
    pending = {**RECORDS[2], "@start": "Unknown", "elapsed": 0, "total_cpus": 0, "state": "CANCELLED"}
    cancelled = elasticsearch_event(pending, "lab", 0)
    assert cancelled["start_time"] is None and cancelled["state"] == "CANCELLED"
    assert elasticsearch_event({**RECORDS[2], "cluster": "lab"}, "lab", 0)["system"] == "lab"
    with pytest.raises(BadInput, match="cluster 'other'"):
        elasticsearch_event({**RECORDS[2], "cluster": "other"}, "lab", 0)
    for field, value in [("jobid", "x"), ("jobid", 1.5), ("@end", "2026-12-06 07:56:10"), ("@end", 0),
                         ("total_cpus", [1]), ("tres_alloc", 3)]:
        with pytest.raises(BadInput):
            elasticsearch_event({**RECORDS[2], field: value}, "lab", 0)


@pytest.mark.parametrize(("tres", "gpus"), [
    ("cpu=2,node=1,billing=2", None),
    ("cpu=8,mem=64G,node=1,billing=8,gres/gpu=2", 2),
    ("cpu=8,node=1,billing=8,gres/gpu:a100=2,gres/gpu=2", 2),  # typed and the total: the total
    ("cpu=8,node=2,gres/gpu:a100=2,gres/gpu:v100=1", 3),  # typed only: their sum
    ("cpu=1,gres/gpumem=40G,gres/gpu=1", 1),  # another GRES that starts alike is not a GPU count
    (None, None),
])
def test_gpus_are_read_from_slurms_tres(tres: str | None, gpus: int | None) -> None:
    assert values.gpus(tres) == gpus


def test_an_unreadable_gpu_count_is_refused() -> None:
    with pytest.raises(BadInput, match="gres/gpu"):
        values.gpus("cpu=1,gres/gpu=two")


class Receiver:
    """``openacct receive slurm-elasticsearch`` as a process of its own."""

    def __init__(self, tmp_path: Path, *args: str, env: dict[str, str] | None = None) -> None:
        tmp_path.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        self.spool = tmp_path / "spool"
        self.env = {**os.environ, "OPENACCT_SPOOL_DIR": str(self.spool), **(env or {})}
        self.process = Process(["receive", "slurm-elasticsearch", "--listen", f"127.0.0.1:{self.port}", *args],
                               self.env, tmp_path / f"receiver-{self.port}.log")

    def start(self) -> Receiver:
        self.process.start()
        wait_for(lambda: "listening on" in self.process.log.read_text(), 20, "the receiver to listen")
        return self

    def get(self, path: str) -> int:
        connection = http.client.HTTPConnection("127.0.0.1", self.port, timeout=10)
        try:
            connection.request("GET", path)
            return connection.getresponse().status
        finally:
            connection.close()

    def post(self, record: object, path: str = "/lab", headers: dict[str, str] | None = None) -> tuple[int, str]:
        body = record if isinstance(record, bytes) else json.dumps(record).encode()
        connection = http.client.HTTPConnection("127.0.0.1", self.port, timeout=10)
        try:
            connection.request("POST", path, body, {"Content-Type": "application/json", **(headers or {})})
            response = connection.getresponse()
            return response.status, response.read().decode()
        finally:
            connection.close()

    def spooled(self) -> list[dict[str, Any]]:
        return [json.loads(e) for e in spool.pending_events(self.spool)]

    def everything_kept(self) -> bytes:
        return b"".join(p.read_bytes() for p in self.spool.rglob("*") if p.is_file())

    def stop(self) -> None:
        self.process.stop()


@pytest.fixture
def receiver(tmp_path: Path) -> Iterator[Receiver]:
    server = Receiver(tmp_path).start()
    yield server
    server.stop()


def test_each_record_is_spooled_before_it_is_acknowledged_and_its_script_is_never_kept(receiver: Receiver) -> None:
    for record in RECORDS:
        status, body = receiver.post(record)
        assert status == 201, body  # jobcomp_elasticsearch.c: 200 or 201 drops the record
    events = receiver.spooled()
    assert [e["job_id"] for e in events] == ["1", "2", "3", "4"]
    assert {e["source"] for e in events} == {"slurm-elasticsearch"}
    assert SCRIPT_TEXT.encode() not in receiver.everything_kept()
    # Slurm sends a record again when an answer was lost: the same event, which the charger
    # takes once (its inbox is keyed by the event id).
    assert receiver.post(RECORDS[0])[0] == 201
    assert [e["event_id"] for e in receiver.spooled()].count(events[0]["event_id"]) == 2


def test_a_record_that_can_never_be_an_event_is_kept_for_a_person_without_its_script(receiver: Receiver) -> None:
    status, body = receiver.post({**RECORDS[0], "jobid": "x"})
    assert status == 201 and "rejected" in body  # taken: sending it again every 30 s changes nothing
    assert receiver.post({**RECORDS[0], "username": "b\udce9b"})[0] == 201  # Latin-1 where the charge depends on it
    assert receiver.spooled() == []
    reasons = sorted(p.read_text() for p in (receiver.spool / "reject").glob("*.reason"))
    assert len(reasons) == 2 and "JOBID is 'x'" in reasons[0] and "USERNAME" in reasons[1]
    kept = b"".join(p.read_bytes() for p in (receiver.spool / "reject").glob("*.raw"))
    assert b'"jobid": "x"' in kept and b'"username": "b\xe9b"' in kept  # the bytes as Slurm sent them
    assert SCRIPT_TEXT.encode() not in receiver.everything_kept()


def test_latin_1_bytes_in_a_jobs_name_or_script_do_not_cost_its_charge(receiver: Receiver) -> None:
    """Slurm's JSON writer copies bytes above 0x7f as they are: a user must not dodge a charge
    with a job name or a script comment in Latin-1."""
    body = json.dumps({**RECORDS[0], "job_name": "caf\udce9", "script": "#!/bin/sh\n# caf\udce9\n"},
                      ensure_ascii=False).encode("utf-8", "surrogateescape")
    assert b"caf\xe9" in body  # not UTF-8
    status, result = receiver.post(body)
    assert status == 201 and result.startswith('{"status": 201, "result": "job.completed:'), result
    (event,) = receiver.spooled()
    assert event["job_id"] == "1" and event["name"] == "caf\ufffd"


def test_what_is_not_json_from_slurm_is_refused_so_that_slurm_keeps_it(receiver: Receiver) -> None:
    assert receiver.post(b"\x00 not json " + SCRIPT_TEXT.encode())[0] == 400
    assert receiver.post([RECORDS[0]])[0] == 400
    assert receiver.everything_kept() == b""  # nothing spooled, nothing of the script kept


def test_what_the_receiver_cannot_take_is_refused_so_that_slurm_keeps_it(receiver: Receiver) -> None:
    # The URL of another system than the record's cluster: a slurm.conf to fix; Slurm keeps the record.
    status, body = receiver.post({**RECORDS[0], "cluster": "other"})
    assert status == 421 and "cluster 'other'" in body
    assert receiver.post(RECORDS[0], path="/slurm/jobcomp")[0] == 404  # the path must name the system
    assert receiver.post(RECORDS[0], path="/")[0] == 404
    assert receiver.post(RECORDS[0], path="/bad%20name")[0] == 404
    # A spool that cannot be written (its log is a directory): 503, and nothing is lost.
    log = receiver.spool / "log" / "current"
    log.unlink(missing_ok=True)
    log.mkdir()
    status, _ = receiver.post(RECORDS[1])
    assert status == 503
    log.rmdir()
    assert receiver.post(RECORDS[1])[0] == 201
    assert [e["job_id"] for e in receiver.spooled()] == ["2"]


def test_only_allowed_clients_with_the_credentials_are_heard(tmp_path: Path) -> None:
    elsewhere = Receiver(tmp_path / "a", "--allow", "10.0.0.0/8").start()
    try:
        with pytest.raises(OSError):  # loopback is not 10.0.0.0/8: closed before a word is read
            elsewhere.post(RECORDS[0])
        assert elsewhere.spooled() == []
    finally:
        elsewhere.stop()

    secret = tmp_path / "credentials"
    secret.write_text("slurm:s3cret\n")
    secret.chmod(0o600)
    guarded = Receiver(tmp_path / "b", "--credentials-file", str(secret)).start()
    try:
        assert guarded.get("/") == 401

        def basic(credentials: str) -> dict[str, str]:
            return {"Authorization": "Basic " + base64.b64encode(credentials.encode()).decode()}

        assert guarded.post(RECORDS[0])[0] == 401
        assert guarded.post(RECORDS[0], headers=basic("slurm:wrong"))[0] == 401
        assert guarded.post(RECORDS[0], headers=basic("slurm:s3cret"))[0] == 201  # libcurl's, from the URL
        assert [e["job_id"] for e in guarded.spooled()] == ["1"]
    finally:
        guarded.stop()
    assert "s3cret" not in (tmp_path / "b" / f"receiver-{guarded.port}.log").read_text()


def test_connections_past_the_cap_and_chunked_bodies_are_refused(receiver: Receiver) -> None:
    import socket

    from shared.slurm.receiver import MAX_CONNECTIONS

    idle = [socket.create_connection(("127.0.0.1", receiver.port)) for _ in range(MAX_CONNECTIONS)]
    try:
        time.sleep(0.5)  # every one accepted and waiting on its request
        with pytest.raises(OSError):
            receiver.post(RECORDS[0])
    finally:
        for connection in idle:
            connection.close()
    def taken() -> bool:
        try:
            return receiver.post(RECORDS[0])[0] == 201
        except OSError:  # refused while the idle ones' threads were still ending
            return False

    wait_for(taken, 10, "a connection to be free again")
    connection = http.client.HTTPConnection("127.0.0.1", receiver.port, timeout=10)
    connection.putrequest("POST", "/lab")
    connection.putheader("Transfer-Encoding", "chunked")
    connection.endheaders()
    connection.send(b"5\r\nhello\r\n0\r\n\r\n")
    assert connection.getresponse().status == 501
    connection.close()
    # On any path: a chunked body left unread would be read as the next request.
    connection = http.client.HTTPConnection("127.0.0.1", receiver.port, timeout=10)
    connection.putrequest("POST", "/no/such/path")
    connection.putheader("Transfer-Encoding", "chunked")
    connection.endheaders()
    connection.send(b"5\r\nhello\r\n0\r\n\r\n")
    response = connection.getresponse()
    assert response.status == 501 and response.getheader("Connection") == "close"
    connection.close()
    assert [e["job_id"] for e in receiver.spooled()] == ["1"]


def test_the_receiver_refuses_to_start_unguarded(tmp_path: Path, cli: Any) -> None:
    open_to_all = cli("receive", "slurm-elasticsearch", "--listen", "0.0.0.0:9200")
    assert open_to_all.code == 1 and "--allow" in open_to_all.err
    readable = tmp_path / "credentials"
    readable.write_text("slurm:s3cret\n")
    readable.chmod(0o644)
    result = cli("receive", "slurm-elasticsearch", "--credentials-file", str(readable))
    assert result.code == 1 and "chmod 600" in result.err
    readable.chmod(0o600)
    readable.write_text("no colon\n")
    result = cli("receive", "slurm-elasticsearch", "--credentials-file", str(readable))
    assert result.code == 1 and "USER:PASSWORD" in result.err
    result = cli("receive", "slurm-elasticsearch", "--allow", "10.0.0.0/33")
    assert result.code == 1 and "'10.0.0.0/33' is not an IP address or CIDR network" in result.err


def test_a_gpu_job_reported_by_the_plugin_is_charged_gpu_hours_without_admission_control(
    center: Engine, tmp_path: Path
) -> None:
    from openacct import shortcuts

    with db.session_scope():
        gpu = shortcuts.create_service("cluster-gpu-hours", system="cluster", units="gpu-hours", charge_rate="2.5")
        shortcuts.grant_service_access(gpu, project="phys")
    redis = RedisServer(tmp_path / "redis")
    redis.start()
    receiver = Receiver(tmp_path, env={"OPENACCT_BROKER_URL": redis.url, "OPENACCT_BROKER_VISIBILITY_TIMEOUT": "10"})
    pipeline = [Process(["worker", "charger", "-c", "1"], receiver.env, tmp_path / "worker.log"),
                Process(["relay"], receiver.env, tmp_path / "relay.log")]
    # Job 1 as recorded, but tux's, an hour long, on a node with GPUs: 2 CPUs and 2 typed A100s.
    record = {**RECORDS[0], "username": "tux", "@start": "2026-12-06T06:54:49", "@submit": "2026-12-06T06:54:40",
              "elapsed": 3600, "tres_alloc": "cpu=2,node=1,billing=2,gres/gpu:a100=2,gres/gpu=2"}
    try:
        receiver.start()
        for process in pipeline:
            process.start()
        assert receiver.post(record, path="/cluster")[0] == 201
        assert receiver.post(record, path="/cluster")[0] == 201  # sent twice: charged once

        def charged() -> list[tuple[str, Decimal, Decimal]]:
            with Session(center) as s:
                rows = s.execute(select(Service.name, LedgerTransaction.quantity, LedgerTransaction.amount)
                                 .join(Service, Service.id == LedgerTransaction.service_id)
                                 .where(LedgerTransaction.kind == "charge")).all()
                return sorted(tuple(row) for row in rows)

        wait_for(lambda: len(charged()) == 2 and spool.backlog(receiver.spool)[0] == 0, 60,
                 "the job's core-hours and GPU-hours to be charged")
        time.sleep(1)  # room for the repeat to arrive and be dropped
    finally:
        for process in pipeline:
            process.stop()
        receiver.stop()
        redis.stop()
    assert charged() == [("cluster-core-hours", Decimal(2), Decimal("0.1")),  # 2 CPUs x 1 h x 0.05
                         ("cluster-gpu-hours", Decimal(2), Decimal("5"))]  # 2 GPUs x 1 h x 2.5
    with Session(center) as s:
        job = s.scalar(select(Job).where(Job.job_id == "1"))
        assert job is not None and job.gpus == 2


def test_the_receiver_needs_no_database_driver_nor_celery() -> None:
    """It runs beside slurmctld, where OpenAcct's heavier dependencies need not be importable."""
    import subprocess
    import sys

    done = subprocess.run([sys.executable, "-X", "importtime", "-c", "import shared.slurm.receiver"],
                          capture_output=True, text=True, timeout=60)
    imported = {line.rsplit("|", 1)[1].strip().split(".")[0]
                for line in done.stderr.splitlines() if line.startswith("import time:")}
    assert done.returncode == 0 and "shared" in imported, done.stderr[-2000:]
    assert imported & {"pydantic", "sqlalchemy", "celery", "kombu", "typer", "psycopg"} == set()


def test_a_backfill_of_recorded_records_gives_the_events_the_receiver_gives(tmp_path: Path) -> None:
    """``openacct publish --from slurm-elasticsearch``: records kept in an Elasticsearch index
    (as its documents, {"_source": ...}) or in the receiver's reject/, once fixed."""
    import subprocess

    from tests.pipeline import OPENACCT

    documents = tmp_path / "index.jsonl"
    documents.write_text("".join(json.dumps({"_index": "slurm", "_source": r}) + "\n" for r in RECORDS))
    env = {**os.environ, "OPENACCT_SPOOL_DIR": str(tmp_path / "spool"), "OPENACCT_DEFAULT_SYSTEM": "lab"}
    done = subprocess.run([OPENACCT, "publish", "--from", "slurm-elasticsearch", str(documents)], env=env,
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0 and "spooled 4, rejected 0" in done.stdout, done.stderr
    published = [json.loads(e) for e in spool.pending_events(tmp_path / "spool")]
    assert [e["event_id"] for e in published] == [elasticsearch_event(r, "lab", 0)["event_id"] for r in RECORDS]
    assert {e["source"] for e in published} == {"publish:slurm-elasticsearch"}
    assert SCRIPT_TEXT.encode() not in (tmp_path / "spool" / "log" / "current").read_bytes()
