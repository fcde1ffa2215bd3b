"""Engines made per process, safely after a prefork worker forks, and schema creation."""
from __future__ import annotations

import logging
import os
import threading
from pathlib import Path
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import URL, Engine, make_url

from .clock import follow_server_clock, measure
from ..errors import StoreError
from .prepared import OPTION as PREPARED_OPTION
from .prepared import plan_by_table_size
from .schema import jobs
from .timeouts import Timeouts

logger = logging.getLogger(__name__)

_DRIVER_EXTRAS = {
    "psycopg2": "postgres",
    "psycopg": "psycopg",
    "MySQLdb": "mysql",
}


def redact(url: str | URL) -> str:
    """The URL with its password hidden: the only form that is ever printed."""
    try:
        return make_url(url).render_as_string(hide_password=True)
    except Exception:
        return "<unparseable database URL>"


class EngineHolder:
    """One SQLAlchemy engine per process, rebuilt when the pid changes."""

    def __init__(self, url: str, engine_options: dict[str, Any] | None = None,
                 synchronous_commit: bool = True, prepared_statements: bool = True,
                 timeouts: Timeouts | None = None) -> None:
        self.timeouts = timeouts or Timeouts()
        self.synchronous_commit = synchronous_commit
        self.prepared_statements = prepared_statements
        try:
            self.url = _with_installed_driver(make_url(url))
        except Exception:
            raise StoreError(f"invalid spawn_database_url {redact(url)!r}") from None
        self.engine_options = dict(engine_options or {})
        self._engine: Engine | None = None
        self._pid: int | None = None
        self._lock = threading.Lock()

    @property
    def dialect(self) -> str:
        return self.url.get_backend_name()

    def get(self) -> Engine:
        pid = os.getpid()
        if self._engine is None or self._pid != pid:
            with self._lock:
                if self._engine is None or self._pid != pid:
                    if self._engine is not None:
                        # Inherited across fork: drop the parent's connections without closing them.
                        self._engine.dispose(close=False)
                    self._engine = self._create()
                    self._pid = pid
        return self._engine

    def measure_clock(self, timeout: float = 2.0) -> None:
        """Read the database server's clock once, within ``timeout`` seconds, on a connection of its own.

        A worker's main process does this before its pool forks: a pool
        process that cannot reach the store then still dates the retries it
        sends on the server's clock (see :func:`~celery_spawn.store.clock.server_eta`).
        A store that is out only leaves this host's clock in use.
        """
        backend = self.dialect
        if backend == "sqlite":
            return
        connect_args = {**self.engine_options.get("connect_args", {}),
                        **Timeouts(connect=timeout, statement=timeout, lock=0).connect_args(backend)}
        engine = sa.create_engine(self.url, poolclass=sa.pool.NullPool, connect_args=connect_args)
        try:
            raw = engine.raw_connection()
            try:
                measure(raw.dbapi_connection, backend)
            finally:
                raw.close()
        except Exception as exc:
            logger.info("the database server's clock could not be read at start (%s): %s", redact(self.url),
                        type(exc).__name__)
        finally:
            engine.dispose()

    def after_fork(self) -> None:
        """Forget connections inherited from the parent process (``worker_process_init``).

        Then make this process's engine at once, in the pool process's main
        thread: its database driver is imported before a task and the
        write-behind thread can both import it (psycopg2's first import in
        two threads at once can fail with a module-lock deadlock).
        """
        if self._engine is not None and self._pid != os.getpid():
            self._engine.dispose(close=False)
            self._engine = None
        try:
            self.get()
        except Exception:  # the first use reports it, with the store's name
            pass

    def load_driver(self) -> None:
        """Import the database driver now (in a worker's main process, before the pool forks)."""
        try:
            self.url.get_dialect().import_dbapi()
        except Exception:  # a missing driver is reported when the store is first used
            pass

    def dispose(self) -> None:
        if self._engine is not None:
            self._engine.dispose()
            self._engine = None

    def _create(self) -> Engine:
        options: dict[str, Any] = {"future": True}
        backend = self.dialect
        if backend == "sqlite":
            database = self.url.database
            if database and database != ":memory:":
                Path(database).expanduser().resolve().parent.mkdir(parents=True, exist_ok=True)
        else:
            options.update(pool_pre_ping=True, pool_recycle=1800)
        connect_args = self.timeouts.connect_args(backend)
        if backend == "postgresql" and "options" in connect_args and self.url.query.get("options"):
            # The URL's own ``options`` (``-c search_path=...``) would be replaced by the timeouts': keep both.
            connect_args["options"] = f"{self.url.query['options']} {connect_args['options']}"
        if backend == "sqlite":
            connect_args["check_same_thread"] = False
        if backend in ("mysql", "mariadb"):
            options["isolation_level"] = "READ COMMITTED"
        if backend == "postgresql" and not self.synchronous_commit:
            connect_args["options"] = " ".join(filter(None, [connect_args.get("options"),
                                                             "-c synchronous_commit=off"]))
        if self.url.get_driver_name() == "psycopg" and not self.prepared_statements:
            # psycopg (3) prepares a statement itself after prepare_threshold executions; None never does.
            connect_args["prepare_threshold"] = None
        extra = dict(self.engine_options)
        connect_args.update(extra.pop("connect_args", None) or {})  # the caller's own connect_args win
        if connect_args:
            options["connect_args"] = connect_args
        options.update(extra)
        try:
            engine = sa.create_engine(self.url, **options)
        except ModuleNotFoundError as exc:
            wanted = _DRIVER_EXTRAS.get(exc.name or "", None)
            hint = f" (pip install 'celery-spawn[{wanted}]')" if wanted else ""
            raise StoreError(f"database driver {exc.name!r} for {redact(self.url)} is not installed{hint}") from None
        if backend == "sqlite":
            _tune_sqlite(engine)
        else:
            follow_server_clock(engine)
            plan_by_table_size(engine, jobs.name)
        if not self.prepared_statements:
            engine = engine.execution_options(**{PREPARED_OPTION: False})
        return engine


def _with_installed_driver(url: URL) -> URL:
    """A bare ``postgresql://`` picks psycopg (3) when it is installed, else psycopg2.

    That is SQLAlchemy 2.1's own default, made explicit so that it holds on
    SQLAlchemy 2.0 too (whose default is psycopg2) and falls back to psycopg2
    when only that is installed. ``postgresql+psycopg://`` and
    ``postgresql+psycopg2://`` choose one; with neither installed the URL is
    left as it is and the missing driver is reported when the store is used.
    """
    if url.drivername == "postgresql":
        import importlib.util

        for driver in ("psycopg", "psycopg2"):
            if importlib.util.find_spec(driver) is not None:
                return url.set(drivername=f"postgresql+{driver}")
    return url


def _tune_sqlite(engine: Engine) -> None:
    """WAL lets readers (the CLI) run beside the worker writing; BEGIN IMMEDIATE serialises writers."""

    @sa.event.listens_for(engine, "connect")
    def _on_connect(dbapi_conn, _record):  # pragma: no cover - trivial
        dbapi_conn.isolation_level = None
        cursor = dbapi_conn.cursor()
        try:
            cursor.execute("PRAGMA journal_mode=WAL")
        except Exception:
            pass
        cursor.execute("PRAGMA synchronous=NORMAL")
        cursor.execute("PRAGMA busy_timeout=30000")
        cursor.close()

    @sa.event.listens_for(engine, "begin")
    def _on_begin(conn):  # pragma: no cover - trivial
        if conn.get_execution_options().get("spawn_readonly"):
            conn.exec_driver_sql("BEGIN")
        else:
            conn.exec_driver_sql("BEGIN IMMEDIATE")
