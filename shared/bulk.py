"""Many rows in one statement: ``INSERT … SELECT FROM unnest(arrays)``.

The batch paths (the charger, the ledger's ``charge_many``) write thousands of rows per task.
One array per column keeps the statement text small and constant. Each array goes the cheapest
way for the client, whose CPU the database shares: numbers, text and JSON as one array literal
written by the C code of ``json.dumps`` and ``str.join``, other types (times) in psycopg's binary
format, which dumps them value by value in Python. It runs on the session's own connection, so it
is part of the session's transaction.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Mapping, Sequence
from decimal import Decimal
from typing import Any

from sqlalchemy import ARRAY, JSON, Integer, Numeric, String, Table, Text, any_, bindparam, cast
from sqlalchemy.dialects import postgresql
from sqlalchemy.orm import Session

_dialect = postgresql.dialect()
# What JSON writes for a control character; PostgreSQL's array syntax has no such escapes.
_JSON_CONTROL_ESCAPE = re.compile(r"\\[bfnrtu]")
# The Python types each way of writing a literal takes exactly (bool is not an int here).
_INTEGERS = {int, type(None)}
_TEXTS = {str, type(None)}
_NUMBERS = {Decimal, int}


def _type(table: Table, column: str) -> str:
    """The column's type for a cast, without its collation: ``varchar COLLATE "C"[]`` is no
    type, and a value compared with the column takes the column's collation anyway."""
    sql_type = table.c[column].type
    if getattr(sql_type, "collation", None):
        sql_type = sql_type.copy()
        sql_type.collation = None
    return sql_type.compile(dialect=_dialect)


def _array(table: Table, column: str, values: list[Any]) -> tuple[str, Any]:
    """The placeholder and parameter that send ``values`` as an array of ``column``'s type.

    An array literal (``{1,null,3}``, ``{"a","b\\"c"}``) costs the client a tenth of a
    microsecond a value, psycopg's binary array 0.3-1.5 (a ``Decimal`` the most). Inside double
    quotes, the literal escapes only ``"`` and ``\\``, with a backslash, as JSON does, so JSON's
    text of a list of strings is the literal once its brackets are braces; JSON's other escapes
    (control characters) mean something else there, so a list holding one goes binary. JSON
    documents given as dicts go as one JSON array of them.
    """
    sql_type, type_name = table.c[column].type, _type(table, column)
    literal = _literal(sql_type, values)
    if literal is not None:
        return f"%({column})s::{type_name}[]", literal
    if isinstance(sql_type, JSON) and set(map(type, values)) == {dict}:
        # documents: one JSON text of them all, not one each then quoted again in a literal
        return (f"ARRAY(SELECT d FROM jsonb_array_elements(%({column})s::jsonb) WITH ORDINALITY AS e(d, i) "
                f"ORDER BY i)::{type_name}[]", json.dumps(values, separators=(",", ":")))
    return f"%({column})b::{type_name}[]", values


def _literal(sql_type: Any, values: list[Any]) -> str | None:
    """``values`` as an array literal of ``sql_type``, where they have one (see ``_array``)."""
    kinds = set(map(type, values))
    if isinstance(sql_type, Integer) and kinds <= _INTEGERS or isinstance(sql_type, String | JSON) and kinds <= _TEXTS:
        text = json.dumps(values, ensure_ascii=False, separators=(",", ":"))
        return None if _JSON_CONTROL_ESCAPE.search(text) else "{" + text[1:-1] + "}"
    if isinstance(sql_type, Numeric) and kinds <= _NUMBERS:
        return "{" + ",".join(map(str, values)) + "}"
    return None


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
    # once per row: sending arrays is the client's main cost here.
    # (Not documents: to ==, {"n": 1}, {"n": True} and {"n": 1.0} are one value, to JSON three.)
    constant = {c for c, v in values.items() if not isinstance(v[0], dict | list) and v.count(v[0]) == len(v)}
    arrays = [c for c in columns if c not in constant] or columns[:1]
    params = {c: values[c][0] for c in columns if c not in arrays}
    unnest = []
    for c in arrays:
        placeholder, params[c] = _array(table, c, values[c])
        unnest.append(placeholder)
    select = ", ".join(f"%({c})b::{_type(table, c)}" if c not in arrays else c for c in columns)
    sql = (f"INSERT INTO {table.name} ({', '.join(columns)}) "
           f"SELECT {select} FROM unnest({', '.join(unnest)}) AS batch({', '.join(arrays)})")
    if on_conflict:
        sql += f" ON CONFLICT {on_conflict}"
    if returning:
        sql += f" RETURNING {', '.join(returning)}"
    connection = session.connection().connection.driver_connection
    with connection.cursor() as cursor:  # type: ignore[union-attr]
        cursor.execute(sql, params)
        return cursor.fetchall() if returning else []


def select_where_any(session: Session, table: Table, columns: Sequence[str], column: str,
                     values: Iterable[Any], also: Mapping[str, Any] | None = None,
                     condition: str = "") -> list[tuple[Any, ...]]:
    """``SELECT columns FROM table WHERE column = ANY(values)`` (and, for each of ``also``,
    ``name = value``, or ``= ANY`` of a list or set), the arrays sent as ``insert_columns`` sends
    them: the batch paths look up thousands of keys, without a statement of SQLAlchemy's to build
    and compile each time. Pending ORM changes are flushed first, as a query through the session
    would.

    ``condition``: SQL written by the caller (never from input), as is, where a partial index's
    predicate must be seen in the query's own text (a parameter would hide it from the planner)."""
    if session.autoflush:
        session.flush()
    conditions = {column: list(values)}
    for name, value in (also or {}).items():
        conditions[name] = list(value) if isinstance(value, list | set | frozenset | tuple) else value
    where, params = [], {}
    for name, value in conditions.items():
        if isinstance(value, list):
            placeholder, params[name] = _array(table, name, value)
            where.append(f"{name} = ANY({placeholder})")
        else:
            params[name] = value
            where.append(f"{name} = %({name})b::{_type(table, name)}")
    if condition:
        where.append(condition)
    sql = f"SELECT {', '.join(columns)} FROM {table.name} WHERE {' AND '.join(where)}"
    connection = session.connection().connection.driver_connection
    with connection.cursor() as cursor:  # type: ignore[union-attr]
        cursor.execute(sql, params)
        return cursor.fetchall()


def any_of(column: Any, values: Iterable[Any]) -> Any:
    """``column = ANY(:array)``: one parameter however many values, unlike ``IN (...)``; sent
    as an array literal where the values have one, as ``insert_columns`` sends arrays."""
    values = list(values)
    literal = _literal(column.type, values)
    if literal is not None:
        return column == any_(cast(bindparam(None, literal, type_=Text), ARRAY(column.type)))
    return column == any_(bindparam(None, values, type_=ARRAY(column.type)))
