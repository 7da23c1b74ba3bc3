"""MUNGE, which every Slurm cluster already runs: who a login node's request comes from.

The user commands (``openacct balance``, ``job cost``, ``estimate``) send ``Authorization: MUNGE
CREDENTIAL`` with a fresh credential from ``credential(for_request(...))``: munged encodes the
caller's uid, which a user cannot forge, with a payload that names the one request it is for. The API checks it with ``verify()`` (``unmunge``),
which needs the cluster's munge key on the API's host, as slurmctld's does. A credential proves its
user once: munged refuses to decode the same one twice while it could still be valid ("Replayed
credential"), and ``verify`` refuses one encoded more than ``MAX_AGE`` seconds ago, whatever TTL
it was made with, so one found later in a log or a proxy's memory proves nothing.

Every credential made for the API carries ``for_request``'s payload: ``MARK``, the request's
method, its target (from /api/v1/ on) and its body's SHA-256; ``verify`` refuses any other. So a
credential captured on its way to slurmctld or slurmd (no payload, or Slurm's), which the same key
decodes and which was not decoded yet, cannot be replayed to the API as its user; and one captured
on its way to the API proves nothing for another request (a PI's credential for GET /me is no
licence to change a project's members).

Both run MUNGE's own programs, never through a shell, with a timeout; ``munge_socket`` names
munged's socket where the site's is not MUNGE's default. Only the standard library is imported
here: a login node's ``openacct`` loads this module for every request.
"""

from __future__ import annotations

import hashlib
import os
import pwd
import re
import shutil
import subprocess
import time
import urllib.parse

# A credential is "MUNGE:" base64 ":", a few hundred characters without a payload; what MUNGE
# would take (2 MiB) is far more than a request header should carry.
CREDENTIAL = re.compile(r"MUNGE:[A-Za-z0-9+/]+={0,2}:")
MAX_CREDENTIAL = 8192
# What every credential made for the API starts its payload with.
MARK = b"openacct-api v1"
API_ROOT = "/api/v1/"
MAX_AGE = 120  # seconds since munged encoded it: the replay window, within munged's TTL
MAX_AHEAD = 60  # seconds a credential's encode time may be ahead of this host's clock
TIMEOUT = 2.0  # seconds for munge or unmunge, munged's answer included
SEARCH_PATH = "/usr/bin:/usr/sbin:/usr/local/bin:/usr/local/sbin:/bin:/sbin"

# MUNGE's error numbers (munge.h), for a refusal whose unmunge printed nothing clearer.
ERRORS = {
    1: "munged failed", 2: "invalid argument", 3: "credential too long", 6: "cannot reach munged",
    8: "not a MUNGE credential", 9: "unknown credential version", 10: "unknown cipher",
    11: "unknown MAC", 12: "unknown compression", 13: "unknown security realm",
    14: "invalid credential (made with another key, or altered)", 15: "expired credential",
    16: "rewound credential (encoded in the future)", 17: "replayed credential",
    18: "unauthorized credential decode",
}


class MungeRefused(Exception):  # noqa: N818 (the contract's name: a refusal, not a failure)
    """The credential proves nobody: the reason, one line, safe to send back to the caller."""


class MungeUnavailable(MungeRefused):
    """MUNGE cannot be asked here: its programs are missing, or munged does not answer."""


def _program(name: str) -> str:
    found = shutil.which(name) or shutil.which(name, path=SEARCH_PATH)
    if found is None:
        raise MungeUnavailable(f"{name} is not installed (Debian's package munge)")
    return found


def _socket_option() -> list[str]:
    from shared.config import get_settings

    socket = get_settings().munge_socket
    return [f"--socket={socket}"] if socket else []


def _run(argv: list[str], stdin: bytes) -> subprocess.CompletedProcess[bytes]:
    """Bytes out: a payload that is not ours may be anything."""
    try:
        return subprocess.run(argv, input=stdin, capture_output=True, timeout=TIMEOUT,
                              env={"PATH": SEARCH_PATH, "LC_ALL": "C"}, check=False)
    except subprocess.TimeoutExpired:
        raise MungeUnavailable(f"{os.path.basename(argv[0])} had no answer from munged in {TIMEOUT:g} s") from None
    except OSError as exc:
        raise MungeUnavailable(f"cannot run {argv[0]}: {exc.strerror or exc}") from None


def _complaint(stderr: bytes) -> str:
    """munge's and unmunge's one-line error ("unmunge: Error: Replayed credential"), cleaned."""
    lines = [line.strip() for line in stderr.decode(errors="replace").splitlines() if line.strip()]
    if not lines:
        return ""
    text = lines[-1]
    for prefix in ("munge:", "unmunge:", "Error:"):
        text = text.removeprefix(prefix).strip()
    return "".join(c if c.isprintable() else "?" for c in text)[:200]


def for_request(method: str, path: str, query: str, body: bytes) -> bytes:
    """The payload of a credential for one request: ``MARK``, the method, the target and the
    SHA-256 of the body. ``path`` is the request's path, percent-decoded, as the API's routes see it
    (from /api/v1/ on); it is encoded again here one way, so a proxy that re-encodes paths (Apache's
    ProxyPass does) changes nothing. ``query`` is the query string as sent. ASCII, one line."""
    if not path.startswith(API_ROOT):
        raise ValueError(f"not a path of the API: {path!r}")
    target = urllib.parse.quote(path, safe="/") + (f"?{query}" if query else "")
    return b" ".join([MARK, method.upper().encode("ascii"), target.encode("ascii"),
                      hashlib.sha256(body).hexdigest().encode()])


def credential(payload: bytes) -> str:
    """A new credential of this process's user for the API, from munged (``munge``, the payload on
    its standard input: ``for_request``'s)."""
    done = _run([_program("munge"), *_socket_option()], payload)
    made = done.stdout.decode("ascii", errors="replace").strip()
    if done.returncode != 0 or not CREDENTIAL.fullmatch(made):
        reason = _complaint(done.stderr) or ERRORS.get(done.returncode, f"munge exited {done.returncode}")
        raise MungeUnavailable(f"munge could not make a credential: {reason}")
    return made


def _decoded(stdout: bytes) -> tuple[dict[str, str], bytes]:
    """unmunge's answer: its metadata ("KEY: value" lines), a blank line, then the payload."""
    head, _, payload = stdout.partition(b"\n\n")
    fields: dict[str, str] = {}
    for line in head.decode("ascii", errors="replace").splitlines():
        key, colon, value = line.partition(":")
        if colon and key.strip().isupper():
            fields[key.strip()] = value.strip()
    return fields, payload


def verify(credential: str, payload: bytes, *, now: float | None = None) -> str:
    """The user name ``credential`` proves for the request whose ``for_request`` payload is
    ``payload``, or ``MungeRefused`` with the reason.

    ``unmunge`` decodes it (the credential on its standard input): its status must be Success,
    its payload exactly ``payload``, its UID a user of this host's password database, and it must
    have been encoded in the last ``MAX_AGE`` seconds. munged itself refuses a credential made
    with another key, altered, expired, or replayed (decoded once already)."""
    credential = credential.strip()
    if len(credential) > MAX_CREDENTIAL:
        raise MungeRefused(f"credential longer than {MAX_CREDENTIAL} characters")
    if not CREDENTIAL.fullmatch(credential):
        raise MungeRefused("not a MUNGE credential (MUNGE:...:, from munge)")
    argv = [_program("unmunge"), *_socket_option(), "--numeric", "--keys=STATUS,ENCODE_TIME,UID"]
    done = _run(argv, credential.encode("ascii"))
    fields, carried = _decoded(done.stdout)
    status, complaint = fields.get("STATUS", ""), _complaint(done.stderr)
    if done.returncode != 0 or status != "0":
        code = int(status) if status.isdigit() else done.returncode
        if code == 6:
            raise MungeUnavailable(f"cannot reach munged: {complaint or 'no answer'}")
        raise MungeRefused(ERRORS.get(code) or complaint or f"unmunge exited {done.returncode}")
    if carried != payload:
        if carried == MARK or carried.startswith(MARK + b" "):  # an older client's, or a captured one's
            raise MungeRefused("credential made for another request (its method, path and body must match)")
        raise MungeRefused("not a credential made for the OpenAcct API")  # none (munge -n), or Slurm's
    try:
        encoded, uid = int(fields["ENCODE_TIME"]), int(fields["UID"])
    except (KeyError, ValueError):
        raise MungeRefused(f"unmunge's answer lacks ENCODE_TIME or UID: {sorted(fields)}") from None
    now = time.time() if now is None else now
    if encoded < now - MAX_AGE:
        raise MungeRefused(f"credential encoded {int(now - encoded)} s ago: at most {MAX_AGE} s old, make a new one")
    if encoded > now + MAX_AHEAD:
        raise MungeRefused(f"credential encoded {int(encoded - now)} s in the future: is this host's clock right?")
    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        raise MungeRefused(f"uid {uid} is no user of this host") from None


def installed() -> bool:
    """Whether MUNGE's programs are on this host (munged may still be down)."""
    return shutil.which("munge") is not None or shutil.which("munge", path=SEARCH_PATH) is not None
