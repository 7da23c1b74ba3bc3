"""MUNGE with a real munged of our own (its own key and socket, run as user munge as Debian runs
it): credentials verify to who made them, and nothing else does; and the acceptance, a user with
no database credentials on a login node runs ``openacct balance`` as themself, proved by MUNGE
alone, and sees exactly their projects. Skipped, saying why, only where munged cannot be run."""

from __future__ import annotations

import hashlib
import json
import os
import pwd
import shutil
import subprocess
import sys
import sysconfig
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from sqlalchemy import Engine

from openacct.api import munge
from shared import config
from tests.api_server import ApiServer, login_node, run
from tests.pipeline import Process, wait_for

ROOT = Path(__file__).parents[1]
SBIN = "/usr/sbin:/usr/bin:/sbin:/bin"


def _which(name: str) -> str | None:
    return shutil.which(name, path=SBIN)


def _why_not() -> str | None:
    missing = [p for p in ("munged", "munge", "unmunge", "setpriv") if _which(p) is None]
    if missing:
        return f"{', '.join(missing)} not installed (Debian's package munge; .ci/run installs it as root)"
    if os.geteuid() != 0:
        return "munged is started as user munge, which needs root"
    try:
        pwd.getpwnam("munge")
    except KeyError:
        return "no user munge (Debian's package munge makes it)"
    return None


class Munged:
    """munged in the foreground, as user munge, on a socket under a directory of its own (0755,
    so that any user reaches the socket), with a key of its own: 1 KiB of random bytes, as
    ``mungekey`` makes one."""

    def __init__(self) -> None:
        self.directory = Path(tempfile.mkdtemp(prefix="openacct-munge-"))
        self.socket = self.directory / "munge.socket"
        self.process: Process | None = None

    def start(self) -> Munged:
        key = self.directory / "munge.key"
        key.write_bytes(os.urandom(1024))
        key.chmod(0o600)
        for path in (self.directory, key):
            shutil.chown(path, "munge", "munge")
        self.directory.chmod(0o755)  # munged refuses a directory others may write
        self.process = Process(
            ["--reuid=munge", "--regid=munge", "--init-groups", _which("munged") or "munged", "-F",
             f"--socket={self.socket}", f"--key-file={key}", f"--pid-file={self.directory / 'munged.pid'}",
             f"--log-file={self.directory / 'munged.log'}", f"--seed-file={self.directory / 'munged.seed'}"],
            {"PATH": SBIN}, Path(tempfile.gettempdir()) / f"{self.directory.name}.stderr",
            program=_which("setpriv") or "setpriv").start()

        def answers() -> bool:
            made = subprocess.run([_which("munge") or "munge", "-n", f"--socket={self.socket}"], capture_output=True)
            return made.returncode == 0 or not (self.process and self.process.alive())

        try:
            wait_for(answers, 20, "munged to answer")
            assert self.process.alive(), self.log()
        except BaseException:
            self.stop()
            raise
        return self

    def log(self) -> str:
        stderr = Path(tempfile.gettempdir()) / f"{self.directory.name}.stderr"
        texts = [p.read_text(errors="replace") for p in (self.directory / "munged.log", stderr) if p.exists()]
        return "\n".join(texts)[-2000:]

    def stop(self) -> None:
        if self.process is not None:
            self.process.stop()
            self.process = None
        (Path(tempfile.gettempdir()) / f"{self.directory.name}.stderr").unlink(missing_ok=True)
        shutil.rmtree(self.directory, ignore_errors=True)


@pytest.fixture(scope="module")
def munged() -> Iterator[Munged]:
    why = _why_not()
    if why is not None:
        pytest.skip(f"no munged can be run here: {why}")
    daemon = Munged().start()
    yield daemon
    daemon.stop()


@pytest.fixture
def socket_set(munged: Munged, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """This process's settings name the test munged's socket (munge_socket)."""
    monkeypatch.setenv("OPENACCT_MUNGE_SOCKET", str(munged.socket))
    config.get_settings.cache_clear()
    yield munged.socket
    monkeypatch.delenv("OPENACCT_MUNGE_SOCKET")
    config.get_settings.cache_clear()


def me() -> str:
    return pwd.getpwuid(os.getuid()).pw_name


# What a login node's ``openacct balance`` asks first.
ME = munge.for_request("GET", "/api/v1/me", "", b"")


def test_a_credential_verifies_to_the_user_who_made_it(socket_set: Path) -> None:
    made = munge.credential(ME)
    assert made.startswith("MUNGE:") and made.endswith(":")
    assert munge.verify(made, ME) == me()


def test_a_credential_proves_only_the_request_it_was_made_for(socket_set: Path) -> None:
    """One captured on its way to the API is no licence for another request of its user's."""
    members = munge.for_request("POST", "/api/v1/projects/phys/members", "", b'{"user": "tux"}')
    assert munge.for_request("post", "/api/v1/projects/phys/members", "", b'{"user": "tux"}') == members
    # The path is taken decoded and encoded one way: a proxy that re-encodes it changes nothing.
    assert munge.for_request("GET", "/api/v1/jobs/12+0 x", "system=a%2Bb", b"") == (
        b"openacct-api v1 GET /api/v1/jobs/12%2B0%20x?system=a%2Bb " + hashlib.sha256(b"").hexdigest().encode())
    with pytest.raises(ValueError, match="not a path of the API"):
        munge.for_request("GET", "/projects/phys", "x=/api/v1/me", b"")
    for made_for, checked_as in [
        (ME, members),
        (members, munge.for_request("POST", "/api/v1/projects/phys/members", "", b'{"user": "eve"}')),
        (members, munge.for_request("DELETE", "/api/v1/projects/phys/members", "", b'{"user": "tux"}')),
        (ME, munge.for_request("GET", "/api/v1/me", "x=1", b"")),
        (ME, munge.for_request("GET", "/api/v1/me/", "", b"")),
        (munge.MARK, ME),  # an older client's, bound to nothing
    ]:
        with pytest.raises(munge.MungeRefused, match=r"^credential made for another request \(its method"):
            munge.verify(munge.credential(made_for), checked_as)
    assert munge.verify(munge.credential(members), members) == me()


def munge_made(socket: Path, *args: str) -> str:
    """A credential made as another service makes one: ``munge -n`` (no payload, as Slurm's
    authentication) or ``munge -s PAYLOAD``."""
    return subprocess.run([_which("munge") or "munge", f"--socket={socket}", *args], capture_output=True,
                          text=True, check=True, timeout=10).stdout.strip()


@pytest.mark.parametrize("args", [["-n"], ["-s", "openacct-api v2"], ["-s", "openacct-api v1\n"],
                                  ["-s", "openacct-api v10 GET /api/v1/me"], ["-s", "\u00ff" * 40]])
def test_a_credential_made_for_another_service_is_refused(socket_set: Path, args: list[str]) -> None:
    """One captured on its way to Slurm's daemons, valid and never decoded, proves nobody to the API."""
    with pytest.raises(munge.MungeRefused, match="^not a credential made for the OpenAcct API$"):
        munge.verify(munge_made(socket_set, *args), ME)


def test_a_replayed_credential_is_refused(socket_set: Path) -> None:
    made = munge.credential(ME)
    assert munge.verify(made, ME) == me()
    with pytest.raises(munge.MungeRefused, match="^replayed credential$"):
        munge.verify(made, ME)


def test_a_tampered_credential_is_refused(socket_set: Path) -> None:
    made = munge.credential(ME)
    middle = len(made) // 2
    tampered = made[:middle] + ("A" if made[middle] != "A" else "B") + made[middle + 1:]
    with pytest.raises(munge.MungeRefused, match=r"^invalid credential \(made with another key, or altered\)$"):
        munge.verify(tampered, ME)
    assert munge.verify(made, ME) == me()  # the genuine one was never used


def test_a_credential_of_another_key_is_refused(socket_set: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    other = Munged().start()
    try:
        monkeypatch.setenv("OPENACCT_MUNGE_SOCKET", str(other.socket))
        config.get_settings.cache_clear()
        foreign = munge.credential(ME)
        assert munge.verify(munge.credential(ME), ME) == me()  # that munged's own do verify there
    finally:
        other.stop()
    monkeypatch.setenv("OPENACCT_MUNGE_SOCKET", str(socket_set))
    config.get_settings.cache_clear()
    with pytest.raises(munge.MungeRefused, match="invalid credential"):
        munge.verify(foreign, ME)


def test_a_credential_older_than_the_replay_window_is_refused(socket_set: Path) -> None:
    made = munge.credential(ME)
    with pytest.raises(munge.MungeRefused, match=r"encoded \d+ s ago: at most 120 s old"):
        munge.verify(made, ME, now=time.time() + munge.MAX_AGE + 5)
    with pytest.raises(munge.MungeRefused, match="in the future"):
        munge.verify(munge.credential(ME), ME, now=time.time() - munge.MAX_AHEAD - 5)


@pytest.mark.parametrize(("given", "message"), [
    ("", "not a MUNGE credential"),
    ("MUNGE:not base64!:", "not a MUNGE credential"),
    ("MUNGE:AAAA:\nSTATUS: 0", "not a MUNGE credential"),
    ("MUNGE:" + "A" * 10_000 + ":", "longer than 8192"),
    ("MUNGE:AAAA:", "not a MUNGE credential|invalid|unknown"),  # the form, but nothing munged can decode
])
def test_what_is_no_credential_is_refused(socket_set: Path, given: str, message: str) -> None:
    with pytest.raises(munge.MungeRefused, match=message):
        munge.verify(given, ME)


def test_without_munged_nothing_is_proved(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, munged: Munged) -> None:
    monkeypatch.setenv("OPENACCT_MUNGE_SOCKET", str(tmp_path / "none.socket"))
    config.get_settings.cache_clear()
    try:
        with pytest.raises(munge.MungeUnavailable, match="munge could not make a credential"):
            munge.credential(ME)
        with pytest.raises(munge.MungeUnavailable, match="cannot reach munged"):
            munge.verify("MUNGE:AwQFAAB" + "A" * 100 + ":", ME)
    finally:
        config.get_settings.cache_clear()


# ------------------------------------------------------------------------ the acceptance


def _unix_user(name: str) -> None:
    try:
        pwd.getpwnam(name)
    except KeyError:
        subprocess.run(["useradd", "--system", "--no-create-home", "--shell", "/usr/sbin/nologin", name], check=True)


def _as(name: str) -> list[str]:
    return [_which("setpriv") or "setpriv", f"--reuid={name}", f"--regid={name}", "--init-groups"]


def _python_for(name: str, env: dict[str, str]) -> list[str]:
    """``openacct`` as ``name`` runs it: this Python if they may run it (a venv under /root is not
    theirs), else the system's Python of the same version, with the checkout and its packages."""
    version = f"{sys.version_info.major}.{sys.version_info.minor}"
    tried = []
    for python in dict.fromkeys([sys.executable, f"/usr/bin/python{version}"]):
        probe = subprocess.run([*_as(name), python, "-c", "import openacct.cli"], env=env, capture_output=True,
                               text=True, timeout=60)
        if probe.returncode == 0:
            return [python, "-m", "openacct"]
        tried.append(f"{python}: {(probe.stderr.strip().splitlines() or ['?'])[-1]}")
    pytest.skip(f"no Python {version} that user {name} can run openacct with: {'; '.join(tried)}")


@pytest.fixture
def api(munged: Munged, database_url: str, tmp_path: Path) -> Iterator[ApiServer]:
    with ApiServer(tmp_path / "api", munge_socket=str(munged.socket)) as server:
        yield server


def test_a_user_with_no_database_credentials_sees_exactly_their_projects_through_munge(
        center: Engine, munged: Munged, api: ApiServer) -> None:
    from openacct import shortcuts
    from shared.db import session_scope

    with session_scope():  # a project tux is not in
        shortcuts.create_project("astro", pi="bob")
        shortcuts.deposit("astro", "500", start="2000-01-01")
    _unix_user("tux")
    home = munged.directory / "home"  # somewhere tux may read its (empty) configuration
    env = login_node(home, api.url, OPENACCT_MUNGE_SOCKET=str(munged.socket))
    home.chmod(0o755)
    (home / "openacct.toml").chmod(0o644)
    env |= {"PYTHONPATH": os.pathsep.join(dict.fromkeys([str(ROOT), sysconfig.get_paths()["purelib"],
                                                         sysconfig.get_paths()["platlib"]])),
            "PYTHONDONTWRITEBYTECODE": "1", "HOME": "/nonexistent"}
    assert {k for k in env if k.startswith("OPENACCT_")} == {"OPENACCT_API_URL", "OPENACCT_MUNGE_SOCKET",
                                                              "OPENACCT_CONFIG"}
    openacct = _as("tux") + _python_for("tux", env)

    listed = run(env, "balance", "--json", program=openacct)
    assert listed.returncode == 0, listed
    assert sorted(p["name"] for p in json.loads(listed.stdout)) == ["chem", "phys"]
    table = run(env, "balance", program=openacct)
    assert table.returncode == 0 and "chem" in table.stdout and "phys" in table.stdout, table
    assert "astro" not in table.stdout and "1,000.00" in table.stdout
    # Every request carries a credential of its own: the next commands' pass too.
    script = munged.directory / "job.sh"
    script.write_text("#!/bin/sh\n#SBATCH -t 60 -n 2\n")
    script.chmod(0o644)
    unnamed = run(env, "estimate", str(script), program=openacct)
    assert unnamed.returncode == 1 and "one of your projects (chem, phys)" in unnamed.stderr, unnamed
    priced = run(env, "estimate", str(script), "-A", "phys", program=openacct)
    assert priced.returncode == 0 and "at most 0.10" in priced.stdout, priced

    # root is nobody in this center: MUNGE proves who it is, and the API knows no such user.
    as_root = run(env, "balance", program=[sys.executable, "-m", "openacct"])
    assert (as_root.returncode, as_root.stdout) == (1, "")
    assert as_root.stderr == "error: the API refused your credentials (MUNGE): no active user root\n"


def test_the_api_refuses_a_slurm_credential_and_says_503_when_it_cannot_ask_munged(
        center: Engine, munged: Munged, api: ApiServer, tmp_path: Path) -> None:
    def me_with(credential: str, url: str = api.url) -> httpx.Response:
        return httpx.get(f"{url}/api/v1/me", headers={"Authorization": f"MUNGE {credential}"}, timeout=30)

    plain = me_with(munge_made(munged.socket, "-n"))
    assert (plain.status_code, plain.json()) == (401, {
        "error": "MUNGE credential refused: not a credential made for the OpenAcct API"})
    # A credential names its request: one made for GET /api/v1/projects proves nothing for /me.
    elsewhere = me_with(munge_made(munged.socket, "-s", munge.for_request("GET", "/api/v1/projects", "", b"").decode()))
    assert (elsewhere.status_code, elsewhere.json()) == (401, {
        "error": "MUNGE credential refused: credential made for another request (its method, path and body must match)"})
    # A server whose munged is away: its trouble, not the caller's credential.
    with ApiServer(tmp_path / "no-munged", munge_socket=str(tmp_path / "none.socket")) as down:
        refused = me_with(munge_made(munged.socket, "-s", ME.decode()), down.url)
    assert refused.status_code == 503 and "www-authenticate" not in refused.headers
    # the detail (munged's socket, its error) goes to the server's log, not to whoever asks
    assert refused.json() == {"error": "the API cannot check MUNGE credentials now: use a bearer token, "
                                       "or tell your center"}


def test_a_credential_proves_nothing_on_the_portal_and_names_an_encoded_path_as_the_api_sees_it(
        center: Engine, munged: Munged, api: ApiServer) -> None:
    """The portal takes no MUNGE credential, even with an API path hidden in its query (a
    credential captured on its way to GET /api/v1/me showed the user's projects there); a job id
    with characters that get percent-encoded verifies as the route sees it."""
    def made(method: str, path: str, query: str = "") -> dict[str, str]:
        credential = munge_made(munged.socket, "-s", munge.for_request(method, path, query, b"").decode())
        return {"Authorization": f"MUNGE {credential}"}

    for page in ("/", "/projects/phys", "/projects/phys?days=30"):
        response = httpx.get(f"{api.url}{page}{'&' if '?' in page else '?'}x=/api/v1/me",
                             headers=made("GET", "/api/v1/me"), timeout=30)
        assert response.status_code == 401 and "Sign in</button>" in response.text, (page, response.status_code)
        assert "My projects" not in response.text and "phys · OpenAcct" not in response.text
    job = httpx.get(f"{api.url}/api/v1/jobs/12%2B0%20x?system=cluster",
                    headers=made("GET", "/api/v1/jobs/12+0 x", "system=cluster"), timeout=30)
    # The credential proved its user (root, whom the center does not know): it matched the request.
    assert (job.status_code, job.json()) == (401, {"error": "no active user root"}), job.text
