"""Signed messages: no worker acts on a message that a holder of a key did not sign.

Anyone who can reach the broker can put a message on a queue. Each message a worker acts on is
an envelope: the task it is for, its contents, the id of the key that signed it, and an
HMAC-SHA256 over all of them. The worker checks it before anything else; a message unsigned,
signed by an unknown key, by a key whose role may not ask this task, or changed on the way is
refused with the reason (the batch workers park it).

Keys live in a file (``openacct keys generate``; ``signing_key_file`` / OPENACCT_SIGNING_KEY_FILE),
mode 0600: several keys, each with an id, a role and a secret; the first signs, every one
verifies, so a new key is put first, spread to every host, and the old one removed later.
Roles: ``scheduler`` keys (the relay, on the scheduler's host) may send job events;
``admin`` keys (the CLI of an administrator, the reporter's schedule) may send anything, so a
compromised scheduler host cannot refund.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import os
import secrets
import stat
import time
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

from shared.errors import ConfigError, OpenAcctError

ROLES = ("scheduler", "admin")
# Which roles may ask each task; a task not listed takes an administrator's key only.
# Recomputing Slurm's limits moves no money: the refunder asks it after a refund, whatever its key.
MAY_ASK = {"charger.process_batch": {"scheduler", "admin"}, "reporter.slurm_limits": {"scheduler", "admin"}}
MARK = "openacct-signed"


class Refused(OpenAcctError):
    """A message no worker may act on: unsigned, badly signed, or signed by a key not allowed."""


@dataclass(frozen=True)
class Key:
    id: str
    role: str
    secret: bytes


@dataclass(frozen=True)
class Keyring:
    keys: tuple[Key, ...]

    def seal(self, task: str, body: Any, task_id: str | None = None) -> dict[str, Any]:
        """The envelope of ``body`` for ``task`` (and, where the sender tracks it, the id of the
        task that carries it), signed with the first key."""
        key = self.keys[0]
        return {MARK: 1, "task": task, "id": task_id, "kid": key.id, "body": body,
                "sig": _signature(key.secret, task, task_id, key.id, body)}

    def open(self, task: str, message: Any) -> Any:
        """The body of a message for ``task`` if one of these keys signed it, for this task, and a
        role that may ask it; else ``Refused`` with the reason."""
        if not isinstance(message, dict) or message.get(MARK) != 1:
            raise Refused("unsigned message: every message a worker acts on is signed (see signing_key_file)")
        kid, body, sig = message.get("kid"), message.get("body"), message.get("sig")
        if message.get("task") != task:
            raise Refused(f"message signed for {message.get('task')!r}, not for {task!r}")
        key = next((k for k in self.keys if k.id == kid), None)
        if key is None:
            raise Refused(f"message signed by key {kid!r}, which this worker does not know (removed, or never given)")
        try:
            expected = _signature(key.secret, task, message.get("id"), key.id, body)
        except (TypeError, ValueError):  # what JSON cannot say (a datetime kombu decoded, a lone surrogate)
            expected = ""
        if not (isinstance(sig, str) and len(sig) == 64 and all(c in "0123456789abcdef" for c in sig)
                and expected and hmac.compare_digest(sig, expected)):
            raise Refused(f"message signed by key {kid!r} does not match its signature: changed on the way, or forged")
        if key.role not in MAY_ASK.get(task, {"admin"}):
            raise Refused(f"{task} is not for a {key.role} key ({kid!r}): an administrator's key signs those")
        return body


def _signature(secret: bytes, task: str, task_id: Any, kid: str, body: Any) -> str:
    whole = json.dumps([task, task_id, kid, body], sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hmac.new(secret, whole.encode(), hashlib.sha256).hexdigest()


def load(path: Path) -> Keyring:
    """The keys of a key file, or ``ConfigError`` saying what is wrong with it."""
    try:
        info = path.stat()
        text = path.read_text()
    except OSError as exc:
        raise ConfigError(f"signing key file {path}: {exc.strerror}") from None
    if info.st_mode & (stat.S_IRWXG | stat.S_IRWXO):
        raise ConfigError(f"signing key file {path} is open to others (mode {stat.S_IMODE(info.st_mode):o}): "
                          "chmod 600 it")
    try:
        raw = json.loads(text)["keys"]
        keys = tuple(Key(str(k["id"]), str(k["role"]), base64.b64decode(k["secret"], validate=True)) for k in raw)
    except (ValueError, KeyError, TypeError) as exc:
        raise ConfigError(f"signing key file {path} is not a key file ({exc})") from None
    if not keys:
        raise ConfigError(f"signing key file {path} has no key")
    for key in keys:
        if key.role not in ROLES or len(key.secret) < 32:
            raise ConfigError(f"signing key {key.id!r} in {path}: role one of {', '.join(ROLES)}, secret of 32 bytes")
    return Keyring(keys)


def generate(path: Path, role: str, *, rotate: bool = False) -> Key:
    """A new key, first in the file at ``path`` (mode 0600): a new file, or with ``rotate`` put
    before the keys the file has (they still verify until they are removed)."""
    if role not in ROLES:
        raise ConfigError(f"role {role!r} is not one of {', '.join(ROLES)}")
    earlier: list[dict[str, str]] = []
    if path.exists():
        if not rotate:
            raise ConfigError(f"{path} exists: give --rotate to put a new key first in it")
        load(path)
        earlier = json.loads(path.read_text())["keys"]
    key = Key(f"{role}-{time.strftime('%Y%m%d')}-{secrets.token_hex(4)}", role, secrets.token_bytes(32))
    keys = [{"id": key.id, "role": key.role, "secret": base64.b64encode(key.secret).decode()}, *earlier]
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
    with os.fdopen(fd, "w") as out:
        json.dump({"keys": keys}, out, indent=2)
    os.replace(tmp, path)
    return key


@lru_cache(maxsize=1)
def keyring() -> Keyring | None:
    """This process's keys (``signing_key_file``); None where none are configured."""
    from shared.config import get_settings

    path = get_settings().signing_key_file
    return None if path is None else load(path)


def required(what: str) -> None:
    """A long-running process that sends or takes messages refuses to start without keys,
    unless the site said ``allow_unsigned``: its messages would be refused, or forged ones taken."""
    from shared.config import get_settings

    if keyring() is None and not get_settings().allow_unsigned:
        raise ConfigError(f"the {what} has no signing key file (set OPENACCT_SIGNING_KEY_FILE or signing_key_file; "
                          "openacct keys generate makes one), and allow_unsigned is not set")


def seal(task: str, body: Any, task_id: str | None = None) -> Any:
    """A message for ``task``: signed with this process's first key; unsigned where it has none
    (only a site that set ``allow_unsigned`` accepts those)."""
    keys = keyring()
    return body if keys is None else keys.seal(task, body, task_id)


def may_send(task: str) -> bool:
    """Whether this process's key may ask ``task`` (without keys: whether unsigned goes)."""
    keys = keyring()
    return keys.keys[0].role in MAY_ASK.get(task, {"admin"}) if keys is not None else True


def unseal(task: str, message: Any) -> Any:
    """The body of a message a worker is about to act on, or ``Refused``. With keys, every
    message is checked, whatever ``allow_unsigned`` says; without, only that lets one through."""
    from shared.config import get_settings

    keys = keyring()
    if keys is not None:
        return keys.open(task, message)
    if get_settings().allow_unsigned:
        return message
    raise Refused("this worker has no signing key file to check messages with (signing_key_file)")


def carries(message: Any, task_id: str) -> bool:
    """Whether a (checked) message was signed as the task ``task_id``: only then may a worker
    say that task applied (the relay lets go of its events), or a replay under another task's
    id could make the relay drop events nobody charged."""
    return isinstance(message, dict) and message.get("id") == task_id
