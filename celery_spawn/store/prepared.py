"""Server-side prepared statements for the hot PostgreSQL statements of tracking.

psycopg2 sends every statement as text, so PostgreSQL parses and plans it
on each execution: for the one statement that finishes a batch of jobs and
releases their dependents, that is most of its cost (about 0.7 ms of 1 ms
per dependency hop). A :class:`PreparedStatement` is ``PREPARE``\\ d once per
database connection and run with ``EXECUTE`` from then on.

A prepared statement lives in the database session, so a pooler that hands
each transaction another server connection (PgBouncer in transaction mode)
breaks it: ``spawn_prepared_statements = False`` runs the same SQL unprepared.

psycopg (3) prepares a statement itself once it has run ``prepare_threshold``
times on a connection, so :meth:`PreparedStatement.execute` sends it the plain
statement; with the setting off, the engine sets ``prepare_threshold=None``
(see :mod:`celery_spawn.store.engine`) and psycopg prepares nothing.
"""
from __future__ import annotations

import re
from typing import Any, Mapping

import sqlalchemy as sa
from sqlalchemy.engine import Connection, CursorResult
from sqlalchemy.exc import DBAPIError

#: Execution option (set on the engine) that turns preparing off.
OPTION = "spawn_prepared_statements"
#: Key of the per-DBAPI-connection set of statement names already prepared.
_INFO_KEY = "spawn_prepared"
#: SQLSTATE ``invalid_sql_statement_name``: the session lost the statement (``DISCARD ALL``, a pooler).
_UNKNOWN_STATEMENT = "26000"
_PARAMETER = re.compile(r"(?<![:\w]):(\w+)\b")


class PreparedStatement:
    """One ``sa.text`` statement whose ``:name`` parameters have the PostgreSQL types given."""

    def __init__(self, name: str, statement: sa.TextClause, types: Mapping[str, str]) -> None:
        text = statement.text
        if "%" in text:
            raise ValueError(f"statement {name} contains '%', which the driver would read as a placeholder")
        used = list(dict.fromkeys(_PARAMETER.findall(text)))
        if set(used) != set(types):
            raise ValueError(f"statement {name} has parameters {sorted(used)}, types were given for {sorted(types)}")
        self.name = name
        self.statement = statement
        self.parameters = used
        position = {parameter: index for index, parameter in enumerate(used, 1)}
        body = _PARAMETER.sub(lambda m: f"${position[m.group(1)]}", text)
        self.prepare_sql = f"PREPARE {name}({', '.join(types[p] for p in used)}) AS {body}"
        self.execute_sql = f"EXECUTE {name}({', '.join(['%s'] * len(used))})"

    def execute(self, conn: Connection, params: Mapping[str, Any]) -> CursorResult:
        if conn.dialect.driver != "psycopg2" or not conn.get_execution_options().get(OPTION, True):
            return conn.execute(self.statement, params)
        prepared: set[str] = conn.connection.info.setdefault(_INFO_KEY, set())
        if self.name not in prepared:
            conn.exec_driver_sql(self.prepare_sql)
            prepared.add(self.name)  # (a prepared statement outlives a rollback of its transaction)
        try:
            return conn.exec_driver_sql(self.execute_sql, tuple(params[p] for p in self.parameters))
        except DBAPIError as exc:
            if getattr(exc.orig, "pgcode", None) == _UNKNOWN_STATEMENT:
                prepared.discard(self.name)  # this transaction fails; the caller's retry prepares it again
            raise
