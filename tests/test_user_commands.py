"""The user commands of a login node (``openacct balance``, ``job cost``, ``estimate``) run as a
user runs them: ``openacct`` processes with the API's URL and a token and no database settings,
against a real ``openacct api serve`` on the quick-start center. How a batch script is read, and
how a token file is checked, in-process."""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from decimal import Decimal
from pathlib import Path

import pytest
from sqlalchemy import Engine, select

from openacct.cli import user
from services.charger.batch import charge_events
from shared.errors import ConfigError, InvalidInput
from tests.api_server import ApiServer, login_node, run, token
from tests.events import job_completed, raw
from tests.pipeline import free_port

D = Decimal


@pytest.fixture(scope="module")
def api(database_url: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ApiServer]:
    with ApiServer(tmp_path_factory.mktemp("api")) as server:
        yield server


def charge(*events: dict[str, object]) -> None:
    from shared.db import session_scope

    with session_scope() as s:
        outcome = charge_events(s, [raw(e).decode() for e in events])
    assert outcome.charged == len(events), outcome


@pytest.fixture
def world(center: Engine) -> Engine:
    """The quick-start center (tux in phys and chem) with a project tux is not in (astro, bob's),
    a partition that costs 1.5 times the rate, tux's job 1001 in it and bob's job 1002."""
    from openacct import shortcuts
    from shared.db import session_scope
    from shared.models import ChargeMultiplier, System

    with session_scope() as s:
        shortcuts.create_project("astro", pi="bob", description="Astronomy")
        shortcuts.grant_service_access("cluster-core-hours", project="astro")
        shortcuts.deposit("astro", "500", start="2000-01-01", end="2100-01-01")
        cluster = s.scalar(select(System).where(System.name == "cluster"))
        assert cluster is not None
        s.add(ChargeMultiplier(system_id=cluster.id, kind="partition", name="gpu", multiplier=D("1.5")))
    charge(job_completed(1001, user="tux", account="phys", cpus=4, seconds=7200, partition="gpu"),
           job_completed(1002, user="bob", account="phys", cpus=2, seconds=3600))
    return center


def projects(out: str) -> list[str]:
    return sorted(p["name"] for p in json.loads(out))


def table(out: str) -> dict[str, list[str]]:
    """The rows of a table a command printed, by their first cell: each row's cells."""
    cells = [[c.strip() for c in line.split("│")[1:-1]] for line in out.splitlines() if line.count("│") > 3]
    return {row[0]: row for row in cells}


# ------------------------------------------------------------------------------------ balance


def test_balance_with_only_the_api_url_and_a_token_prints_exactly_the_callers_projects(
        world: Engine, api: ApiServer, tmp_path: Path) -> None:
    env = login_node(tmp_path / "tux", api.url, OPENACCT_API_TOKEN=token("tux"))
    assert not any("DATABASE" in k for k in env) and {k for k in env if k.startswith("OPENACCT_")} == {
        "OPENACCT_API_URL", "OPENACCT_API_TOKEN", "OPENACCT_CONFIG"}

    shown = run(env, "balance")
    assert shown.returncode == 0, shown
    rows = {line.split("│")[1].strip(): line for line in shown.stdout.splitlines() if line.count("│") > 3}
    assert set(rows) == {"chem", "phys"}, shown.stdout
    assert "astro" not in shown.stdout
    # phys: 1000 less tux's 4 CPUs x 2 h x 0.05 x 1.5 = 0.60 and bob's 2 x 1 h x 0.05 = 0.10.
    assert "999.30" in rows["phys"] and "1,000.00" in rows["chem"] and "never" in rows["chem"]
    assert projects(run(env, "balance", "--json").stdout) == ["chem", "phys"]
    # Nothing of a database was looked for: no local instance under the home.
    assert not (tmp_path / "tux" / ".local").exists()

    bob = login_node(tmp_path / "bob", api.url, OPENACCT_API_TOKEN=token("bob"))
    listed = run(bob, "balance")
    assert "astro" in listed.stdout and "2100-01-01" in listed.stdout and "chem" not in listed.stdout
    assert projects(run(bob, "balance", "--json").stdout) == ["astro", "phys"]


def test_balance_shows_the_callers_own_spending_limit(world: Engine, api: ApiServer, tmp_path: Path) -> None:
    """GET /projects gives each project's ``my_limit``; GET /projects/NAME every member's cap to
    the PI, so ``balance phys`` picks the caller's own."""
    from openacct import shortcuts
    from shared import member_limits
    from shared.db import session_scope

    with session_scope() as s:
        member_limits.set_limit(s, shortcuts.get_project("phys"), "tux", "10", actor="test")
        member_limits.set_limit(s, shortcuts.get_project("phys"), "bob", "2", "allocation", actor="test")
    tux = login_node(tmp_path / "tux", api.url, OPENACCT_API_TOKEN=token("tux"))
    shown = run(tux, "balance")
    assert shown.returncode == 0, shown
    (header,) = [line for line in shown.stdout.splitlines() if "your cap" in line]
    assert "you spent" in header and "you have left" in header and "per" in header
    rows = table(shown.stdout)
    # tux's job in phys cost 0.60 this month, of a cap of 10; no cap in chem.
    assert rows["phys"][-4:] == ["10.00", "0.60", "9.40", "month"], rows
    assert rows["chem"][-4:] == ["", "", "", ""], rows
    (phys,) = [p for p in json.loads(run(tux, "balance", "--json").stdout) if p["name"] == "phys"]
    assert (phys["my_limit"]["user"], phys["my_limit"]["cap"], phys["my_limit"]["left"]) == ("tux", "10.00", "9.40")

    bob = login_node(tmp_path / "bob", api.url, OPENACCT_API_TOKEN=token("bob"))
    one = run(bob, "balance", "phys")  # the PI sees both caps: the table shows bob's own
    assert table(one.stdout)["phys"][-4:] == ["2.00", "0.10", "1.90", "allocation"], one.stdout


def test_balance_of_a_project_on_a_login_node_asks_the_api_and_tells_nothing_of_anothers(
        world: Engine, api: ApiServer, tmp_path: Path) -> None:
    env = login_node(tmp_path, api.url, OPENACCT_API_TOKEN=token("tux"))
    mine = run(env, "balance", "phys")
    assert mine.returncode == 0 and "999.30" in mine.stdout, mine
    for name in ("astro", "nosuch"):  # another's project and none at all: the same answer
        refused = run(env, "balance", name)
        assert (refused.returncode, refused.stdout) == (1, "")
        assert refused.stderr == f"error: no project {name} that you can see\n"
    at = run(env, "balance", "--at", "2026-01-01")
    assert at.returncode == 1 and "--at needs the database" in at.stderr


def test_the_administrators_balance_reads_the_database_when_a_name_is_given(
        world: Engine, api: ApiServer, tmp_path: Path) -> None:
    env = {**os.environ, "OPENACCT_API_URL": api.url, "OPENACCT_API_TOKEN": token("tux")}
    admin = run(env, "balance", "astro", "--json")  # tux's token could not see astro: the database did
    assert admin.returncode == 0, admin
    assert json.loads(admin.stdout)["name"] == "astro" and "credit_limit" in json.loads(admin.stdout)
    assert projects(run(env, "balance", "--json").stdout) == ["chem", "phys"]  # no name: the caller's
    without = {k: v for k, v in env.items() if k not in ("OPENACCT_API_URL", "OPENACCT_API_TOKEN")}
    every = run(without, "balance", "--json")  # no api_url: every project, as before
    assert sorted(b["name"] for b in json.loads(every.stdout)) == ["astro", "chem", "phys"]


# ------------------------------------------------------------------------------------ job cost


def test_job_cost_explains_a_charge(world: Engine, api: ApiServer, tmp_path: Path) -> None:
    env = login_node(tmp_path, api.url, OPENACCT_API_TOKEN=token("tux"))
    shown = run(env, "job", "cost", "1001")
    assert shown.returncode == 0, shown
    out = shown.stdout
    assert "job 1001 on cluster: tux on phys (partition gpu)" in out and "COMPLETED" in out
    assert "4 CPUs" in out and "ran 02:00:00" in out and "policy: charged for elapsed time" in out
    (line,) = [line for line in out.splitlines() if "cluster-core-hours" in line]
    cells = [c.strip() for c in line.split("│")[1:-1]]
    assert cells[0] == "charge" and "8" in cells and "0.05" in cells and "-0.60" in cells, cells
    assert any(c.startswith("1.5") for c in cells), cells
    assert "cost: 0.60" in out

    (record,) = json.loads(run(env, "job", "cost", "1001", "--system", "cluster", "--json").stdout)
    assert D(record["cost"]) == D("0.6") and record["charge_policy"] == "charged for elapsed time"
    # What the charger recorded, as the API gives it: the table's count, elapsed and multiplier.
    (charge,) = record["transactions"]
    assert (charge["quantity"], charge["rate"]) == ("8", "0.05")
    assert {k: charge["details"][k] for k in ("count", "elapsed_seconds", "state", "policy", "multiplier",
                                              "partition_multiplier", "qos_multiplier", "service")} == {
        "count": 4, "elapsed_seconds": 7200, "state": "COMPLETED", "policy": "charged for elapsed time",
        "multiplier": "1.50", "partition_multiplier": "1.500000", "qos_multiplier": "1", "service": "cluster-core-hours"}
    assert cells[2:4] == ["4", "02:00:00"], cells  # count and elapsed: from the details only


def test_job_cost_of_anothers_job_or_a_bad_id_is_one_line(world: Engine, api: ApiServer, tmp_path: Path) -> None:
    env = login_node(tmp_path, api.url, OPENACCT_API_TOKEN=token("tux"))
    for args, message in [
        (["1002"], "error: no job 1002 that you can see"),  # bob's
        (["4242"], "error: no job 4242 that you can see"),
        (["12;rm"], "error: bad job id '12;rm'"),
        (["1001", "--system", "../etc"], "error: bad --system '../etc'"),
    ]:
        refused = run(env, "job", "cost", *args)
        assert refused.returncode == 1 and refused.stdout == "", refused
        assert refused.stderr.startswith(message) and refused.stderr.count("\n") == 1, refused.stderr


# ------------------------------------------------------------------------------------ estimate

SCRIPT = """#!/bin/bash
# a comment, then the directives
#SBATCH --job-name=sim -A phys
#SBATCH --time=2:00:00   # two hours
#SBATCH --ntasks 2
#SBATCH -c4 --partition=gpu
#SBATCH --mem=4G

srun ./simulate
#SBATCH --time=99:00:00
"""


def test_estimate_prices_a_script_from_its_sbatch_lines(world: Engine, api: ApiServer, tmp_path: Path) -> None:
    env = login_node(tmp_path, api.url, OPENACCT_API_TOKEN=token("tux"))
    script = tmp_path / "job.sh"
    script.write_text(SCRIPT)
    priced = run(env, "estimate", str(script))
    assert priced.returncode == 0, priced
    # 2 tasks x 4 CPUs for 2 h at 0.05 in a partition of 1.5: 1.20; the directive after srun is not read.
    assert "8 CPUs, 1 node for 120 minutes on phys (partition gpu)" in priced.stdout
    assert "at most 1.20" in priced.stdout and "can pay" in priced.stdout
    assert f"warning: {script}:10: #SBATCH after the first command" in priced.stderr
    quote = json.loads(run(env, "estimate", str(script), "--json").stdout)
    assert D(quote["total"]) == D("1.2") and quote["affordable"] is True and quote["request"]["cpus"] == 8

    # The command line overrides the script, as sbatch's does; a job phys cannot pay exits 1.
    dear = run(env, "estimate", str(script), "--time", "100-00:00:00", "--account", "chem")
    assert dear.returncode == 1 and "on chem" in dear.stdout, dear
    assert "at most 1,440.00" in dear.stdout and "CANNOT pay" in dear.stdout  # 8 x 2,400 h x 0.05 x 1.5

    # From standard input, and with no account: tux has two projects to choose from.
    unnamed = run(env, "estimate", "-", stdin="#!/bin/sh\n#SBATCH -t 10\n")
    assert unnamed.returncode == 1 and "give --account, one of your projects (chem, phys)" in unnamed.stderr


def test_estimate_refuses_what_it_cannot_price_in_one_line(world: Engine, api: ApiServer, tmp_path: Path) -> None:
    env = login_node(tmp_path, api.url, OPENACCT_API_TOKEN=token("tux"))
    cases = {  # more of the script's own mistakes are below, in-process
        "#!/bin/sh\n#SBATCH -A phys\n": "job.sh: no #SBATCH --time",
        "#!/bin/sh\n#SBATCH -A phys -t soon\n": "job.sh:2: --time 'soon' is not a time limit",
        "#!/bin/sh\n#SBATCH -A astro -t 10\n": "error: no account astro that you can see",  # the API's answer
        "#!/bin/sh\n#SBATCH -A phys -t 10 -p nope\n": "",  # an unknown partition has no multiplier: priced
    }
    for text, message in cases.items():
        script = tmp_path / "job.sh"
        script.write_text(text)
        done = run(env, "estimate", str(script))
        if not message:
            assert done.returncode == 0, done
            continue
        assert done.returncode == 1 and message in done.stderr and done.stderr.count("\n") == 1, (text, done)
    missing = run(env, "estimate", str(tmp_path / "none.sh"))
    assert missing.returncode == 1 and "cannot read" in missing.stderr and "No such file" in missing.stderr


# ------------------------------------------------------------------------------------ errors


def test_what_goes_wrong_between_the_command_and_the_api_is_one_line(
        world: Engine, api: ApiServer, tmp_path: Path) -> None:
    down = f"http://127.0.0.1:{free_port()}"
    refused = run(login_node(tmp_path, down, OPENACCT_API_TOKEN=token("tux")), "balance")
    assert refused.returncode == 1
    assert refused.stderr == f"error: cannot reach the API at {down}: connection refused (is openacct api serve running there?)\n"

    bad = run(login_node(tmp_path, api.url, OPENACCT_API_TOKEN="oa_not-a-token-at-all"), "balance")
    assert bad.returncode == 1
    assert bad.stderr == "error: the API refused your credentials (OPENACCT_API_TOKEN): unknown token\n"

    unset = login_node(tmp_path, api.url, OPENACCT_API_TOKEN=token("tux"))
    del unset["OPENACCT_API_URL"]
    nowhere = run(unset, "job", "cost", "1001")
    assert nowhere.returncode == 1 and nowhere.stderr.startswith("error: no API to ask: set OPENACCT_API_URL")

    wrong = run(login_node(tmp_path, f"{api.url}/nope", OPENACCT_API_TOKEN=token("tux")), "balance")
    assert wrong.returncode == 1 and wrong.stderr.count("\n") == 1 and "no such endpoint" in wrong.stderr


def test_without_a_token_variable_or_munged_the_token_file_proves_the_user(
        world: Engine, api: ApiServer, tmp_path: Path) -> None:
    home = tmp_path / "home"
    # No munged answers on this socket (where munge is not installed, MUNGE is passed over all the same).
    env = login_node(home, api.url, OPENACCT_MUNGE_SOCKET=str(tmp_path / "no-munged.socket"))
    none = run(env, "balance")
    assert none.returncode == 1 and none.stderr.count("\n") == 1, none
    assert none.stderr.endswith(f"set OPENACCT_API_TOKEN, or put a token (openacct token create, by your center) "
                                f"in {home}/.config/openacct/token, mode 0600\n"), none.stderr
    path = home / ".config" / "openacct" / "token"
    path.parent.mkdir(parents=True)
    path.write_text(token("tux") + "\n")
    path.chmod(0o640)
    loose = run(env, "balance")
    assert loose.returncode == 1 and "is readable by others (mode 0640): chmod 600" in loose.stderr, loose
    path.chmod(0o600)
    assert projects(run(env, "balance", "--json").stdout) == ["chem", "phys"]


def test_a_token_file_must_be_the_users_own_and_private(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path))
    path = user.token_file()
    assert path == tmp_path / "openacct" / "token"
    path.parent.mkdir()
    path.write_text("oa_secret-token-value\n")
    path.chmod(0o644)
    with pytest.raises(ConfigError, match=r"readable by others \(mode 0644\): chmod 600"):
        user._read_token_file(path)
    path.chmod(0o600)
    assert user._read_token_file(path) == "oa_secret-token-value"
    path.write_text("\n")
    with pytest.raises(ConfigError, match="holds no token"):
        user._read_token_file(path)
    monkeypatch.setenv("OPENACCT_API_TOKEN", "has space")
    with pytest.raises(ConfigError, match="OPENACCT_API_TOKEN holds no token"):
        user.credentials()


# ------------------------------------------------------------------------------------ #SBATCH


def size(text: str, **overrides: str | None) -> user.JobSize:
    return user.job_size(user.read_directives(text, "job.sh"), overrides)


def test_directives_are_read_as_sbatch_reads_them(monkeypatch: pytest.MonkeyPatch) -> None:
    for variable in user.ENVIRONMENT.values():
        monkeypatch.delenv(variable, raising=False)
    found = user.read_directives(SCRIPT, "job.sh")
    assert found.options == {"account": ("phys", 3), "time": ("2:00:00", 4), "ntasks": ("2", 5),
                             "cpus-per-task": ("4", 6), "partition": ("gpu", 6)}
    assert found.ignored == [10]
    job = size(SCRIPT)
    assert (job.account, job.minutes, job.cpus, job.gpus, job.nodes, job.partition) == ("phys", 120, 8, 0, 1, "gpu")

    # Nodes at their most; tasks per node; GPUs per job, node or task; CPUs per GPU.
    assert size("#SBATCH -t 1-0 -N 2-4 --ntasks-per-node=8\n").cpus == 32
    assert size("#SBATCH -t 1-0 -N 2-4 --ntasks-per-node=8\n").minutes == 1440
    assert size("#SBATCH -t 30 -N 2 --gres=gpu:a100:2,shard:4\n").gpus == 4
    assert size("#SBATCH -t 30 --gpus=a100:3\n").gpus == 3
    assert size("#SBATCH -t 30 -n 4 --gpus-per-task=1 --cpus-per-gpu=6\n").cpus == 24
    assert size("#SBATCH -t 30 -G 2\n#SBATCH --gpus-per-node 1 -N 3\n").gpus == 3
    assert size("#SBATCH -t 30 --array=0-9,20-29:2%4\n").array_tasks == 15
    # An #SBATCH that is not one, comments and blank lines before the directives.
    assert size("#!/bin/sh\n\n# note\n#SBATCHX -t 99\n#SBATCH -t 5\n").minutes == 5
    # sbatch's order: the script, then SBATCH_* variables, then the command line.
    monkeypatch.setenv("SBATCH_ACCOUNT", "chem")
    assert size(SCRIPT).account == "chem"
    assert size(SCRIPT, account="bio").account == "bio"
    assert size(SCRIPT, time="10").minutes == 10


@pytest.mark.parametrize(("text", "message"), [
    ("#SBATCH -t 10 -N 0\n", "--nodes '0' is not a whole number"),
    ("#SBATCH -t 10 -N 2-\n", "--nodes '2-' is not a whole number"),
    ("#SBATCH -t UNLIMITED\n", "has no limit to price"),
    ("#SBATCH -t 10\n#SBATCH hetjob\n", "heterogeneous job"),
    ("#SBATCH -t 10 -c\n", "--cpus-per-task needs a value"),
    ("#SBATCH -t 10 stray\n", "'stray' is not an option"),
    ("#SBATCH -t 10 --array=5-1\n", "is not an array spec"),
    ("#SBATCH -t 10 -n 10000000 -c 2\n", "more than 10,000,000"),
    ("#SBATCH -t 10 -M a,b\n", "give --system"),
    ("#SBATCH -t 10 --partition=a,b\n", "names several"),
    ("#SBATCH -t 10 -n 0\n", "--ntasks '0' is not a whole number"),
    ("#SBATCH -t 10 --gres=gpu:x\n", "want a count of GPUs"),
    ("#SBATCH -t 10 --part=gpu\n", "write --part out as --partition"),
    ("#SBATCH -t 10 -A 'phys;x'\n", "is not a name"),
    ("#SBATCH -t 10 --wrap='x\n", "No closing quotation"),
])
def test_a_directive_that_cannot_be_priced_is_named_with_its_line(text: str, message: str) -> None:
    with pytest.raises(InvalidInput, match=message) as refused:
        size(text)
    assert str(refused.value).startswith("job.sh")


def test_a_members_cap_is_shown_where_the_api_gives_it() -> None:
    project = {"name": "phys", "pi": "bob", "allocated": "1000", "charged": "1.22", "refunded": "0", "held": "0",
               "available": "998.78", "expires_at": None}
    assert "your_cap" not in user._balance_row(project, "tux")
    use = {"user": "tux", "period": "month", "cap": "10.00", "spent": "1.22", "left": "8.78"}
    for given, me in (({"my_limit": use}, None), ({"limits": [{**use, "user": "ann", "cap": "5"}, use]}, "tux")):
        row = user._balance_row({**project, **given}, me)
        assert (row["your_cap"], row["you_spent"], row["you_have_left"], row["per"], row["ends"]) == (
            D("10.00"), D("1.22"), D("8.78"), "month", "never")


def test_a_running_jobs_hold_is_no_cost(capsys: pytest.CaptureFixture[str]) -> None:
    user._explain({"job_id": "77", "system": "cluster", "user": "tux", "account": "phys", "state": "RUNNING",
                   "cpus": 4, "gpus": None, "node_count": 1, "start_time": "2026-12-01T10:00:00Z", "end_time": None,
                   "charge_policy": None, "cost": "0",
                   "transactions": [{"kind": "hold", "amount": "-2.40", "quantity": None, "rate": None}]})
    assert capsys.readouterr().out.splitlines() == [
        "job 77 on cluster: tux on phys, RUNNING", "4 CPUs, 1 node", "held while it runs: 2.40",
        "cost: nothing yet: a job is charged when it ends"]


def test_a_redirect_is_an_error_and_no_credential_follows_it() -> None:
    import threading
    from http.server import BaseHTTPRequestHandler, HTTPServer

    seen: list[tuple[str, str | None]] = []

    class Redirecting(BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802 (http.server's name)
            seen.append((self.path, self.headers.get("Authorization")))
            self.send_response(302)
            self.send_header("Location", f"http://127.0.0.1:{self.server.server_port}/elsewhere")
            self.end_headers()

        def log_message(self, *args: object) -> None:
            pass

    server = HTTPServer(("127.0.0.1", 0), Redirecting)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        url = f"http://127.0.0.1:{server.server_port}"
        api = user.Api(url, user.Credentials("test", token="oa_test-token"))
        with pytest.raises(user.ApiError, match=f"redirects to {url}/elsewhere: set api_url"):
            api.get("projects")
    finally:
        server.shutdown()
        server.server_close()
    assert seen == [("/api/v1/projects", "Bearer oa_test-token")]
