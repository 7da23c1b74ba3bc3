"""deploy/: the compose file and the systemd units, read as Compose and systemd would read them.

The compose file: every service is there; each long-running one has a health check and a restart
policy, each OpenAcct one waits for the migration; every process logs in as itself, to the
database and to the broker; no password is written anywhere but in the example env file, and
the health checks ask what the processes really answer. The units: each names an `openacct`
command line that `openacct` accepts, carries the limits, and passes `systemd-analyze verify`
where systemd is installed.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import tomllib
from functools import cache
from pathlib import Path
from typing import Any

import pytest
import yaml  # type: ignore[import-untyped]

ROOT = Path(__file__).parents[1]
DEPLOY = ROOT / "deploy"
COMPOSE = DEPLOY / "compose.yaml"
ENV_EXAMPLE = DEPLOY / "compose.env.example"
INIT_LOGINS = DEPLOY / "postgres" / "init-logins.sh"
UNITS = DEPLOY / "systemd"
OPENACCT = Path(sys.executable).with_name("openacct")  # .venv/bin/openacct
INSTALLED = "/opt/openacct/bin/openacct"  # where the units expect it
WORKERS = ("charger", "refunder", "reporter")

# The services issue 13 names (the file has a few more: keys, cli).
NAMED = {"postgres", "redis", "rabbitmq", "migrate", "charger", "refunder", "reporter", "beat", "flower"}
ONE_SHOT = {"migrate", "keys", "cli"}  # run to completion: no health check, never restarted
DATA_SERVICES = {"postgres", "redis", "rabbitmq"}


# --- The compose file ------------------------------------------------------------------------

@cache
def compose() -> dict[str, Any]:
    return yaml.safe_load(COMPOSE.read_text())


def services() -> dict[str, dict[str, Any]]:
    return compose()["services"]


def example_env() -> dict[str, str]:
    pairs = {}
    for line in ENV_EXAMPLE.read_text().splitlines():
        if line.strip() and not line.lstrip().startswith("#"):
            key, sep, value = line.partition("=")
            assert sep, f"compose.env.example: not NAME=value: {line!r}"
            pairs[key.strip()] = value.strip()
    return pairs


def strings(node: Any) -> list[str]:
    if isinstance(node, dict):
        return [s for key, value in node.items() for s in (key, *strings(value))]
    if isinstance(node, list):
        return [s for item in node for s in strings(item)]
    return [node] if isinstance(node, str) else []


def environment(service: dict[str, Any]) -> dict[str, str]:
    env = service.get("environment") or {}
    assert isinstance(env, dict), "environment as a mapping"
    return env


def app_services() -> dict[str, dict[str, Any]]:
    """The OpenAcct processes (the image built from deploy/Dockerfile), but the key maker."""
    return {name: s for name, s in services().items() if "build" in s and name != "keys"}


def long_running() -> dict[str, dict[str, Any]]:
    return {name: s for name, s in services().items() if name not in ONE_SHOT}


REQUIRED = re.compile(r"^\$\{([A-Z][A-Z0-9_]*):\?[^}]+\}$")


def url_login(url: str) -> tuple[str, str]:
    """(user, password) of a URL that may hold ${...} interpolations."""
    match = re.search(r"://([^:@/]+):(\$\{[^}]+\})@", url)
    assert match, f"not scheme://user:${{PASSWORD}}@...: {url}"
    return match.group(1), match.group(2)


def test_every_service_is_there() -> None:
    assert NAMED <= set(services()), f"missing: {sorted(NAMED - set(services()))}"
    assert services()["rabbitmq"].get("profiles") == ["rabbitmq"]
    for name in NAMED - {"rabbitmq"}:
        assert "profiles" not in services()[name], f"{name} starts with a plain `docker compose up`"


def test_long_running_services_have_a_health_check_and_a_restart_policy() -> None:
    for name, service in long_running().items():
        check = service.get("healthcheck") or {}
        assert check.get("test") and check["test"][0] in ("CMD", "CMD-SHELL"), f"{name}: no health check"
        assert {"interval", "timeout", "retries"} <= set(check), f"{name}: health check timing"
        assert service.get("restart") in ("unless-stopped", "always", "on-failure"), f"{name}: restart policy"
    for name in ONE_SHOT:
        assert services()[name].get("restart") == "no", f"{name} runs once"
        assert "healthcheck" not in services()[name]


def test_each_openacct_service_waits_for_the_migration_and_the_broker() -> None:
    for name, service in app_services().items():
        needs = service.get("depends_on") or {}
        if name == "migrate":
            assert needs == {"postgres": {"condition": "service_healthy"}}
            continue
        assert needs.get("migrate") == {"condition": "service_completed_successfully"}, name
        for data, condition in needs.items():
            if data in DATA_SERVICES:
                assert condition["condition"] == "service_healthy", f"{name} waits for {data} to be healthy"
        if name != "cli":
            assert needs.get("redis") == {"condition": "service_healthy"}, name
            # RabbitMQ is a profile: waited for when enabled, not required when not
            assert needs.get("rabbitmq") == {"condition": "service_healthy", "required": False}, name


def test_the_migration_upgrades_then_grants_as_the_owners_login() -> None:
    migrate = services()["migrate"]
    assert migrate["command"] == ["sh", "-c", "openacct db upgrade && openacct db roles"]
    user, _ = url_login(environment(migrate)["OPENACCT_DATABASE_URL"])
    assert init_logins()[user] == "openacct_owner"
    assert "OPENACCT_BROKER_URL" not in environment(migrate)


@cache
def init_logins() -> dict[str, str]:
    """login -> the group role deploy/postgres/init-logins.sh grants it."""
    text = INIT_LOGINS.read_text()
    return dict(re.findall(r"CREATE ROLE (\w+) LOGIN PASSWORD :'\w+' IN ROLE (\w+);", text))


def test_init_logins_makes_the_roles_of_shared_roles_and_reads_every_password_from_the_environment() -> None:
    from shared import roles

    text = INIT_LOGINS.read_text()
    assert set(re.findall(r"CREATE ROLE (\w+) NOLOGIN;", text)) == {roles.OWNER, *roles.ROLES}
    assert set(init_logins().values()) <= {roles.OWNER, *roles.ROLES}
    assert re.search(rf"ALTER DATABASE :\"database\" OWNER TO {roles.OWNER};", text)
    variables = dict(re.findall(r"\\getenv (\w+) (\w+)", text))
    passwords = re.findall(r"CREATE ROLE \w+ LOGIN PASSWORD :'(\w+)'", text)
    assert passwords and set(passwords) <= set(variables), "each login's password comes from \\getenv"
    postgres_env = environment(services()["postgres"])
    for name in variables.values():
        assert name in postgres_env, f"the postgres service passes {name} to init-logins.sh"
    code = [line for line in text.splitlines() if not line.lstrip().startswith("#")]
    assert not [line for line in code if "PASSWORD '" in line], "no password written in the script"
    volumes = services()["postgres"]["volumes"]
    assert "./postgres/init-logins.sh:/docker-entrypoint-initdb.d/10-openacct-logins.sh:ro" in volumes
    assert os.access(INIT_LOGINS, os.X_OK), "executable, so the image runs it rather than sourcing it"


def test_each_process_logs_in_as_itself() -> None:
    database: dict[str, str] = {}
    broker: dict[str, str] = {}
    for name, service in app_services().items():
        env = environment(service)
        if "OPENACCT_DATABASE_URL" in env:
            user, _ = url_login(env["OPENACCT_DATABASE_URL"])
            assert user not in database.values(), f"{name} shares the database login {user}"
            database[name] = user
        if "OPENACCT_BROKER_URL" in env:
            user, _ = url_login(env["OPENACCT_BROKER_URL"])
            assert user not in broker.values(), f"{name} shares the broker user {user}"
            broker[name] = user
    assert set(WORKERS) | {"beat", "migrate"} <= set(database)
    assert set(WORKERS) | {"beat", "flower"} <= set(broker)
    for name in (*WORKERS, "beat"):
        assert init_logins()[database[name]] == "openacct_charger", f"{name} logs in as an openacct_charger"
    assert init_logins()[database["cli"]] == "openacct_admin"
    # every broker user is one the brokers are given
    redis_users = re.findall(r"^user (\w+) on >\$\$(\w+) ", services()["redis"]["command"][2], re.M)
    rabbit_users = re.findall(r"^\s*user (\w+) \"\$\$(\w+)\"", services()["rabbitmq"]["command"][2], re.M)
    for name, user in broker.items():
        password = url_login(environment(services()[name])["OPENACCT_BROKER_URL"])[1]
        variable = REQUIRED.match(password).group(1)  # type: ignore[union-attr]
        assert (user, variable) in redis_users, f"Redis has no user {user} with {variable}"
        assert (user, variable) in rabbit_users, f"RabbitMQ has no user {user} with {variable}"
    assert "user default off" in services()["redis"]["command"][2]


def test_no_password_is_written_outside_the_example_env_file() -> None:
    example = example_env()
    for name, service in services().items():
        for key, value in environment(service).items():
            if "PASSWORD" in key:
                match = REQUIRED.match(str(value))
                assert match, f"{name}: {key} is not ${{NAME:?...}} (from .env)"
                assert match.group(1) in example
        for text in strings(service):
            for login in re.findall(r"://((?:\$\{[^}]*\}|[^\s$/@])+)@", text):
                user, _, password = login.partition(":")
                variable = REQUIRED.match(password)
                assert variable and variable.group(1) in example, f"{name}: a URL's password is not from .env: {login}"
    # the example's passwords say what they are
    for key, value in example.items():
        if "PASSWORD" in key:
            assert value.startswith("example-") and value.endswith("CHANGE-ME"), f"{key}={value}"
            assert re.fullmatch(r"[A-Za-z0-9_-]+", value), "URL-safe"
    assert "EXAMPLE VALUES" in ENV_EXAMPLE.read_text()
    # every variable the compose file needs is in the example (or has a default there)
    text = "\n".join(strings(compose()))
    for variable in set(re.findall(r"(?<!\$)\$\{([A-Z][A-Z0-9_]*)(?=[:}])", text)):
        assert variable in example or re.search(rf"\$\{{{variable}:-", text), variable
    # nor in the other env examples: placeholders only
    for path in sorted((DEPLOY / "env").glob("*.env")):
        for url in re.findall(r"://[^@\s]+@", path.read_text()):
            assert url.endswith(":CHANGE-ME@"), f"{path.name}: {url}"


def test_the_signing_key_is_a_read_only_secret_from_the_secrets_folder() -> None:
    assert compose()["secrets"] == {"signing_key": {"file": "${OPENACCT_SECRETS_DIR:-./secrets}/keys.json"}}
    for name, service in app_services().items():
        env = environment(service)
        if name in (*WORKERS, "beat", "cli"):
            assert env.get("OPENACCT_SIGNING_KEY_FILE") == "/run/secrets/signing_key", name
            assert service.get("secrets") == ["signing_key"], name
        else:
            assert "OPENACCT_SIGNING_KEY_FILE" not in env and "secrets" not in service, f"{name} needs no key"
    keys = services()["keys"]
    assert keys["profiles"] == ["setup"] and keys["network_mode"] == "none"
    script = keys["command"][2]
    assert "openacct keys generate relay-keys.json --role scheduler" in script
    assert "openacct keys generate keys.json --role admin --rotate" in script  # admin first: beat signs with it
    assert "chown openacct:openacct keys.json" in script


def test_the_health_checks_ask_what_the_processes_answer() -> None:
    from shared.celery_app import READ_ONLY_COMMANDS

    assert "ping" in READ_ONLY_COMMANDS  # workers answer it with remote control off
    for kind in WORKERS:
        service = services()[kind]
        assert service["command"][:3] == ["openacct", "worker", kind]
        test = service["healthcheck"]["test"]
        assert test[0] == "CMD-SHELL"
        # `openacct worker` names its node KIND@%h; in a container, %h is $HOSTNAME
        assert f'celery -A services.{kind}.tasks inspect ping -d "{kind}@$$HOSTNAME"' in test[1]
        assert (ROOT / "services" / kind / "tasks.py").exists()
    assert '"-n", f"{name}@%h"' in (ROOT / "openacct" / "cli" / "pipeline.py").read_text()
    from openacct.cli.reports import BEAT_LOCK

    beat = services()["beat"]["healthcheck"]["test"]
    assert beat[:3] == ["CMD", "python", "-c"] and "from openacct.cli.reports import BEAT_LOCK" in beat[3]
    compile(beat[3], "beat healthcheck", "exec")
    assert isinstance(BEAT_LOCK, int) and "BEAT_LOCK >> 32" in beat[3] and "BEAT_LOCK & 0xFFFFFFFF" in beat[3]
    flower = services()["flower"]
    port = flower["command"][flower["command"].index("--port") + 1]
    assert f"http://127.0.0.1:{port}/healthcheck" in flower["healthcheck"]["test"][3]
    assert flower["ports"] == [f"127.0.0.1:{port}:{port}"], "Flower has no login: this host only"


# `openacct ARGS --help` for many ARGS in one process: the CLI's import is most of each run's
# second. The same parser as the `openacct` program's (openacct.entry.main calls openacct.cli).
_HELP_ALL = """
import contextlib, io, json, sys
from openacct.cli import run
verdicts = []
for args in json.load(sys.stdin):
    err = io.StringIO()
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(err):
        code = run([*args, "--help"])
    verdicts.append([code, err.getvalue()])
json.dump(verdicts, sys.stdout)
"""


def help_env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if not k.startswith("OPENACCT_")}


def compose_command_lines() -> dict[str, list[list[str]]]:
    """service -> the openacct command lines it runs (arguments after `openacct`)."""
    found: dict[str, list[list[str]]] = {}
    for name, service in app_services().items():
        command = service["command"]
        if service.get("entrypoint") == ["openacct"]:
            command = ["openacct", *command]
        lines = command[2].split("&&") if command[:2] == ["sh", "-c"] else [shlex.join(command)]
        found[name] = [shlex.split(line) for line in lines]
    return found


def unit_command_lines(path: Path) -> list[list[str]]:
    """The command lines (arguments after the binary) of a unit's ExecStart=, %i filled in."""
    lines = [shlex.split(line) for line in read_unit(path)["Service"]["ExecStart"]]
    return [[line[0], *(a.replace("%i", kind) for a in line[1:])] for line in lines for kind in instances(path)]


@cache
def verdicts() -> dict[tuple[str, ...], tuple[int, str]]:
    """Every openacct command line of deploy/ -> (exit status, stderr) of `openacct ... --help`."""
    wanted = {tuple(a for a in line[1:] if a != "--help")
              for lines in compose_command_lines().values() for line in lines if line[0] == "openacct"}
    wanted |= {tuple(line[1:]) for path in unit_paths() for line in unit_command_lines(path)}
    wanted.add(("keys", "generate", "keys.json", "--role", "admin", "--rotate"))  # the keys service's
    wanted |= set(REFUSED)
    ordered = sorted(wanted)
    done = subprocess.run([sys.executable, "-c", _HELP_ALL], input=json.dumps(ordered), capture_output=True,
                          text=True, timeout=300, env=help_env(), check=True)
    return {args: (code, err) for args, (code, err) in zip(ordered, json.loads(done.stdout), strict=True)}


def assert_accepted(args: list[str], where: str) -> None:
    code, err = verdicts()[tuple(args)]
    assert code == 0, f"{where}: openacct {' '.join(args)}: {err.strip()}"


# --help stops the parse before option values are converted: it checks commands and option names.
REFUSED = [("no-such-command",), ("worker", "charger", "--no-such-option"), ("db", "no-such-command")]


def test_the_help_runs_tell_a_wrong_command_line() -> None:
    done = subprocess.run([str(OPENACCT), "--help"], capture_output=True, text=True, timeout=120, env=help_env())
    assert done.returncode == 0 and "worker" in done.stdout, done.stderr  # the program itself runs
    for args in REFUSED:
        code, err = verdicts()[args]
        assert code != 0 and err, f"openacct {' '.join(args)} --help was taken"


def test_openacct_takes_the_command_lines_the_compose_file_runs() -> None:
    for name, lines in compose_command_lines().items():
        if name == "keys":
            continue  # a shell script: its keys generate is checked below
        for args in lines:
            assert args[0] == "openacct", f"{name}: {shlex.join(args)}"
            assert_accepted([a for a in args[1:] if a != "--help"], name)
    assert_accepted(["keys", "generate", "keys.json", "--role", "admin", "--rotate"], "keys")


def test_the_image_installs_the_checkout_and_runs_as_a_user() -> None:
    text = (DEPLOY / "Dockerfile").read_text()
    assert re.search(r"^FROM python:3\.11-slim$", text, re.M)
    assert re.search(r"pip install \.", text)
    users = re.findall(r"^USER (\S+)$", text, re.M)
    assert users and users[-1] not in ("root", "0"), "the processes do not run as root"
    for service in app_services().values():
        assert service["build"] == {"context": "..", "dockerfile": "deploy/Dockerfile"}
        assert service["image"] == "openacct:local"


# --- The systemd units -----------------------------------------------------------------------

def read_unit(path: Path) -> dict[str, dict[str, list[str]]]:
    """Sections -> keys -> values in order (a key may repeat: ExecStart= of a oneshot), as
    systemd reads a unit: comments start with # or ;, a trailing backslash continues a line."""
    sections: dict[str, dict[str, list[str]]] = {}
    current: dict[str, list[str]] | None = None
    pending = ""
    for number, raw in enumerate(path.read_text().splitlines(), 1):
        line = pending + raw.strip()
        pending = ""
        if not line or line[0] in "#;":
            continue
        if line.endswith("\\"):
            pending = line[:-1] + " "
            continue
        if line.startswith("["):
            assert line.endswith("]"), f"{path.name}:{number}: {line}"
            current = sections.setdefault(line[1:-1], {})
            continue
        key, sep, value = line.partition("=")
        assert sep and current is not None, f"{path.name}:{number}: not key=value in a section: {line}"
        current.setdefault(key.strip(), []).append(value.strip())
    return sections


def unit_paths() -> list[Path]:
    return sorted(UNITS.glob("*.service"))


def instances(path: Path) -> list[str]:
    """What %i stands for in a template (the worker kinds); [""] for a plain unit."""
    return list(WORKERS) if path.name.endswith("@.service") else [""]


def test_there_is_a_unit_for_every_process() -> None:
    commands = set()
    for path in unit_paths():
        for line in read_unit(path)["Service"]["ExecStart"]:
            commands.add(" ".join(shlex.split(line)[1:3]))
    assert {"worker %i", "relay", "admission serve", "beat", "flower --port", "db upgrade", "db roles",
            "receive slurm-elasticsearch"} <= commands
    assert (UNITS / "openacct-migrate.service").exists() and (UNITS / "openacct-flower.service").exists()


@pytest.mark.parametrize("path", unit_paths(), ids=lambda p: p.name)
def test_a_unit_runs_an_openacct_command_line_openacct_takes(path: Path) -> None:
    service = read_unit(path)["Service"]
    assert len(service["ExecStart"]) == 1 or service.get("Type") == ["oneshot"], "several ExecStart= in a oneshot only"
    for args in unit_command_lines(path):
        assert args[0] == INSTALLED, f"{path.name}: {shlex.join(args)}"
        assert_accepted(args[1:], path.name)


@pytest.mark.parametrize("path", unit_paths(), ids=lambda p: p.name)
def test_a_unit_has_its_limits(path: Path) -> None:
    text = path.read_text()
    service = read_unit(path)["Service"]

    def one(key: str) -> str:
        assert key in service, f"{path.name}: no {key}="
        return service[key][-1]

    assert re.fullmatch(r"\d+", one("LimitNOFILE"))
    assert "MemoryMax" in service or "MemoryHigh" in service, f"{path.name}: no memory limit"
    assert re.search(r"^#.*Memory", text, re.M), f"{path.name}: the memory limit says why"
    assert re.fullmatch(r"\d+%?|infinity", one("TasksMax"))
    assert one("NoNewPrivileges") == "yes"
    assert one("ProtectSystem") == "strict"
    assert one("ProtectHome") == "yes"
    assert one("PrivateTmp") == "yes"
    assert one("Restart") in ("always", "on-failure")
    assert one("RestartSec")
    assert one("User") not in ("root", "0")


@pytest.mark.parametrize("path", unit_paths(), ids=lambda p: p.name)
def test_a_unit_reads_its_own_env_file(path: Path) -> None:
    service = read_unit(path)["Service"]
    files = service.get("EnvironmentFile", [])
    assert len(files) == 1, f"{path.name}: one EnvironmentFile="
    for kind in instances(path):
        name = files[0].replace("%i", kind)
        assert name.startswith("/etc/openacct/") and name.endswith(".env")
        assert (DEPLOY / "env" / Path(name).name).exists(), f"{path.name}: no example deploy/env/{Path(name).name}"


def test_each_process_has_an_env_file_and_a_login_of_its_own() -> None:
    logins: dict[str, str] = {}
    for path in unit_paths():
        for kind in instances(path):
            env_file = read_unit(path)["Service"]["EnvironmentFile"][0].replace("%i", kind)
            text = (DEPLOY / "env" / Path(env_file).name).read_text()
            found = re.search(r"^OPENACCT_DATABASE_URL=postgresql://(\w+):", text, re.M)
            if found:
                assert found.group(1) not in logins.values(), f"{env_file} shares a login"
                logins[env_file] = found.group(1)
    assert len(set(logins.values())) == len(logins) >= 7  # three workers, beat, relay, admission, migrate


def test_the_units_may_write_where_their_process_writes() -> None:
    settings = tomllib.loads((DEPLOY / "openacct.toml").read_text())
    for name in ("openacct-relay.service", "openacct-receiver.service"):
        service = read_unit(UNITS / name)["Service"]
        assert settings["spool_dir"] in service["ReadWritePaths"][0].split(), name
    for name in ("openacct-worker@.service", "openacct-beat.service"):  # statements, beat-schedule
        service = read_unit(UNITS / name)["Service"]
        data_dir = dict(e.split("=", 1) for e in service["Environment"])["OPENACCT_DATA_DIR"]
        assert data_dir in service["ReadWritePaths"][0].split(), name
        assert service["StateDirectory"] == [Path(data_dir).name], name
    admission = read_unit(UNITS / "openacct-admission.service")["Service"]
    socket = Path(settings["admission_socket"])
    assert socket.parent == Path("/run") / admission["RuntimeDirectory"][0]


def test_systemd_analyze_verifies_every_unit(tmp_path: Path) -> None:
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        pytest.skip("systemd-analyze is not installed here")
    if not OPENACCT.exists():
        pytest.skip(f"no {OPENACCT} to stand in for {INSTALLED}")
    names = []
    for path in unit_paths():
        text = path.read_text().replace(INSTALLED, str(OPENACCT))  # verify checks the binary exists
        for kind in instances(path):
            name = path.name.replace("@.", f"@{kind}.") if kind else path.name
            (tmp_path / name).write_text(text)
            names.append(name)
    done = subprocess.run([analyze, "verify", "--man=no", *(str(tmp_path / n) for n in names)],
                          capture_output=True, text=True, timeout=120)
    about_ours = [line for line in (done.stdout + done.stderr).splitlines() if any(n in line for n in names)]
    assert done.returncode == 0 and not about_ours, done.stdout + done.stderr
