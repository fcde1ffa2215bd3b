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

After five runs of a prepared statement PostgreSQL may switch to a generic
plan, made once from the statistics of that moment. Made on a young table (a
new store), it reads the whole jobs table, which is cheap then, and it is not
made again as the table grows until an ``ANALYZE``: a store filled by one big
spawn right after took 100 ms per finish instead of 0.5 ms. On a table of
some size the generic plan follows the indexes, and it runs in half the time
of planning anew. So a connection opened while the jobs table holds fewer
than :data:`YOUNG_ROWS` rows (the planner's own estimate) plans every
execution anew (:func:`plan_by_table_size`), and reads the estimate again every
:data:`RECHECK_SECONDS` when it is checked out: once the table has grown (and
been analysed) it lets PostgreSQL choose again, and the generic plans it
makes from then on follow the indexes.
"""
from __future__ import annotations

import logging
import re
import time
from typing import Any, Mapping

import sqlalchemy as sa
from sqlalchemy.engine import Connection, CursorResult
from sqlalchemy.exc import DBAPIError

logger = logging.getLogger(__name__)

#: Execution option (set on the engine) that turns preparing off.
OPTION = "spawn_prepared_statements"
#: Key of the per-DBAPI-connection set of statement names already prepared.
_INFO_KEY = "spawn_prepared"
#: SQLSTATE ``invalid_sql_statement_name``: the session lost the statement (``DISCARD ALL``, a pooler).
_UNKNOWN_STATEMENT = "26000"
_PARAMETER = re.compile(r"(?<![:\w]):(\w+)\b")
#: Below this many jobs (``pg_class.reltuples``) a new connection plans every execution anew.
YOUNG_ROWS = 50_000
#: Seconds between the size checks of a connection that plans anew, made when it is checked out.
RECHECK_SECONDS = 60.0
#: Key, in a pooled connection's ``info``, of the time (monotonic) of its next size check while it plans anew.
_NEXT_CHECK = "spawn_young_next_check"
_JOBS_ESTIMATE = ("SELECT COALESCE((SELECT reltuples FROM pg_class WHERE oid = to_regclass(%s)), 0), "
                  "current_setting('server_version_num')::int")


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


def plan_by_table_size(engine: sa.Engine, jobs_table: str) -> None:
    """On PostgreSQL, give the connections of ``engine`` custom plans while ``jobs_table`` is young.

    A connection opened while the table is young checks its size again, on
    checkout, every :data:`RECHECK_SECONDS`; the round trip is paid once a
    minute by each such connection, and never once the table has grown.
    """
    if engine.dialect.name != "postgresql":
        return

    @sa.event.listens_for(engine, "connect")
    def _on_connect(dbapi_connection: Any, record: Any) -> None:
        if keep_custom_plans_while_young(dbapi_connection, jobs_table):
            record.info[_NEXT_CHECK] = time.monotonic() + RECHECK_SECONDS

    @sa.event.listens_for(engine, "checkout")
    def _on_checkout(dbapi_connection: Any, record: Any, _proxy: Any) -> None:
        next_check = record.info.get(_NEXT_CHECK)
        if next_check is None or time.monotonic() < next_check:
            return
        if keep_custom_plans_while_young(dbapi_connection, jobs_table, planning_anew=True):
            record.info[_NEXT_CHECK] = time.monotonic() + RECHECK_SECONDS
        else:
            del record.info[_NEXT_CHECK]


def keep_custom_plans_while_young(dbapi_connection: Any, jobs_table: str, planning_anew: bool = False) -> bool:
    """``SET plan_cache_mode = force_custom_plan`` on a raw connection when ``jobs_table`` holds fewer than
    :data:`YOUNG_ROWS` rows (or was never analysed); returns whether the connection plans anew afterwards.

    ``planning_anew``: the connection did so already. Then a grown table
    resets the setting to the session's default (what the server, the role
    or the URL configure), and a young one changes nothing. Never breaks a
    connection: when the size cannot be read, the connection stays as it was.
    """
    cursor = dbapi_connection.cursor()
    young = planning_anew
    try:
        cursor.execute(_JOBS_ESTIMATE, (jobs_table,))
        rows, version = cursor.fetchone()
        young = version >= 120000 and rows < YOUNG_ROWS  # (plan_cache_mode: PostgreSQL 12 and later)
        if young and not planning_anew:
            cursor.execute("SET plan_cache_mode = force_custom_plan")
        elif planning_anew and not young:
            cursor.execute("RESET plan_cache_mode")
        dbapi_connection.commit()  # a SET outlives the transaction only once committed
    except Exception as exc:  # planning is the server's business: the connection works either way
        logger.debug("could not read the size of %s: %s", jobs_table, exc)
        young = planning_anew
        try:
            dbapi_connection.rollback()
        except Exception:
            pass
    finally:
        cursor.close()
    return young
