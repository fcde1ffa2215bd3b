"""A whole tree read straight through the database driver, for a command that starts, reads and exits.

Importing SQLAlchemy and the store's modules costs ``celery spawn tree`` about
as long as reading a 100,000-node tree. This module imports neither: it reads
the URL itself, connects with the driver alone (psycopg2 or psycopg,
mysqlclient, sqlite3) and runs the statements :func:`.queries.tree_rows` runs
for a tree's top (one range of ``ix_spawn_jobs_root_depth``, and with a depth
limit the count of the level below it), written out here.

It takes only the plain case and answers None for anything else, leaving it to
the store: a URL with query arguments or another driver, a start that does
not top its recorded tree (a subtree is a recursive walk), an unknown id or
a label, a missing SQLite file, and any error at all, which the store then
meets and reports in its own words. Every value reaches SQL as a bound
parameter.
"""
from __future__ import annotations

import logging
import re
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any
from urllib.parse import unquote

from ..protocol import HARD_MAX_DEPTH
from .timeouts import Timeouts
from .treerows import TREE_FIELDS, TreeRows

__all__ = ["read_tree"]

logger = logging.getLogger(__name__)

_SERVER_URL = re.compile(
    r"^(?P<scheme>[a-z0-9+]+)://"
    r"(?:(?P<user>[^:@/?#]*)(?::(?P<password>[^@/?#]*))?@)?"
    r"(?P<host>[^:/?#@\[\]]*)(?::(?P<port>\d{1,5}))?"
    r"/(?P<database>[^/?#]+)$"
)
_SQLITE_URL = re.compile(r"^sqlite(?:\+pysqlite)?:///(?P<path>[^?#]+)$")
#: The URL schemes read here, and the database each names.
_SCHEMES = {
    "postgresql": "postgresql", "postgresql+psycopg2": "postgresql", "postgresql+psycopg": "postgresql",
    "mysql": "mysql", "mysql+mysqldb": "mysql", "mariadb": "mysql", "mariadb+mysqldb": "mysql",
}
#: Rows per fetch while a tree streams from MySQL/MariaDB (as the store's read streams it).
_STREAM_ROWS = 1_000

_TOP = (
    "SELECT tree_start.root_id, tree_start.depth FROM spawn_jobs tree_start"
    " WHERE tree_start.id = {start} AND (tree_start.parent_id IS NULL OR NOT EXISTS"
    " (SELECT 1 FROM spawn_jobs tree_above WHERE tree_above.id = tree_start.parent_id))"
)
_RANGE = (
    "SELECT " + ", ".join(f"j.{field}" for field in TREE_FIELDS) + " FROM spawn_jobs j"
    " JOIN (" + _TOP + ") tree_top ON j.root_id = tree_top.root_id"
    " AND j.depth >= tree_top.depth AND j.depth <= tree_top.depth + {levels}"
)
_BELOW = (
    "SELECT j.parent_id, COUNT(*) FROM spawn_jobs j"
    " JOIN (" + _TOP + ") tree_top ON j.root_id = tree_top.root_id AND j.depth = tree_top.depth + {below}"
    " GROUP BY j.parent_id"
)


def read_tree(url: str, job_id: str, *, max_depth: int | None = None, timeouts: Timeouts | None = None,
              ) -> TreeRows | None:
    """The rows of the tree topped by ``job_id``, as :func:`.queries.tree_rows` reads them, or None.

    None means "ask the store": this read does not take that URL, ``job_id``
    does not top its recorded tree, or something failed.
    """
    if max_depth is not None and (isinstance(max_depth, bool) or not isinstance(max_depth, int) or max_depth < 0):
        return None
    try:
        connection = _connect(url, timeouts or Timeouts())
    except Exception as exc:  # a driver not installed, a server down: the store says it better
        logger.debug("direct tree read not taken: %s", type(exc).__name__)
        return None
    if connection is None:
        return None
    connect, style, stream = connection
    levels = HARD_MAX_DEPTH if max_depth is None else min(max_depth, HARD_MAX_DEPTH)
    try:
        conn = connect()
        try:
            return _read(conn, style, stream, job_id, levels, cut=max_depth is not None)
        finally:
            conn.close()
    except Exception as exc:
        logger.debug("direct tree read not taken: %s", type(exc).__name__)
        return None


def _read(conn: Any, style: Callable[[str], str], stream: bool, start: str, levels: int, *, cut: bool,
          ) -> TreeRows | None:
    cursor = conn.cursor()
    cursor.execute(style(_RANGE.format(start="%(start)s", levels="%(levels)s")), {"start": start, "levels": levels})
    rows = list(_streamed(cursor) if stream else cursor.fetchall())
    cursor.close()
    ids = {row[0] for row in rows}
    if start not in ids:
        return None
    hidden: dict[str, int] = {}
    if cut:
        cursor = conn.cursor()
        cursor.execute(style(_BELOW.format(start="%(start)s", below="%(below)s")),
                       {"start": start, "below": levels + 1})
        hidden = {parent: int(count) for parent, count in cursor.fetchall() if parent in ids and count}
        cursor.close()
    return TreeRows(start, rows, hidden)


def _streamed(cursor: Any) -> Iterable[tuple]:
    while True:
        batch = cursor.fetchmany(_STREAM_ROWS)
        if not batch:
            return
        yield from batch


def _pyformat(sql: str) -> str:
    return sql


def _named(sql: str) -> str:
    return re.sub(r"%\((\w+)\)s", r":\1", sql)


def _connect(url: str, timeouts: Timeouts) -> tuple[Callable[[], Any], Callable[[str], str], bool] | None:
    """(open a connection, the driver's parameter style, whether rows stream), or None for a URL not read here."""
    found = _SQLITE_URL.match(url)
    if found is not None:
        path = Path(unquote(found["path"])).expanduser()
        if path.name == ":memory:" or not path.is_file():
            return None
        import sqlite3

        timeout = timeouts.connect_args("sqlite")["timeout"]
        return (lambda: sqlite3.connect(str(path), timeout=timeout, isolation_level=None)), _named, False
    found = _SERVER_URL.match(url)
    if found is None or found["scheme"] not in _SCHEMES:
        return None
    scheme, backend = found["scheme"], _SCHEMES[found["scheme"]]
    args: dict[str, Any] = dict(timeouts.connect_args(backend))
    args.pop("init_command", None)  # a lock wait: this read takes no lock
    where = {"host": unquote(found["host"]) or None, "port": int(found["port"]) if found["port"] else None,
             "user": unquote(found["user"]) if found["user"] is not None else None,
             "password": unquote(found["password"]) if found["password"] is not None else None}
    database = unquote(found["database"])
    if backend == "postgresql":
        driver = _postgres_driver(scheme)
        args.update({key: value for key, value in where.items() if value is not None}, dbname=database)
        return (lambda: driver.connect(**args)), _pyformat, False
    import MySQLdb
    import MySQLdb.cursors

    renamed = {"host": "host", "port": "port", "user": "user", "password": "passwd"}
    args.update({renamed[key]: value for key, value in where.items() if value is not None}, db=database,
                charset="utf8mb4", cursorclass=MySQLdb.cursors.SSCursor)
    return (lambda: MySQLdb.connect(**args)), _pyformat, True


def _postgres_driver(scheme: str) -> Any:
    """psycopg2 where the URL leaves the choice (it imports in a fraction of psycopg's time), else as asked."""
    if scheme == "postgresql+psycopg":
        import psycopg

        return psycopg
    try:
        import psycopg2
    except ImportError:
        if scheme == "postgresql+psycopg2":
            raise
        import psycopg

        return psycopg
    return psycopg2
