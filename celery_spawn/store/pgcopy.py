"""Bulk rows into PostgreSQL with ``COPY ... FROM STDIN`` inside the caller's transaction.

A spawn writes thousands of job rows in one transaction; ``COPY`` moves them
several times faster than multi-row ``INSERT``s (no SQL text per row, no
parameter binding). Any string - tabs, newlines, backslashes, ``\\N`` -
arrives as itself; ``None`` is ``NULL``. Two drivers do it:

- psycopg2 (``copy_expert``): the rows travel as COPY text format, escaped
  here; not while a wait callback makes psycopg2 cooperative (eventlet,
  psycogreen), as it refuses ``COPY`` then;
- psycopg (3) (``cursor.copy()``): its ``write_row`` encodes each row
  itself, in COPY's binary format with the columns' types set once (its C
  dumpers then skip the per-value type lookup: a third of the CPU time of
  text rows, less than psycopg2's path); text format if a type has no
  binary dumper.

Other drivers keep ``INSERT``.
"""
from __future__ import annotations

import io
from datetime import date, datetime
from operator import itemgetter
from typing import Any, Sequence

import sqlalchemy as sa
from sqlalchemy.engine import Connection

#: psycopg2 reads the COPY data in chunks of this many characters.
READ_SIZE = 1 << 20


def supports_copy(conn: Connection) -> bool:
    """Whether ``conn`` is a psycopg (3) or psycopg2 connection to PostgreSQL that can ``COPY``.

    psycopg2 not while psycopg2 has a wait callback: eventlet's patching and
    psycogreen (for gevent) install one to make connections cooperative, and
    psycopg2 refuses ``COPY`` on such connections.
    """
    if conn.dialect.name != "postgresql":
        return False
    if conn.dialect.driver == "psycopg":
        return True
    if conn.dialect.driver != "psycopg2":
        return False
    from psycopg2.extensions import get_wait_callback

    return get_wait_callback() is None


def copy_text(value: Any) -> str:
    """One value in COPY text format: escaped string, ``\\N`` for NULL, ISO timestamps, ``t``/``f``."""
    if value is None:
        return "\\N"
    if isinstance(value, str):
        if "\\" in value:
            value = value.replace("\\", "\\\\")
        if "\t" in value or "\n" in value or "\r" in value:
            value = value.replace("\t", "\\t").replace("\n", "\\n").replace("\r", "\\r")
        return value
    if isinstance(value, bool):
        return "t" if value else "f"
    if isinstance(value, (int, float)):
        return repr(value) if isinstance(value, float) else str(value)
    if isinstance(value, datetime):
        return value.isoformat(sep=" ")
    if isinstance(value, date):
        return value.isoformat()
    raise TypeError(f"cannot COPY a {type(value).__name__} value")


def copy_rows(conn: Connection, table: sa.Table, rows: Sequence[dict]) -> None:
    """Write ``rows`` (dicts with the same keys) into ``table`` with one COPY, in ``conn``'s transaction.

    Columns missing from the rows get their scalar Python-side default, as an
    ``INSERT`` through SQLAlchemy would. Driver errors come out as SQLAlchemy
    errors (the connection is invalidated when it was lost).
    """
    if not rows:
        return
    columns = list(rows[0])
    defaults = _scalar_defaults(table, columns)
    names = columns + list(defaults)
    quote = conn.dialect.identifier_preparer.quote
    statement = (f"COPY {quote(table.name)} ({', '.join(quote(n) for n in names)}) "
                 "FROM STDIN WITH (FORMAT text)")
    raw = conn.connection.dbapi_connection
    dbapi = conn.dialect.loaded_dbapi
    try:
        if conn.dialect.driver == "psycopg":
            types = _binary_types(table, tuple(names), conn.dialect)
            if types is not None:
                statement = statement.replace("(FORMAT text)", "(FORMAT binary)")
            _copy_psycopg(raw, statement, types, rows, columns, tuple(defaults.values()))
        else:
            buffer = io.StringIO(_copy_data(rows, columns, tuple(copy_text(v) for v in defaults.values())))
            with raw.cursor() as cursor:  # type: ignore[union-attr]
                cursor.copy_expert(statement, buffer, size=READ_SIZE)
    except dbapi.Error as exc:
        lost = conn.dialect.is_disconnect(exc, raw, None)
        if lost:
            conn.invalidate(exc)
        raise sa.exc.DBAPIError.instance(statement, None, exc, dbapi.Error,
                                         connection_invalidated=lost) from exc


def _copy_psycopg(raw: Any, statement: str, types: list[str] | None, rows: Sequence[dict], columns: list[str],
                  fill: tuple) -> None:
    """psycopg (3): ``cursor.copy()``, one ``write_row`` per row (psycopg encodes the values)."""
    pick = itemgetter(*columns) if len(columns) > 1 else (lambda row: (row[columns[0]],))
    with raw.cursor() as cursor, cursor.copy(statement) as copy:
        if types is not None:
            copy.set_types(types)
        write_row = copy.write_row
        if fill:
            for row in rows:
                write_row(pick(row) + fill)
        else:
            for row in rows:
                write_row(pick(row))


#: ``(table, columns) -> PostgreSQL type names`` for binary COPY, or None where a type has no binary dumper.
_BINARY_TYPES: dict[tuple[str, tuple[str, ...]], list[str] | None] = {}


def _binary_types(table: sa.Table, names: tuple[str, ...], dialect: Any) -> list[str] | None:
    """The PostgreSQL type of each column, as psycopg's ``Copy.set_types`` takes them (found once per shape)."""
    key = (table.name, names)
    if key not in _BINARY_TYPES:
        from psycopg import ProgrammingError, adapters
        from psycopg.pq import Format

        found: list[str] = []
        usable = True
        for name in names:
            # "VARCHAR(64)", "TIMESTAMP WITHOUT TIME ZONE": the type's name without its modifier
            info = adapters.types.get(table.c[name].type.compile(dialect=dialect).split("(")[0].strip().lower())
            try:
                if info is None:
                    raise ProgrammingError(f"unknown type of {name}")
                adapters.get_dumper_by_oid(info.oid, Format.BINARY)
            except ProgrammingError:
                usable = False
                break
            found.append(info.name)
        _BINARY_TYPES[key] = found if usable else None
    return _BINARY_TYPES[key]


def _copy_data(rows: Sequence[dict], columns: list[str], fill: tuple[str, ...]) -> str:
    """The rows as COPY text: the common types inline (this runs once per value of a spawn)."""
    pick = itemgetter(*columns) if len(columns) > 1 else (lambda row: (row[columns[0]],))
    stamps: dict[datetime, str] = {}  # a spawn's rows share their timestamps
    lines = []
    for row in rows:
        parts = []
        for value in pick(row):
            kind = type(value)
            if kind is str:
                if "\\" in value or "\t" in value or "\n" in value or "\r" in value:
                    value = copy_text(value)
                parts.append(value)
            elif kind is int:
                parts.append(str(value))
            elif value is None:
                parts.append("\\N")
            elif kind is datetime:
                text = stamps.get(value)
                if text is None:
                    text = stamps[value] = copy_text(value)
                parts.append(text)
            else:
                parts.append(copy_text(value))
        parts.extend(fill)
        lines.append("\t".join(parts))
    lines.append("")
    return "\n".join(lines)


def _scalar_defaults(table: sa.Table, present: list[str]) -> dict[str, Any]:
    """Python-side scalar defaults of the columns the rows leave out (NULL columns need nothing)."""
    defaults = {}
    for column in table.columns:
        if column.name in present or column.default is None:
            continue
        if not column.default.is_scalar:
            raise ValueError(f"column {column.name} needs a value: its default is not a constant")
        defaults[column.name] = column.default.arg  # type: ignore[attr-defined]
    return defaults
