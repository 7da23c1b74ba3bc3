"""The few settings a scheduler hook needs, read with the standard library only.

Hooks run with an almost empty environment (no OPENACCT_* variables, no HOME) and must start in
milliseconds, so they cannot use ``shared.config`` (pydantic). This module reads the same sources
by the same rules: ``OPENACCT_*`` variables first, then the TOML file named by ``OPENACCT_CONFIG``
or ``/etc/openacct/openacct.toml``. Paths are plain strings: pathlib costs a hook milliseconds.
"""

from __future__ import annotations

import os

DEFAULT_CONFIG_FILE = "/etc/openacct/openacct.toml"
# Where a daemon account without a home keeps OpenAcct's files.
SYSTEM_DATA_DIR = "/var/lib/openacct"
HOOK_KEYS = ("spool_dir", "default_system", "data_dir", "admission_socket", "admission_timeout",
             "admission_on_error", "slurm_bin_dir")
# Defaults the same as shared.config's.
ADMISSION_TIMEOUT = 3.0
SLURM_BIN_DIR = "/usr/bin"


def config_path() -> str | None:
    named = os.environ.get("OPENACCT_CONFIG")
    if named:
        return named
    return DEFAULT_CONFIG_FILE if os.path.isfile(DEFAULT_CONFIG_FILE) else None


def default_data_dir() -> str:
    base = os.environ.get("XDG_DATA_HOME")
    if base:
        return os.path.join(base, "openacct")
    home = os.path.expanduser("~")
    if home == "~" or not os.path.isabs(home):  # no HOME and no passwd entry
        return SYSTEM_DATA_DIR
    return os.path.join(home, ".local", "share", "openacct")


def _simple_strings(text: str) -> dict[str, str] | None:
    """The top-level ``key = "value"`` lines of a config, or None if the file holds anything a
    line reader could get wrong (then tomllib reads it). tomllib alone costs ~10 ms per hook."""
    found: dict[str, str] = {}
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        if line.startswith("["):
            break  # tables come after the top-level keys
        key, sep, value = line.partition("=")
        key, value = key.strip(), value.strip()
        if not sep or not key.replace("_", "").isalnum():
            return None
        if key not in HOOK_KEYS:
            continue
        if value.replace(".", "", 1).isdigit():
            found[key] = value
            continue
        if len(value) < 2 or value[0] != '"' or value[-1] != '"' or '"' in value[1:-1] or "\\" in value:
            return None
        found[key] = value[1:-1]
    return found


def read_file_settings() -> dict[str, object]:
    path = config_path()
    if path is None:
        return {}
    with open(path, "rb") as f:
        data = f.read()
    simple = _simple_strings(data.decode("utf-8"))
    if simple is not None:
        return dict(simple)
    import tomllib

    return tomllib.loads(data.decode("utf-8"))


class HookSettings:
    """What the hooks read, as the full configuration would resolve them: ``spool_dir``,
    ``default_system``, and for the prolog's admission check ``admission_socket``,
    ``admission_timeout``, ``admission_on_error`` and ``slurm_bin_dir``."""

    def __init__(self, *, admission: bool = False) -> None:
        env = os.environ
        # The prolog always reads the file: admission settings kept only there must not be missed.
        needs_file = admission or not (env.get("OPENACCT_SPOOL_DIR") and env.get("OPENACCT_DEFAULT_SYSTEM"))
        file = read_file_settings() if needs_file else {}

        def setting(name: str) -> str | None:
            value = env.get(f"OPENACCT_{name.upper()}") or file.get(name)
            return str(value) if value not in (None, "") else None

        data_dir = setting("data_dir") or default_data_dir()
        self.spool_dir: str = setting("spool_dir") or os.path.join(data_dir, "spool")
        self.default_system = setting("default_system")
        self.admission_socket = setting("admission_socket")
        timeout = setting("admission_timeout")
        try:
            self.admission_timeout = float(timeout) if timeout else ADMISSION_TIMEOUT
        except ValueError:
            raise ValueError(f"admission_timeout is {timeout!r}, not a number of seconds") from None
        if not 0.2 <= self.admission_timeout <= 30:
            raise ValueError(f"admission_timeout is {timeout}: from 0.2 to 30 seconds")
        on_error = setting("admission_on_error") or "open"
        if on_error not in ("open", "closed"):
            raise ValueError(f"admission_on_error is {on_error!r}: open or closed")
        self.admission_fails_open = on_error == "open"
        self.slurm_bin_dir = setting("slurm_bin_dir") or SLURM_BIN_DIR
