"""A real ``openacct api serve`` process for the tests of the commands that ask it, and what
those commands are run with on a login node: the API's URL and a credential, no database."""

from __future__ import annotations

import os
import subprocess
import urllib.request
from pathlib import Path

from sqlalchemy import select

from tests.pipeline import OPENACCT, Process, free_port, wait_for


class ApiServer:
    """``openacct api serve`` on a free port of 127.0.0.1, with this run's database and these
    settings (``api_admins='["admin"]'``, ``munge_socket=PATH``: OPENACCT_API_ADMINS, ...), the
    default system ``cluster`` unless they say otherwise. ``with ApiServer(...) as server``, or
    ``start()`` and ``stop()``; ``url`` is where it answers."""

    def __init__(self, directory: Path, **settings: str) -> None:
        self.directory = directory
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.env = {**os.environ, "OPENACCT_DEFAULT_SYSTEM": "cluster",
                    **{f"OPENACCT_{name.upper()}": value for name, value in settings.items()}}
        self.env.pop("OPENACCT_DEBUG", None)
        self.log = directory / f"api-{self.port}.log"
        self.process: Process | None = None

    def __enter__(self) -> ApiServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def _answers(self) -> bool:
        try:
            with urllib.request.urlopen(f"{self.url}/api/v1/openapi.json", timeout=2) as response:
                return bool(response.status == 200)
        except OSError:
            return False

    def start(self) -> ApiServer:
        self.directory.mkdir(parents=True, exist_ok=True)
        self.process = Process(["api", "serve", "--listen", f"127.0.0.1:{self.port}", "--log-level", "warning"],
                               self.env, self.log).start()
        try:
            wait_for(lambda: self._answers() or not self.process or not self.process.alive(), 60, "the API to answer")
            assert self.process.alive(), f"openacct api serve exited: {self.log.read_text()[-2000:]}"
        except BaseException:
            self.stop()
            raise
        return self

    def stop(self) -> None:
        if self.process is not None:
            self.process.stop()
            self.process = None


def token(user: str, scope: str = "read") -> str:
    """A new bearer token of ``user`` (scope read, or manage), made as ``openacct token create``
    makes it, without an expiry."""
    from openacct.api import tokens
    from shared.db import session_scope
    from shared.models import User

    with session_scope() as s:
        owner = s.scalar(select(User).where(User.name == user))
        assert owner is not None, user
        _, made = tokens.create(s, owner, scope=scope, expires_days=None, label="test")  # type: ignore[arg-type]
    return made


def login_node(home: Path, url: str, **settings: str) -> dict[str, str]:
    """The environment of a user's shell on a login node: a PATH, a home, the API's URL and
    what else is given (OPENACCT_API_TOKEN=..., OPENACCT_MUNGE_SOCKET=...), and an empty
    configuration file (so no site file of this machine's is read). No database."""
    home.mkdir(parents=True, exist_ok=True)
    config = home / "openacct.toml"
    config.write_text("")
    env = {"PATH": "/usr/local/bin:/usr/bin:/bin:/usr/sbin:/sbin", "HOME": str(home), "LANG": "C.UTF-8",
           "OPENACCT_API_URL": url, "OPENACCT_CONFIG": str(config), **settings}
    assert not any(k.startswith("OPENACCT_DATABASE") or k == "OPENACCT_DATA_DIR" for k in env), env
    return env


def run(env: dict[str, str], *args: str, program: list[str] | None = None,
        stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    done = subprocess.run([*(program or [OPENACCT]), *args], env=env, capture_output=True, text=True,
                          input=stdin, timeout=120)
    assert "Traceback" not in done.stdout + done.stderr, done
    return done
