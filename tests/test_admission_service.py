"""The admission service on its unix socket, as the prolog talks to it."""

from __future__ import annotations

import socket
import threading
import time
from decimal import Decimal
from pathlib import Path

from sqlalchemy import select, update

from openacct.shortcuts import deposit
from services.admission.server import AdmissionServer, answer
from shared.config import Settings
from shared.db import session_scope
from shared.models import LedgerTransaction, ServiceRate
from tests.test_admission import request


def test_the_service_answers_on_a_socket_only_its_user_may_use(center, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    with session_scope():
        deposit("phys", "1", start="2000-01-01")
    path = tmp_path / "admission.sock"
    server = AdmissionServer(path, Settings())
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        assert path.stat().st_mode & 0o777 == 0o600
        with socket.socket(socket.AF_UNIX) as conn:
            conn.connect(str(path))
            conn.sendall(request(60).model_dump_json().encode() + b"\n")
            reply = conn.makefile("rb").readline()
        assert reply == b"admit\theld 0.30 of 'phys' for at most 60 min\n"
    finally:
        server.shutdown()
        server.server_close()


def test_a_decision_the_prolog_no_longer_waits_for_is_not_committed(center) -> None:  # type: ignore[no-untyped-def]
    with session_scope():
        deposit("phys", "1", start="2000-01-01")
    # 100 ms before the prolog gives up: too close to commit and reply in time
    late = request(60).model_copy(update={"answer_by_ms": int(time.time() * 1000) + 100})
    assert answer(late.model_dump_json().encode(), Settings()) == {"error": "decided too late"}
    with session_scope() as s:
        assert s.scalars(select(LedgerTransaction)).all() != [] and s.scalars(
            select(LedgerTransaction).where(LedgerTransaction.kind == "hold")).all() == []
    in_time = request(61).model_copy(update={"answer_by_ms": int(time.time() * 1000) + 5000})
    assert answer(in_time.model_dump_json().encode(), Settings())["admit"] is True


def test_any_failure_to_decide_is_an_error_reply_not_a_dropped_connection(center) -> None:  # type: ignore[no-untyped-def]
    with session_scope():
        deposit("phys", "1", start="2000-01-01")
    line = request(62).model_dump_json().encode()
    assert answer(line, Settings())["admit"] is True
    with session_scope() as s:  # the same run asked again, at another price: the ledger refuses it
        s.execute(update(ServiceRate).values(rate=Decimal("0.07")))
    reply = answer(line, Settings())
    assert set(reply) == {"error"} and "idempotency key" in str(reply["error"])
