"""The local spool between the scheduler hooks and the relay. Standard library only.

A hook appends each event to the spool's log, ``log/current``, as one framed record, and fsyncs
it: once the hook has exited 0 the event survives a crash or a power cut. The relay renames the
log to a segment (``log/<ns>.seg``) when it wants more to ship, waits for any writer still
appending to it (writers hold a lock while they write, and check after locking that the file
they opened is still the current log), ships the segment's records and deletes the segment once
the broker has all of them: one file deletion per segment, not per event, which on a journaling
filesystem costs more than the rest of the relay's work together.

A record is ``\nOA1 <crc32 hex> <length> <ns spooled> <event bytes>``. Its CRC finds a record
torn by a crash mid-append, and the newline before every record lets the next one be found
after it; the relay sets torn bytes aside in ``reject/``. ``new/`` holds events as files of
their own (``<ns>-<event id>.json``): where a hook cannot append to the log (a log another user
created unwritable) and from releases before the log; the relay ships both. Input that is not
an event goes to ``reject/`` with its reason.
"""

from __future__ import annotations

import _thread
import fcntl
import os
import stat
import time
import zlib

from shared.errors import OpenAcctError

# Annotations only: collections.abc costs a hook the import of collections.
TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Iterable, Mapping

# Paths are plain strings: pathlib costs a hook several milliseconds to import.
PathLike = str | os.PathLike[str]

TMP, NEW, REJECT, LOG = "tmp", "new", "reject", "log"
CURRENT, SEGMENT = "current", ".seg"
PROGRESS = ".shipped"  # beside a segment the relay is shipping: how many of its records are out
MAGIC = b"\nOA1 "
# An event is a few hundred bytes; anything near this is not one.
MAX_EVENT_BYTES = 256 * 1024


def ensure(spool_dir: PathLike) -> None:
    """Create the spool, readable and writable by its owner and group only (the hooks' user and
    the relay): whoever can write to it can put events in it."""
    for part in (TMP, NEW, REJECT, LOG):
        path = os.path.join(spool_dir, part)
        if not os.path.isdir(path):
            os.makedirs(path, mode=0o770, exist_ok=True)
            # makedirs' mode is cut by the umask; setgid: files made in it by any hook's user
            # belong to the spool's group, so the relay can read (and the next hook append to) them
            os.chmod(path, 0o2770)


# Files the spool creates: new ones only, never through a link someone left in its place.
CREATE = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
ACLS = ("system.posix_acl_access", "system.posix_acl_default")


class UnsafeSpool(OpenAcctError):
    """A spool that someone besides its owner and its group could put events into."""


def check_safe(spool_dir: PathLike) -> None:
    """Refuse a spool whose events anyone but its owner (the hooks' user) and its group (with
    the relay) could have written: each of its folders a real folder (not a link), of the
    spool's owner and group, not writable by others, without ACLs that could grant it. The spool
    is this process's user's (or root's, made for it), and no folder above it lets another user
    put a spool of theirs in its place."""
    top = os.lstat(spool_dir)
    if top.st_uid not in (os.geteuid(), 0):
        raise UnsafeSpool(f"spool {spool_dir} belongs to uid {top.st_uid}, not to this user (uid {os.geteuid()}) "
                          "nor root: someone else made it; remove it and let the relay make the spool")
    _check_parents(os.path.abspath(spool_dir))
    for part in ("", TMP, NEW, REJECT, LOG):
        path = os.path.join(spool_dir, part)
        info = os.lstat(path)
        if stat.S_ISLNK(info.st_mode) or not stat.S_ISDIR(info.st_mode):
            raise UnsafeSpool(f"spool {path} is not a folder but a {'link' if stat.S_ISLNK(info.st_mode) else 'file'}: "
                              "remove it and let the relay make the spool")
        if info.st_uid != top.st_uid or info.st_gid != top.st_gid:
            raise UnsafeSpool(f"spool {path} belongs to uid {info.st_uid} gid {info.st_gid}, not to the spool's "
                              f"owner uid {top.st_uid} gid {top.st_gid}: someone else made it; remove it")
        if info.st_mode & stat.S_IWOTH:
            raise UnsafeSpool(f"spool {path} is writable by every user, who could forge events: chmod o-w it "
                              "(the hooks' user and the relay's group need access, nobody else)")
        try:
            acls = [name for name in os.listxattr(path, follow_symlinks=False) if name in ACLS]
        except OSError:  # a filesystem without extended attributes has no ACLs either
            acls = []
        if acls:
            raise UnsafeSpool(f"spool {path} has an ACL ({', '.join(acls)}), which may let others write to it: "
                              "setfacl -b it")


def _check_parents(path: str) -> None:
    """Who may rename or replace a folder is whoever may write to the folder above it: each one
    up to / is root's or this user's, and writable by others only with the sticky bit (/tmp)."""
    parent = os.path.dirname(path)
    while True:
        info = os.stat(parent)
        if info.st_uid not in (os.geteuid(), 0):
            raise UnsafeSpool(f"{parent}, above the spool, belongs to uid {info.st_uid}, who could replace the "
                              "spool with one of their own: keep the spool under folders of root or this user")
        if info.st_mode & stat.S_IWOTH and not info.st_mode & stat.S_ISVTX:
            raise UnsafeSpool(f"{parent}, above the spool, is writable by every user, who could replace the spool "
                              "with one of their own: chmod o-w it")
        if parent == os.path.dirname(parent):
            return
        parent = os.path.dirname(parent)


def durable_write(directory: str, name: str, data: bytes, tmp_dir: str) -> str:
    """Write ``data`` as ``directory/name`` so that it is whole or absent after a crash."""
    tmp = os.path.join(tmp_dir, f"{name}.{_writer()}.tmp")
    try:
        os.unlink(tmp)  # left by a writer of this name that died mid-write
    except FileNotFoundError:
        pass
    fd = os.open(tmp, CREATE, 0o640)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view):]
        os.fsync(fd)
    finally:
        os.close(fd)
    final = os.path.join(directory, name)
    os.rename(tmp, final)
    _fsync_dir(directory)
    return final


def _writer() -> str:
    """This process and thread: the receiver's threads write side by side."""
    return f"{os.getpid()}-{_thread.get_ident()}"


def _safe(event_id: str) -> str:
    return "".join(c if c.isalnum() or c in "._-" else "_" for c in event_id)[:120]


def write(spool_dir: PathLike, event_id: str, data: bytes) -> str:
    """Spool one event durably; returns where it went."""
    spool_dir = os.fspath(spool_dir)
    try:
        return append(spool_dir, data)
    except FileNotFoundError:
        ensure(spool_dir)
        return append(spool_dir, data)
    except PermissionError:  # a log this user may not append to: the event still goes in
        return write_file(spool_dir, event_id, data)


def write_many(spool_dir: PathLike, events: list[tuple[str, bytes]]) -> None:
    """Spool many events durably with one write and one fsync (``openacct publish``'s batches)."""
    spool_dir = os.fspath(spool_dir)
    if not events:
        return
    records = _frames(data for _, data in events)
    try:
        _append_framed(spool_dir, records)
    except FileNotFoundError:
        ensure(spool_dir)
        _append_framed(spool_dir, records)
    except PermissionError:
        for event_id, data in events:
            write_file(spool_dir, event_id, data)


def append(spool_dir: str, data: bytes) -> str:
    """Append one record to the log and fsync it."""
    return _append_framed(spool_dir, frame(data))


def _append_framed(spool_dir: str, records: bytes) -> str:
    path = os.path.join(spool_dir, LOG, CURRENT)
    for _ in range(1000):
        try:
            fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_NOFOLLOW | os.O_CLOEXEC)
        except FileNotFoundError:
            fd = _create_log(path)
            if fd is None:
                continue  # another hook made it first: append to theirs
        try:
            # Exclusive while writing, so that a record is never split by another's; the relay
            # takes the same lock to know that a rotated log has no writer left.
            fcntl.flock(fd, fcntl.LOCK_EX)
            try:
                if os.fstat(fd).st_ino != os.stat(path).st_ino:
                    continue  # rotated between our open and our lock: append to the new log
            except FileNotFoundError:
                continue
            view = memoryview(records)
            while view:
                view = view[os.write(fd, view):]
            fcntl.flock(fd, fcntl.LOCK_UN)
            os.fsync(fd)
        finally:
            os.close(fd)
        return path
    raise OSError(f"{path} kept being rotated while appending to it")


def _create_log(path: str) -> int | None:
    """A new, empty log, locked, whose name is on disk before anyone can append to it (a hook
    that appended to a log whose directory entry a crash then lost would have lied); None if
    another hook created the log first."""
    fresh = f"{path}.{_writer()}.new"
    try:
        os.unlink(fresh)  # left by a writer of this name that died here
    except FileNotFoundError:
        pass
    fd = os.open(fresh, CREATE | os.O_APPEND, 0o660)
    try:
        os.fchmod(fd, 0o660)  # the group (hooks and relay) shares the log, whatever the umask
        fcntl.flock(fd, fcntl.LOCK_EX)  # others wait here until the name is durable
        try:
            os.link(fresh, path)  # unlike rename, never replaces a log another hook just made
        except FileExistsError:
            os.close(fd)
            return None
        finally:
            os.unlink(fresh)
        _fsync_dir(os.path.dirname(path))
        return fd
    except BaseException:
        try:
            os.close(fd)
        except OSError:
            pass
        raise


def frame(data: bytes) -> bytes:
    """One event as a record of the log."""
    return _frames((data,))


def _frames(events: Iterable[bytes]) -> bytes:
    """Events as records of the log, joined; each record's checksum covers its length and time
    too. Each event's bytes are copied once (a backfill frames millions)."""
    parts: list[bytes] = []
    for data in events:
        rest = b"%d %d " % (len(data), time.time_ns())
        parts += (MAGIC, b"%08x " % zlib.crc32(data, zlib.crc32(rest)), rest, data)
    return b"".join(parts)


def write_file(spool_dir: PathLike, event_id: str, data: bytes) -> str:
    """Spool one event as a file of its own in ``new/``; returns its path."""
    spool_dir = os.fspath(spool_dir)
    name = f"{time.time_ns():020d}-{_safe(event_id)}.json"
    new, tmp = os.path.join(spool_dir, NEW), os.path.join(spool_dir, TMP)
    try:
        return durable_write(new, name, data, tmp)
    except FileNotFoundError:
        ensure(spool_dir)
        return durable_write(new, name, data, tmp)


def _fsync_dir(directory: str) -> None:
    dir_fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def reject(spool_dir: PathLike, raw: bytes, reason: str, source: str) -> str:
    """Keep input that is not an event, exactly as received, beside a note of why."""
    spool_dir = os.fspath(spool_dir)
    ensure(spool_dir)
    stem = f"{time.time_ns():020d}-{_writer()}-{_safe(source)}"
    rejected, tmp = os.path.join(spool_dir, REJECT), os.path.join(spool_dir, TMP)
    durable_write(rejected, f"{stem}.reason", f"{source}: {reason}\n".encode(), tmp)
    return durable_write(rejected, f"{stem}.raw", raw, tmp)


def set_aside(spool_dir: PathLike, path: str, reason: str, source: str) -> str:
    """Move a spool entry the relay cannot ship into ``reject/``, whole, beside why."""
    spool_dir = os.fspath(spool_dir)
    stem = os.path.basename(path).removesuffix(".json")
    rejected = os.path.join(spool_dir, REJECT)
    durable_write(rejected, f"{stem}.reason", f"{source}: {reason}\n".encode(), os.path.join(spool_dir, TMP))
    final = os.path.join(rejected, f"{stem}.raw")
    os.rename(path, final)
    return final


def pending(spool_dir: PathLike, limit: int) -> list[str]:
    """Up to ``limit`` events spooled as files of their own, oldest first."""
    new = os.path.join(spool_dir, NEW)
    try:
        names = sorted(e.name for e in os.scandir(new) if e.name.endswith(".json"))
    except FileNotFoundError:
        return []
    return [os.path.join(new, n) for n in names[:limit]]


def rotate(spool_dir: PathLike, at_least: int = 1) -> None:
    """Turn the log into a segment for the relay, once no writer is left in it, if it holds
    ``at_least`` bytes."""
    log = os.path.join(spool_dir, LOG)
    path = os.path.join(log, CURRENT)
    try:
        if os.stat(path).st_size < at_least:
            return
    except FileNotFoundError:
        return
    segment = os.path.join(log, f"{time.time_ns():020d}{SEGMENT}")
    os.rename(path, segment)
    fd = os.open(segment, os.O_RDONLY | os.O_CLOEXEC)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)  # waits for a writer that locked the log before the rename
    finally:
        os.close(fd)
    _fsync_dir(log)


def segments(spool_dir: PathLike) -> list[str]:
    """The log's segments, oldest first."""
    log = os.path.join(spool_dir, LOG)
    try:
        return sorted(os.path.join(log, e.name) for e in os.scandir(log) if e.name.endswith(SEGMENT))
    except FileNotFoundError:
        return []


def read_records(data: bytes) -> tuple[list[tuple[int, bytes]], list[tuple[int, bytes]]]:
    """The whole records of a log as (ns spooled, event bytes), and the torn ones as (offset,
    bytes) for setting aside."""
    records: list[tuple[int, bytes]] = []
    torn: list[tuple[int, bytes]] = []
    at = data.find(MAGIC)
    if at > 0:
        torn.append((0, data[:at]))
    while at >= 0:
        start = at + len(MAGIC)
        try:
            crc, length, ns, _ = data[start:start + 64].split(b" ", 3)
            rest_at = start + len(crc) + 1
            body_at = rest_at + len(length) + len(ns) + 2
            end = body_at + int(length)
            whole = int(length) >= 0 and end <= len(data) and zlib.crc32(data[rest_at:end]) == int(crc, 16)
            spooled_at = int(ns)
        except ValueError:
            whole = False
        if whole:
            records.append((spooled_at, data[body_at:end]))
            at = data.find(MAGIC, end)
        else:
            following = data.find(MAGIC, at + 1)
            torn.append((at, data[at:following if following >= 0 else len(data)]))
            at = following
    return records, torn


def _waiting_in_log(spool_dir: PathLike) -> list[tuple[int, bytes]]:
    """(ns spooled, event bytes) of every record of the log the relay has not yet let go of."""
    waiting: list[tuple[int, bytes]] = []
    for path in [*segments(spool_dir), os.path.join(spool_dir, LOG, CURRENT)]:
        waiting += _waiting_in(path)
    return waiting


def _waiting_in(path: str) -> list[tuple[int, bytes]]:
    """(ns spooled, event bytes) of the records of one segment (or the log) not yet let go of."""
    try:
        with open(path, "rb") as f:
            records, _ = read_records(f.read())
    except FileNotFoundError:
        return []
    return records[shipped_count(path):]


def pending_events(spool_dir: PathLike) -> list[bytes]:
    """Every event waiting in the spool, oldest first: for tests and inspection."""
    events = _waiting_in_log(spool_dir)
    for path in pending(spool_dir, 10**9):
        with open(path, "rb") as f:
            events.append((int(os.path.basename(path).split("-", 1)[0]), f.read()))
    return [data for _, data in sorted(events, key=lambda e: e[0])]


def shipped_count(segment: str) -> int:
    """How many records of a segment the relay has shipped (its progress note; 0 if none)."""
    try:
        with open(segment + PROGRESS, "rb") as f:
            return int(f.read() or 0)
    except (FileNotFoundError, ValueError):
        return 0


def backlog(spool_dir: PathLike, read: Mapping[str, list[int]] | None = None) -> tuple[int, float]:
    """How many events wait, and the age in seconds of the oldest. ``read``: for segments the
    caller has read already (the relay, shipping them), the spooled times (ns) of their records
    not yet let go of. A segment never changes once rotated, and reading one again costs a third
    as much as shipping it (0.25-0.37 s of CPU for 100,000 events), which the relay's report of
    its backlog every few seconds would pay again and again while a large backlog drains."""
    spooled_at: list[int] = []
    for path in [*segments(spool_dir), os.path.join(spool_dir, LOG, CURRENT)]:
        if read is not None and path in read:
            spooled_at += read[path]
        else:
            spooled_at += [ns for ns, _ in _waiting_in(path)]
    try:
        spooled_at += [int(e.name.split("-", 1)[0]) for e in os.scandir(os.path.join(spool_dir, NEW))
                       if e.name.endswith(".json")]
    except FileNotFoundError:
        pass
    if not spooled_at:
        return 0, 0.0
    return len(spooled_at), max(0.0, (time.time_ns() - min(spooled_at)) / 1e9)
