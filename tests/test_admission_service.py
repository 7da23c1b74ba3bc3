"""The admission service on its unix socket, as the prolog talks to it."""

from __future__ import annotations

import socket
import threading
from pathlib import Path

from openacct.shortcuts import deposit
from services.admission.server import AdmissionServer
from shared.config import Settings
from shared.db import session_scope
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
