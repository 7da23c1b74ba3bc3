"""``openacct admission serve``: the decision service that PrologSlurmctld asks, on a unix socket.

The prolog must answer within a tight budget and may import only the standard library, while a
decision needs the ledger (SQLAlchemy, a pooled database connection, the charger's pricing).
So the prolog sends one JSON line and reads one back; this long-lived process holds the
connections. Only root and the server's own user may ask: a cluster user who could connect
could hold other accounts' money, so the peer's uid is checked on every connection.

The request is a job as JSON (``services.admission.decide.AdmissionRequest``); the reply is one
line, ``admit<TAB>why``, ``reject<TAB>why``, or ``error<TAB>why`` when there is no decision (a bad
request, the database down): the prolog then fails open or closed as configured. Plain text, so
the prolog needs no JSON parser (and the regular expressions it imports) to read it.
"""

from __future__ import annotations

import logging
import os
import socket
import socketserver
import struct
import time
from pathlib import Path

from pydantic import ValidationError
from sqlalchemy.exc import SQLAlchemyError

from services.admission.decide import AdmissionRequest, decide
from shared import logs, metrics
from shared.config import Settings
from shared.db import session_scope
from shared.errors import OpenAcctError

log = logging.getLogger("openacct.admission")
MAX_REQUEST = 64 * 1024
READ_TIMEOUT = 10.0  # a client that connects and says nothing does not keep a thread for long
# Committing and replying take a little: a decision this close to the prolog's deadline is late.
REPLY_MARGIN_MS = 200


class _TooLate(Exception):
    pass


def answer(line: bytes, settings: Settings) -> dict[str, object]:
    try:
        request = AdmissionRequest.model_validate_json(line)
    except ValidationError as exc:
        problems = "; ".join(f"{'.'.join(map(str, e['loc'])) or 'request'}: {e['msg']}" for e in exc.errors())
        return {"error": f"invalid request: {problems}"}
    with logs.context(job_id=request.job_id):
        return _decided(request, settings)


def _decided(request: AdmissionRequest, settings: Settings) -> dict[str, object]:
    try:
        with session_scope() as session:
            decision = decide(session, request, settings)
            if request.answer_by_ms is not None and time.time() * 1000 > request.answer_by_ms - REPLY_MARGIN_MS:
                raise _TooLate  # rolls the hold back: the prolog has gone by what admission_on_error says
    except _TooLate:
        log.warning("job %s: decided after the prolog stopped waiting; nothing held", request.job_id)
        return {"error": "decided too late"}
    except SQLAlchemyError as exc:
        log.error("job %s: no decision, database error: %s", request.job_id, type(exc).__name__)
        return {"error": f"database error: {type(exc).__name__}"}
    except OpenAcctError as exc:  # a service without a rate yet, a run asked again at another price, ...
        log.error("job %s: no decision: %s", request.job_id, exc)
        return {"error": str(exc)}
    except Exception:
        log.exception("job %s: no decision", request.job_id)
        return {"error": "internal error in the admission service (its log says more)"}
    log.info("job %s of %s: %s (%s)", request.job_id, request.account, "admit" if decision.admit else "reject",
             decision.reason)
    return decision.as_dict()


def _peer_uid(connection: socket.socket) -> int:
    creds = connection.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    return struct.unpack("3i", creds)[1]


class _Handler(socketserver.StreamRequestHandler):
    server: AdmissionServer

    def handle(self) -> None:
        uid = _peer_uid(self.connection)
        if uid not in self.server.allowed_uids:
            log.warning("refused a request from uid %d: only root and uid %d may ask", uid, os.getuid())
            self._reply({"error": f"uid {uid} may not ask for admission decisions"})
            return
        self.connection.settimeout(READ_TIMEOUT)
        try:
            line = self.rfile.readline(MAX_REQUEST + 1)
        except TimeoutError:
            return
        if len(line) > MAX_REQUEST:
            self._reply({"error": f"request longer than {MAX_REQUEST} bytes"})
            return
        with metrics.admission().seconds.time():
            self._reply(answer(line, self.server.settings))

    def _reply(self, body: dict[str, object]) -> None:
        verb = "error" if "error" in body else "admit" if body["admit"] else "reject"
        metrics.admission().decisions.labels(verb).inc()
        why = " ".join(str(body.get("error") or body.get("reason") or "").split())  # one line, no tabs
        try:
            self.wfile.write(f"{verb}\t{why}\n".encode())
        except OSError:  # the prolog gave up waiting: it has already decided by itself
            pass


class AdmissionServer(socketserver.ThreadingUnixStreamServer):
    daemon_threads = True

    def __init__(self, path: Path, settings: Settings) -> None:
        self.settings = settings
        self.allowed_uids = {0, os.getuid()}
        path.unlink(missing_ok=True)  # a socket left by a server that died
        old = os.umask(0o177)  # the socket is the server user's alone (and root's)
        try:
            super().__init__(str(path), _Handler)
        finally:
            os.umask(old)


def serve(settings: Settings) -> None:
    if settings.admission_socket is None:
        raise SystemExit("admission_socket is not set: where should the service listen?")
    with AdmissionServer(settings.admission_socket, settings) as server:
        log.info("admission service listening on %s", settings.admission_socket)
        server.serve_forever()
