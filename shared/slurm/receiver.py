"""The receiver of Slurm's jobcomp/elasticsearch plugin: job records over HTTP into the spool.

slurmctld's plugin (Slurm 22.05, jobcomp_elasticsearch.c) queues each finished job's record in
memory and one thread of its own POSTs them, one JSON document per request, to ``JobCompLoc``
as written. A 200 or 201 status is success and drops the record; anything else, or no answer,
keeps it to be sent again 30 s later, and a graceful shutdown saves what is undelivered in
``StateSaveLocation/elasticsearch_state``. So this answers 201 only once the record's event is
fsynced into the spool (or, if it cannot ever be an event, kept in ``reject/`` with its reason),
and an error status whenever it could not keep it: Slurm then still holds the record.

``JobCompLoc=http://HOST:PORT/<system>``: the path names the system. The job script in each
record is dropped unread. Standard library only, like the hooks: this runs beside slurmctld.
"""

from __future__ import annotations

import base64
import hmac
import json
import logging
import os
import socket
import threading
import time
from collections.abc import Iterable
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from shared import networks, spool
from shared.job_event import BadInput, encode
from shared.slurm import values
from shared.slurm.records import WrongSystem, elasticsearch_event

SOURCE = "slurm-elasticsearch"
# Slurm keeps scripts up to max_script_size (4 MB by default; JSON escaping can double it).
MAX_BODY = 64 * 1024 * 1024
MAX_CONNECTIONS = 32
# A client that sends nothing for this long is cut off (slurmctld's curl sets no timeout, and
# its one sending thread must not wait on a handler stuck with someone else).
IDLE_SECONDS = 30
LOOPBACK = ("127.0.0.0/8", "::1/128")

log = logging.getLogger("openacct.receiver")


class Receiver(ThreadingHTTPServer):
    # A record is answered 201 only once it is fsynced, so a request cut off by a shutdown is one
    # Slurm sends again: nothing waits for stuck clients on the way out.
    daemon_threads = True
    block_on_close = False
    request_queue_size = 128

    def __init__(self, address: tuple[str, int], spool_dir: str, *, allowed: Iterable[str] = LOOPBACK,
                 credentials: str | None = None) -> None:
        self.spool_dir = spool_dir
        self.allowed = networks.parse(allowed)
        # What libcurl sends for http://user:password@host/...: compared whole, in constant time.
        self.authorization = (None if credentials is None
                              else b"Basic " + base64.b64encode(credentials.encode()))
        if ":" in address[0]:
            self.address_family = socket.AF_INET6
        spool.ensure(spool_dir)
        spool.check_safe(spool_dir)
        # slurmctld sends one record at a time; more connections than this are not Slurm.
        self.connections = threading.BoundedSemaphore(MAX_CONNECTIONS)
        super().__init__(address, Handler)

    def verify_request(self, request: object, client_address: tuple[str, int]) -> bool:
        """Refused before a thread is spent on them: clients not allowed, and connections past
        the cap (closed: a client that is Slurm sends again)."""
        if not self.client_allowed(client_address[0]):
            log.warning("refused a connection from %s: not an allowed client", client_address[0])
            return False
        if not self.connections.acquire(blocking=False):
            log.warning("refused a connection from %s: %d connections open", client_address[0], MAX_CONNECTIONS)
            return False
        return True

    def process_request_thread(self, request: object, client_address: tuple[str, int]) -> None:
        try:
            super().process_request_thread(request, client_address)
        finally:
            self.connections.release()

    def handle_error(self, request: object, client_address: tuple[str, int]) -> None:
        log.exception("request from %s failed", client_address[0])

    def client_allowed(self, host: str) -> bool:
        return networks.contains(self.allowed, host)


class Handler(BaseHTTPRequestHandler):
    server: Receiver
    protocol_version = "HTTP/1.1"  # keep-alive, and curl's "Expect: 100-continue" for big bodies
    timeout = IDLE_SECONDS
    server_version = "openacct-receiver"
    sys_version = ""

    def version_string(self) -> str:
        return self.server_version

    def do_POST(self) -> None:  # noqa: N802 (http.server's name)
        refusal = self._refusal()
        if refusal is not None:
            self._answer(*refusal)
            return
        if self.headers.get("Transfer-Encoding"):
            # curl sends the plugin's record with its length (CURLOPT_POSTFIELDSIZE), never chunked.
            self.close_connection = True
            self._answer(HTTPStatus.NOT_IMPLEMENTED, "Transfer-Encoding is not taken: send Content-Length")
            return
        system = self.path.strip("/")
        if "/" in self.path[1:] or not _system_name(system):
            self._discard_body()
            self._answer(HTTPStatus.NOT_FOUND, "POST to /<system>: JobCompLoc=http://HOST:PORT/<system>")
            return
        try:
            length = int(self.headers.get("Content-Length", ""))
        except ValueError:
            self.close_connection = True  # the body, if any, is not read
            self._answer(HTTPStatus.LENGTH_REQUIRED, "Content-Length is required")
            return
        if not 0 <= length <= MAX_BODY:
            self.close_connection = True  # the body is not read: the connection cannot be reused
            self._answer(HTTPStatus.REQUEST_ENTITY_TOO_LARGE, f"a record is at most {MAX_BODY} bytes")
            return
        body = self.rfile.read(length)
        status, message = self._take(system, body)
        self._answer(status, message)

    def do_GET(self) -> None:  # noqa: N802
        """What an Elasticsearch client asks first; also a health check."""
        refusal = self._refusal()
        if refusal is not None:
            self._answer(*refusal)
        else:
            self._answer(HTTPStatus.OK, "openacct receiver for Slurm's jobcomp/elasticsearch")

    def do_PUT(self) -> None:  # noqa: N802
        self._discard_body()
        self._answer(HTTPStatus.METHOD_NOT_ALLOWED, "only POST of one job record is taken")

    do_DELETE = do_PUT  # noqa: N815
    do_PATCH = do_PUT  # noqa: N815

    def _refusal(self) -> tuple[HTTPStatus, str] | None:
        if not self.server.client_allowed(self.client_address[0]):
            self.close_connection = True
            log.warning("refused a request from %s: not an allowed client", self.client_address[0])
            return HTTPStatus.FORBIDDEN, "not an allowed client"
        expected = self.server.authorization
        if expected is not None:
            given = (self.headers.get("Authorization") or "").encode("latin-1", "replace")
            if not hmac.compare_digest(given, expected):
                self.close_connection = True
                log.warning("refused a request from %s: wrong or missing credentials", self.client_address[0])
                return HTTPStatus.UNAUTHORIZED, "credentials required"
        return None

    def _take(self, system: str, body: bytes) -> tuple[HTTPStatus, str]:
        """Spool the record's event; the answer for Slurm (201 once it is safe here)."""
        try:
            # Slurm writes the bytes of names, paths and the script as it has them (json-c copies
            # bytes above 0x7f): a Latin-1 byte must not cost the record. Names keep U+FFFD for
            # such bytes; the fields a charge depends on refuse them (shared.slurm.values).
            record = json.loads(body.decode("utf-8", "surrogateescape"))
        except (ValueError, RecursionError) as exc:
            # Not JSON: not what the plugin sends. Refused, so that a record is never lost to a
            # parser of ours; slurmctld logs each retry.
            log.error("a body of %d bytes that is not JSON refused: %s", len(body), type(exc).__name__)
            return HTTPStatus.BAD_REQUEST, f"not JSON: {type(exc).__name__}"
        if not isinstance(record, dict):
            log.error("a JSON body that is not an object refused (%d bytes)", len(body))
            return HTTPStatus.BAD_REQUEST, "a record is one JSON object"
        record.pop("script", None)  # the user's batch script: never kept
        try:
            event = elasticsearch_event(record, system, int(time.time()))
            data = encode(event)
        except WrongSystem as exc:
            # A URL set wrong in slurm.conf: refused, so that Slurm keeps the records until it is fixed.
            log.error("job record refused: %s", exc)
            return HTTPStatus.MISDIRECTED_REQUEST, str(exc)
        except (BadInput, ValueError) as exc:  # UnicodeEncodeError: text that was not UTF-8 where it counts
            return self._reject(encode_record(record), exc)
        try:
            spool.write(self.server.spool_dir, str(event["event_id"]), data)
        except Exception as exc:  # a full disk, a spool made unsafe: Slurm keeps the record
            log.error("job %s not spooled: %s: %s", event["job_id"], type(exc).__name__, exc)
            return HTTPStatus.SERVICE_UNAVAILABLE, "not spooled; send it again"
        log.debug("job %s spooled as %s", event["job_id"], event["event_id"])
        return HTTPStatus.CREATED, str(event["event_id"])

    def _reject(self, raw: bytes, exc: Exception) -> tuple[HTTPStatus, str]:
        """A record that can never be an event: kept in ``reject/`` (without the script) for a
        person, and taken, so that Slurm does not send it every 30 s forever."""
        reason = str(exc) if isinstance(exc, BadInput) else f"{type(exc).__name__}: {exc}"
        reason = " ".join(reason.split())
        try:
            kept = spool.reject(self.server.spool_dir, raw, reason, SOURCE)
        except Exception as error:
            log.error("job record unreadable (%s) and not kept: %s: %s", reason, type(error).__name__, error)
            return HTTPStatus.SERVICE_UNAVAILABLE, "not kept; send it again"
        log.error("job record rejected: %s; kept in %s", reason, kept)
        return HTTPStatus.CREATED, f"rejected: {reason}"

    def _discard_body(self) -> None:
        if self.headers.get("Transfer-Encoding"):
            self.close_connection = True  # not read: the connection cannot be reused
            return
        try:
            length = int(self.headers.get("Content-Length", "0"))
        except ValueError:
            length = -1
        if 0 <= length <= MAX_BODY:
            self.rfile.read(length)
        else:
            self.close_connection = True

    def _answer(self, status: HTTPStatus, message: str) -> None:
        body = json.dumps({"status": status.value, "result": message}).encode() + b"\n"
        self.send_response_only(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        if self.close_connection:
            self.send_header("Connection", "close")
        # Headers and body in one write: two would wait on the client's delayed ACK.
        self._headers_buffer.append(b"\r\n" + body)
        self.flush_headers()

    def log_request(self, code: int | str = "-", size: int | str = "-") -> None:
        pass  # one line per job is noise at Slurm's rate; refusals and errors are logged

    def log_message(self, format: str, *args: object) -> None:  # noqa: A002
        log.info("%s: %s", self.client_address[0], format % args)


def encode_record(record: dict[str, object]) -> bytes:
    return json.dumps(record, ensure_ascii=False).encode("utf-8", "surrogateescape") + b"\n"


def _system_name(name: str) -> bool:
    try:
        values.system({"SYSTEM": name}, "SYSTEM", None)
    except BadInput:
        return False
    return True


def serve(address: tuple[str, int], spool_dir: str, *, allowed: Iterable[str] = LOOPBACK,
          credentials: str | None = None, ready: object = None) -> None:
    """Serve until SIGTERM or SIGINT; ``ready`` (a callable) is told the bound address."""
    server = Receiver(address, os.fspath(spool_dir), allowed=allowed, credentials=credentials)
    if callable(ready):
        ready(server.server_address)
    try:
        server.serve_forever(poll_interval=0.5)
    finally:
        server.server_close()
