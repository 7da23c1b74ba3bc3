"""The few settings a scheduler hook needs, read with the standard library only.

Hooks run with an almost empty environment (no OPENACCT_* variables, no HOME) and must start in
milliseconds, so they cannot use ``shared.config`` (pydantic). This module reads the same sources
by the same rules: ``OPENACCT_*`` variables first, then the TOML file named by ``OPENACCT_CONFIG``
or ``/etc/openacct/openacct.toml``.
"""

from __future__ import annotations

import os
from pathlib import Path

DEFAULT_CONFIG_FILE = Path("/etc/openacct/openacct.toml")
# Where a daemon account without a home keeps OpenAcct's files.
SYSTEM_DATA_DIR = Path("/var/lib/openacct")


def config_path() -> Path | None:
    named = os.environ.get("OPENACCT_CONFIG")
    if named:
        return Path(named)
    return DEFAULT_CONFIG_FILE if DEFAULT_CONFIG_FILE.is_file() else None


def default_data_dir() -> Path:
    base = os.environ.get("XDG_DATA_HOME")
    if base:
        return Path(base) / "openacct"
    try:
        return Path.home() / ".local" / "share" / "openacct"
    except RuntimeError:  # no HOME and no passwd entry
        return SYSTEM_DATA_DIR


def read_file_settings() -> dict[str, object]:
    path = config_path()
    if path is None:
        return {}
    import tomllib  # only when there is a file: it costs milliseconds

    with open(path, "rb") as f:
        return tomllib.load(f)


class HookSettings:
    """``spool_dir`` and ``default_system``, as the full configuration would resolve them."""

    def __init__(self) -> None:
        env = os.environ
        needs_file = not (env.get("OPENACCT_SPOOL_DIR") and env.get("OPENACCT_DEFAULT_SYSTEM"))
        file = read_file_settings() if needs_file else {}

        def setting(name: str) -> str | None:
            value = env.get(f"OPENACCT_{name.upper()}") or file.get(name)
            return str(value) if value not in (None, "") else None

        data_dir = Path(setting("data_dir") or default_data_dir())
        self.spool_dir = Path(setting("spool_dir") or data_dir / "spool")
        self.default_system = setting("default_system")
