"""Engine and sessions. One session per unit of work, committed at its end."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from functools import lru_cache

from sqlalchemy import Connection, Engine, create_engine, make_url
from sqlalchemy.orm import Session, sessionmaker

from shared.config import get_settings

_session_factory: sessionmaker[Session] | None = None
_current: ContextVar[Session | None] = ContextVar("openacct_session", default=None)


def sqlalchemy_url(url: str) -> str:
    """psycopg 3 is the driver, whatever scheme the operator wrote."""
    for prefix in ("postgresql+psycopg://", "postgresql://", "postgres://"):
        if url.startswith(prefix):
            return "postgresql+psycopg://" + url[len(prefix) :]
    return url


@lru_cache(maxsize=1)
def database_url() -> str:
    settings = get_settings()
    if settings.database_url:
        return settings.database_url
    from shared import local_instance

    return local_instance.database_url(settings.data_dir)


def where(url: str) -> str:
    """The database a URL names, as messages show it: host (or socket folder), port and name,
    never the user or the password."""
    parts = make_url(url)
    host = parts.host or parts.query.get("host") or "localhost"
    return f"{host}{f':{parts.port}' if parts.port else ''}/{parts.database or ''}"


def schema_missing() -> str:
    """What to say when the schema's tables or columns are not there: a database never
    migrated, or last migrated by an older OpenAcct."""
    return f"the database at {where(database_url())} has no OpenAcct schema (or an old one): run `openacct db upgrade`"


@lru_cache(maxsize=1)
def engine() -> Engine:
    return create_engine(sqlalchemy_url(database_url()), pool_pre_ping=True)


def bind(target: Engine | Connection) -> None:
    """Point every new session at ``target``. Tests bind a connection inside a transaction
    they roll back; sessions then commit to savepoints of it."""
    global _session_factory
    _session_factory = sessionmaker(
        bind=target, expire_on_commit=False, join_transaction_mode="create_savepoint"
    )


def new_session() -> Session:
    if _session_factory is None:
        bind(engine())
    assert _session_factory is not None
    return _session_factory()


@contextmanager
def session_scope() -> Iterator[Session]:
    """A session that commits when the block ends and rolls back if it raises.

    While the block runs, the session is also the *current* one that the shortcuts use.
    """
    with committed(new_session()) as session, as_current(session):
        yield session


@contextmanager
def committed(session: Session) -> Iterator[Session]:
    """Commit ``session`` when the block ends, roll it back if it raises, and close it."""
    try:
        yield session
        session.commit()
    except BaseException:
        session.rollback()
        raise
    finally:
        session.close()


@contextmanager
def as_current(session: Session) -> Iterator[Session]:
    """Make ``session`` the current one while the block runs, so that the shortcuts join it.
    The API's requests open their session in one thread and use it in another: each use says so."""
    token = _current.set(session)
    try:
        yield session
    finally:
        _current.reset(token)


def current_session() -> Session | None:
    return _current.get()
