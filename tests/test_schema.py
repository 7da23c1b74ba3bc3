"""The migrations build exactly the schema the models describe, from scratch or by upgrade."""

from __future__ import annotations

import uuid

import psycopg
import pytest
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from sqlalchemy import Engine, create_engine, inspect, make_url

from shared.db import sqlalchemy_url
from shared.embedded import ensure_database
from shared.migrate import alembic_config, upgrade
from shared.models import Base


def test_migrated_database_matches_the_models(engine: Engine) -> None:
    with engine.connect() as conn:
        diff = compare_metadata(MigrationContext.configure(conn, opts={"compare_type": True}), Base.metadata)
    assert diff == []


@pytest.fixture
def scratch_engine(database_url: str):  # type: ignore[no-untyped-def]
    url = make_url(database_url)
    name = f"openacct_scratch_{uuid.uuid4().hex[:8]}"
    admin = url.render_as_string(hide_password=False)
    ensure_database(admin, name)
    engine = create_engine(sqlalchemy_url(url.set(database=name).render_as_string(hide_password=False)))
    yield engine
    engine.dispose()
    with psycopg.connect(admin, autocommit=True) as conn:
        conn.execute(f'DROP DATABASE "{name}" WITH (FORCE)')


def _schema(engine: Engine) -> dict[str, object]:
    inspector = inspect(engine)
    return {
        table: (
            [(c["name"], str(c["type"]), c["nullable"]) for c in inspector.get_columns(table)],
            sorted(i["name"] for i in inspector.get_indexes(table)),
            sorted(str(c["name"]) for c in inspector.get_check_constraints(table)),
        )
        for table in sorted(inspector.get_table_names())
    }


def test_downgrade_then_upgrade_ends_identical(engine: Engine, scratch_engine: Engine) -> None:
    from alembic import command

    assert upgrade(scratch_engine) == "0002"
    fresh = _schema(scratch_engine)
    with scratch_engine.begin() as conn:
        command.downgrade(alembic_config(conn), "base")
    assert [t for t in inspect(scratch_engine).get_table_names() if t != "alembic_version"] == []
    upgrade(scratch_engine)
    assert _schema(scratch_engine) == fresh == _schema(engine)
    # Upgrading an up-to-date database is a no-op.
    assert upgrade(scratch_engine) == "0002"
