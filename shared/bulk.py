"""Many rows in one statement: ``INSERT … SELECT FROM unnest(arrays)``.

The batch paths (the charger, the ledger's ``charge_many``) write thousands of rows per task.
One array per column keeps the statement text small and constant, and binary parameters spare
psycopg from escaping every value in Python: a batch insert costs the server's time, not ours.
It runs on the session's own connection, so it is part of the session's transaction.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from sqlalchemy import ARRAY, Table, any_, bindparam
from sqlalchemy.dialects import postgresql
from sqlalchemy.orm import Session

_dialect = postgresql.dialect()


def _type(table: Table, column: str) -> str:
    return table.c[column].type.compile(dialect=_dialect)


def insert_rows(
    session: Session,
    table: Table,
    rows: Sequence[Mapping[str, Any]],
    *,
    on_conflict: str = "",
    returning: Sequence[str] = (),
) -> list[tuple[Any, ...]]:
    """Insert ``rows`` (dicts with the same keys) into ``table``; return the ``returning``
    columns of each row written.

    ``on_conflict`` is the SQL after ``ON CONFLICT``, written by the caller (never from input).
    """
    if not rows:
        return []
    return insert_columns(session, table, {c: [row[c] for row in rows] for c in rows[0]},
                          on_conflict=on_conflict, returning=returning)


def insert_columns(
    session: Session,
    table: Table,
    values: Mapping[str, list[Any]],
    *,
    on_conflict: str = "",
    returning: Sequence[str] = (),
) -> list[tuple[Any, ...]]:
    """``insert_rows`` from the rows' columns (lists of one length, row i at index i), for the
    callers that have them as columns: no dict per row."""
    columns = list(values)
    if not columns or not values[columns[0]]:
        return []
    # A column with the same value in every row (the kind, the actor, a NULL) is sent once, not
    # once per row: dumping arrays is the client's main cost here.
    constant = {c for c, v in values.items() if v.count(v[0]) == len(v)}
    arrays = [c for c in columns if c not in constant] or columns[:1]
    select = ", ".join(f"%({c})b::{_type(table, c)}" if c not in arrays else c for c in columns)
    unnest = ", ".join(f"%({c})b::{_type(table, c)}[]" for c in arrays)
    sql = (f"INSERT INTO {table.name} ({', '.join(columns)}) "
           f"SELECT {select} FROM unnest({unnest}) AS batch({', '.join(arrays)})")
    if on_conflict:
        sql += f" ON CONFLICT {on_conflict}"
    if returning:
        sql += f" RETURNING {', '.join(returning)}"
    params = {c: values[c] if c in arrays else values[c][0] for c in columns}
    connection = session.connection().connection.driver_connection
    with connection.cursor() as cursor:  # type: ignore[union-attr]
        cursor.execute(sql, params)
        return cursor.fetchall() if returning else []


def select_where_any(session: Session, table: Table, columns: Sequence[str], column: str,
                     values: Iterable[Any], also: Mapping[str, Any] | None = None) -> list[tuple[Any, ...]]:
    """``SELECT columns FROM table WHERE column = ANY(values)`` (and, for each of ``also``,
    ``name = value``, or ``= ANY`` of a list or set), the values sent as binary arrays: the
    batch paths look up thousands of keys, which ``any_of`` (a text array, quoted value by value
    in Python) would cost a microsecond or two each to send. Pending ORM changes are flushed
    first, as a query through the session would."""
    if session.autoflush:
        session.flush()
    conditions = {column: list(values)}
    for name, value in (also or {}).items():
        conditions[name] = list(value) if isinstance(value, list | set | frozenset | tuple) else value
    where = " AND ".join(
        f"{name} = ANY(%({name})b::{_type(table, name)}[])" if isinstance(value, list)
        else f"{name} = %({name})b::{_type(table, name)}" for name, value in conditions.items())
    sql = f"SELECT {', '.join(columns)} FROM {table.name} WHERE {where}"
    connection = session.connection().connection.driver_connection
    with connection.cursor() as cursor:  # type: ignore[union-attr]
        cursor.execute(sql, conditions)
        return cursor.fetchall()


def any_of(column: Any, values: Iterable[Any]) -> Any:
    """``column = ANY(:array)``: one parameter however many values, unlike ``IN (...)``."""
    return column == any_(bindparam(None, list(values), type_=ARRAY(column.type)))
