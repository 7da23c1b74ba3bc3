"""Schema migrations (alembic), run in-process: ``openacct db upgrade``."""

from __future__ import annotations

import importlib.util
from pathlib import Path
from types import ModuleType

from alembic import command
from alembic.config import Config
from sqlalchemy import Connection, Engine, text

from shared import roles

MIGRATIONS = Path(__file__).with_name("migrations")
# Any constant works; it keeps two processes from migrating one database at once.
MIGRATION_LOCK = 0x0A11_0CA7


def earlier_revision(filename: str) -> ModuleType:
    """An earlier revision's module, for the SQL it wrote: a later revision that changes or
    restores that text takes it from there instead of copying it (revisions are never edited)."""
    path = MIGRATIONS / "versions" / filename
    spec = importlib.util.spec_from_file_location(f"openacct_revision_{path.stem}", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def alembic_config(connection: Connection | None = None) -> Config:
    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS))
    if connection is not None:
        cfg.attributes["connection"] = connection
    return cfg


def upgrade(engine: Engine, revision: str = "head") -> str | None:
    """Upgrade to ``revision`` and return the revision the database is at afterwards."""
    with engine.begin() as conn:
        conn.execute(text("SELECT pg_advisory_xact_lock(:k)"), {"k": MIGRATION_LOCK})
        as_owner = roles.migrate_as_owner(conn)
        command.upgrade(alembic_config(conn), revision)
        if as_owner:  # a table a migration added gets its privileges without anyone remembering to
            roles.apply(conn, create=False)
        return current_revision(conn)


def current_revision(conn: Connection) -> str | None:
    from alembic.runtime.migration import MigrationContext

    return MigrationContext.configure(conn).get_current_revision()


def head_revision() -> str | None:
    """The revision ``openacct db upgrade`` would bring a database to."""
    from alembic.script import ScriptDirectory

    return ScriptDirectory.from_config(alembic_config()).get_current_head()
