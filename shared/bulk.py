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
    columns = list(rows[0])
    values = {c: [row[c] for row in rows] for c in columns}
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


def any_of(column: Any, values: Iterable[Any]) -> Any:
    """``column = ANY(:array)``: one parameter however many values, unlike ``IN (...)``."""
    return column == any_(bindparam(None, list(values), type_=ARRAY(column.type)))
