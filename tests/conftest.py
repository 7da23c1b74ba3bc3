"""Test harness: one real PostgreSQL database per run, migrated once; each test in a transaction
rolled back at its end (``db``), or, where a test needs real commits seen by other processes,
a database emptied after it (``committed``).

With ``OPENACCT_DATABASE_URL`` set, the run creates (and drops) a fresh database on that server;
without it, an embedded PostgreSQL is started in a temporary directory. No server outlives the
run: see ``no_server_outlives_the_run``.
"""

from __future__ import annotations

import functools
import json
import os
import re
import shutil
import signal
import tempfile
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psycopg
import pytest
from sqlalchemy import Connection, Engine, create_engine, make_url, text

from shared import config, db, local_instance
from shared.databases import ensure_database
from shared.migrate import upgrade
from shared.models import Base

QUICKSTART = Path(__file__).parents[1] / "examples" / "quickstart.py"
# The run never touches the caller's data directory (their local instance): importing a worker's
# tasks module while the tests are collected configures Celery, which starts the local Redis
# wherever no broker is set. Everything of the run's own goes here, and is stopped and removed.
RUN_DATA = Path(tempfile.mkdtemp(prefix="openacct-tests-"))
os.environ["OPENACCT_DATA_DIR"] = str(RUN_DATA)


# --------------------------------------------------------------------------- machine_servers
# .ci/run runs make test twice: on embedded servers (pass 1), then on the machine's (pass 2,
# make test-machine), where Slurm's packages are installed. Pass 2 runs exactly the tests whose
# outcome can depend on what differs there, marked machine_servers here and nowhere else:
#  - every test on the database (the database_url fixture, directly or through another): the
#    machine's PostgreSQL is another major version (Debian's 15, the oldest docs/deploy.md
#    supports; the embedded one is 18), a server reached over TCP, where roles are the cluster's;
#  - every test in a module that names RabbitMQ's URL (OPENACCT_TEST_AMQP_URL: its broker
#    variant runs only where that is set) or a Slurm or MUNGE tool, which pass 2 finds installed.
# Every other test runs on the same embedded Redis, the same files and the same Python in both
# passes: pass 1 is its run. A test that depends on the machine another way must say so with
# @pytest.mark.machine_servers.
MACHINE_SERVER_FIXTURES = frozenset({"database_url"})
# The tools OpenAcct runs (shared/slurm, openacct/api/munge.py), and where it looks for Slurm's.
MACHINE_SERVER_WORDS = re.compile(r"\b(OPENACCT_TEST_AMQP_URL|sacct|sacctmgr|squeue|scontrol|munge|unmunge|munged"
                                  r"|slurm_bin_dir|OPENACCT_SLURM_BIN_DIR)\b", re.IGNORECASE)


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "machine_servers: its outcome can depend on the machine's servers or "
                                       "Slurm's packages (set in tests/conftest.py; make test-machine runs these)")


@functools.cache
def _names_a_machine_tool(module: Path) -> bool:
    return MACHINE_SERVER_WORDS.search(module.read_text(errors="replace")) is not None


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if (MACHINE_SERVER_FIXTURES & set(getattr(item, "fixturenames", ()))
                or (item.path.suffix == ".py" and _names_a_machine_tool(item.path))):
            item.add_marker(pytest.mark.machine_servers)


def _server_url(tmp_root: Path) -> str:
    given = os.environ.get("OPENACCT_DATABASE_URL")
    if given:
        return given
    return local_instance.database_url(tmp_root, "postgres")


@pytest.fixture(scope="session", autouse=True)
def no_server_outlives_the_run(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """Embedded servers stay up after the command that started them (shared/local_instance): the
    run stops those it started, every one under its temporary directories (the database above,
    any a command under test started in a data directory of its own, and what collecting the
    tests started under RUN_DATA), their files deleted. Set up first, this is torn down last,
    after the database is dropped; a SIGTERM (a CI timeout) ends the run as Ctrl-C does, through
    the teardown."""
    previous = signal.signal(signal.SIGTERM, _interrupt_the_run(os.getpid()))
    yield
    signal.signal(signal.SIGTERM, previous)
    for root in (tmp_path_factory.getbasetemp(), RUN_DATA):
        for state in root.rglob(local_instance.STATE_FILE):
            local_instance.stop(state.parent, delete_data=True)
    shutil.rmtree(RUN_DATA, ignore_errors=True)


def pytest_unconfigure(config: pytest.Config) -> None:
    """What collecting the tests started under RUN_DATA, stopped where the fixture above never ran
    (--collect-only, or a -m that selects nothing): collecting alone once left a Redis running."""
    if RUN_DATA.exists():
        for state in RUN_DATA.rglob(local_instance.STATE_FILE):
            local_instance.stop(state.parent, delete_data=True)
        shutil.rmtree(RUN_DATA, ignore_errors=True)


def _interrupt_the_run(pytest_pid: int) -> Callable[[int, Any], None]:
    def interrupt(signum: int, frame: Any) -> None:
        if os.getpid() != pytest_pid:  # a test's forked child: ends as SIGTERM ends it
            signal.signal(signum, signal.SIG_DFL)
            os.kill(os.getpid(), signum)
            return
        raise KeyboardInterrupt

    return interrupt


@pytest.fixture(scope="session")
def database_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    tmp_root = tmp_path_factory.mktemp("openacct")
    server = make_url(_server_url(tmp_root))
    name = f"openacct_test_{uuid.uuid4().hex[:10]}"
    admin = server.set(drivername="postgresql").render_as_string(hide_password=False)
    ensure_database(admin, name)
    url = server.set(database=name, drivername="postgresql").render_as_string(hide_password=False)

    empty_config = tmp_root / "openacct.toml"
    empty_config.write_text("")
    # Every process of the run signs and checks messages with one administrator's key.
    from shared import signing

    keys = tmp_root / "signing-keys.json"
    signing.generate(keys, "admin")
    saved = {k: os.environ.get(k) for k in ("OPENACCT_DATABASE_URL", "OPENACCT_DATA_DIR", "OPENACCT_CONFIG",
                                            "OPENACCT_SIGNING_KEY_FILE")}
    os.environ.update(OPENACCT_DATABASE_URL=url, OPENACCT_DATA_DIR=str(tmp_root / "data"),
                      OPENACCT_CONFIG=str(empty_config), OPENACCT_SIGNING_KEY_FILE=str(keys))
    _forget_settings()
    upgrade(db.engine())
    yield url

    db.engine().dispose()
    _forget_settings()
    for key, value in saved.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value
    with psycopg.connect(admin, autocommit=True) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def _forget_settings() -> None:
    from shared import signing

    config.get_settings.cache_clear()
    signing.keyring.cache_clear()
    db.database_url.cache_clear()
    db.engine.cache_clear()
    db._session_factory = None


@pytest.fixture(scope="session")
def engine(database_url: str) -> Engine:
    return db.engine()


@pytest.fixture
def db_connection(engine: Engine) -> Iterator[Connection]:
    """Every session opened during the test joins this transaction, rolled back at the end."""
    with engine.connect() as connection:
        outer = connection.begin()
        db.bind(connection)
        try:
            yield connection
        finally:
            outer.rollback()
            db.bind(engine)


@pytest.fixture
def query_plans(db_connection: Connection) -> list[str]:
    """The plan of every statement the test's transaction runs from now on, nested ones (a
    trigger's) included, as PostgreSQL's auto_explain gives them: for tests of how a query is
    planned, which its results cannot show."""
    plans: list[str] = []
    db_connection.connection.driver_connection.add_notice_handler(lambda n: plans.append(n.message_primary or ""))
    for setting in ("LOAD 'auto_explain'", "SET LOCAL auto_explain.log_min_duration = 0",
                    "SET LOCAL auto_explain.log_nested_statements = on", "SET LOCAL auto_explain.log_level = 'notice'"):
        db_connection.execute(text(setting))
    return plans


@pytest.fixture
def committed(engine: Engine) -> Iterator[Engine]:
    """For tests whose writes other processes must see: commits for real, then empties the
    database. The ledger refuses TRUNCATE even from its owner (migration 0011); the tests run as
    a superuser, whose replica mode skips that guard along with the append-only triggers."""
    db.bind(engine)
    try:
        yield engine
    finally:
        tables = ", ".join(t.name for t in Base.metadata.sorted_tables)
        with engine.begin() as conn:
            conn.execute(text("SET LOCAL session_replication_role = replica"))
            conn.execute(text(f"TRUNCATE {tables} RESTART IDENTITY CASCADE"))


@pytest.fixture
def scratch_engine(database_url: str) -> Iterator[Engine]:
    """A database of the test's own, empty (not migrated), dropped afterwards."""
    url = make_url(database_url)
    name = f"openacct_scratch_{uuid.uuid4().hex[:8]}"
    admin = url.render_as_string(hide_password=False)
    ensure_database(admin, name)
    engine = create_engine(db.sqlalchemy_url(url.set(database=name).render_as_string(hide_password=False)))
    yield engine
    engine.dispose()  # its connections closed: no need to force (FORCE once took an embedded server down)
    with psycopg.connect(admin, autocommit=True) as conn:
        conn.execute(f'DROP DATABASE "{name}"')


@pytest.fixture
def quickstart(db_connection: Connection) -> None:
    """The README's quick-start center: cluster, core-hours at 0.05, bob/sue/tux, phys/chem."""
    from openacct import shortcuts

    namespace = {name: getattr(shortcuts, name) for name in shortcuts.__all__}
    exec(compile(QUICKSTART.read_text(), str(QUICKSTART), "exec"), namespace)


@pytest.fixture
def center(committed: Engine) -> Engine:
    """The quick-start center, committed for worker processes to see, with phys and chem funded."""
    from openacct import shortcuts

    with db.session_scope():
        exec(QUICKSTART.read_text(), {n: getattr(shortcuts, n) for n in shortcuts.__all__})
        shortcuts.deposit("phys", "1000", start="2000-01-01")
        shortcuts.deposit("chem", "1000", start="2000-01-01")
    return committed


@pytest.fixture
def redis(tmp_path: Path) -> Iterator[Any]:
    """A real Redis server of this test's own, on a unix socket."""
    from tests.pipeline import RedisServer

    server = RedisServer(tmp_path / "redis")
    server.start()
    yield server
    server.stop()


@dataclass(frozen=True)
class Result:
    code: int
    out: str
    err: str

    def json(self) -> Any:
        return json.loads(self.out)


Cli = Callable[..., Result]


@pytest.fixture
def cli(quickstart: None, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> Cli:
    """``openacct`` in-process on the quick-start center: exit code, stdout, stderr; never a traceback."""
    from openacct.cli import run

    monkeypatch.delenv("OPENACCT_DEBUG", raising=False)  # run() would re-raise instead of exiting 70

    def invoke(*argv: str) -> Result:
        code = run(list(argv))
        out, err = capsys.readouterr()
        assert "Traceback" not in out + err, (argv, out, err)
        return Result(code, out, err)

    return invoke
