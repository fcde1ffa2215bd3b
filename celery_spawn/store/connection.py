"""A store's plumbing: its engine (one per process, rebuilt after a fork), its transactions, and the
dialect chosen once at construction.

Every database error leaves a transaction as a
:class:`~celery_spawn.errors.StoreError` that names the store, never its password.
"""
from __future__ import annotations

import contextlib
import logging
from pathlib import Path
from typing import Any, Iterator

import sqlalchemy as sa
from sqlalchemy.engine import Connection
from sqlalchemy.exc import SQLAlchemyError

from ..errors import StoreError
from .dialects import dialect_for
from .engine import EngineHolder, Timeouts, redact

logger = logging.getLogger(__name__)


#: Backends reached over the network, whose connect can hang (a timeout is worth setting).
NETWORK_BACKENDS = ("postgresql", "mysql", "mariadb")


class StoreBase:
    """The engine, transactions and dialect of one store (the plumbing every mixin uses)."""

    def __init__(self, url: str, engine_options: dict[str, Any] | None = None, auto_migrate: bool = True,
                 synchronous_commit: bool = True, prepared_statements: bool = True,
                 connect_timeout: float | None = None, timeouts: Timeouts | None = None) -> None:
        options = dict(engine_options or {})
        self.holder = EngineHolder(url, options, synchronous_commit=synchronous_commit,
                                   prepared_statements=prepared_statements, timeouts=timeouts)
        self.auto_migrate = auto_migrate
        self._schema_ready = False
        backend = self.holder.dialect
        self.backend = backend
        self.dialect = dialect_for(backend)
        self.supports_skip_locked = self.dialect.skip_locked
        if connect_timeout is not None and backend in NETWORK_BACKENDS and "connect_args" not in options:
            self.holder.engine_options["connect_args"] = {"connect_timeout": int(max(1, connect_timeout))}

    # ---- plumbing ----------------------------------------------------------------------
    @property
    def engine(self) -> sa.Engine:
        engine = self.holder.get()
        if not self._schema_ready:
            if self.auto_migrate:
                self.migrate(engine)
            self._schema_ready = True
        return engine

    @property
    def safe_url(self) -> str:
        return redact(self.holder.url)

    def migrate(self, engine: sa.Engine | None = None) -> str:
        """Create or upgrade the tables to the newest revision; returns it."""
        from .migrations import upgrade

        try:
            return upgrade(engine or self.holder.get())
        except SQLAlchemyError as exc:
            raise StoreError(f"could not migrate the spawn store at {self.safe_url}: {_short(exc)}") from exc

    def delete_all(self) -> None:
        """Delete every row of the spawn tables, which stay (a test's fresh start on a shared database)."""
        from .schema import metadata

        with self.begin() as conn:
            for table in reversed(metadata.sorted_tables):
                conn.execute(table.delete())

    def after_fork(self) -> None:
        self.holder.after_fork()

    def load_driver(self) -> None:
        """Import the database driver (no connection); see :meth:`EngineHolder.load_driver`."""
        self.holder.load_driver()

    def measure_clock(self) -> None:
        """Read the database server's clock once, briefly (see :meth:`EngineHolder.measure_clock`)."""
        self.holder.measure_clock()

    def dispose(self) -> None:
        self.holder.dispose()

    @contextlib.contextmanager
    def _errors(self) -> Iterator[None]:
        """Database errors come out as :class:`StoreError`, naming the store (never its password)."""
        try:
            yield
        except SQLAlchemyError as exc:
            raise StoreError(f"spawn store {self.safe_url} failed: {_short(exc)}") from exc

    @contextlib.contextmanager
    def begin(self) -> Iterator[Connection]:
        """A write transaction; database errors come out as :class:`StoreError`."""
        with self._errors(), self.engine.begin() as conn:
            yield conn

    @contextlib.contextmanager
    def begun(self, conn: Connection, keep: bool = False) -> Iterator[Connection]:
        """Finish the transaction already begun on ``conn`` (commit, or roll back on error), then close it;
        database errors come out as :class:`StoreError`, as from :meth:`begin`. ``keep``: after the commit,
        begin the next transaction on ``conn`` and leave it open for the caller (closed on error)."""
        with self._errors():
            kept = False
            try:
                try:
                    yield conn
                except BaseException:
                    conn.rollback()
                    raise
                conn.commit()
                if keep:
                    conn.begin()
                    kept = True
            finally:
                if not kept:
                    conn.close()

    @contextlib.contextmanager
    def read(self) -> Iterator[Connection]:
        """A read-only connection (no write lock on SQLite)."""
        with self._errors(), self.engine.connect() as conn:
            yield conn.execution_options(spawn_readonly=True)

    def transaction(self) -> Connection:
        """A connection with a transaction begun, for the caller to end with :meth:`begun` (or close)."""
        with self._errors():
            conn = self.engine.connect()
            try:
                conn.begin()
            except BaseException:
                conn.close()
                raise
            return conn

    # ---- what the faces ask of a store before they use it --------------------------------
    def is_missing_file(self) -> bool:
        """A SQLite store whose file does not exist (a read command must not create it)."""
        database = self.holder.url.database
        return (self.backend == "sqlite" and bool(database) and database != ":memory:"
                and not str(database).startswith("file:") and not Path(str(database)).expanduser().exists())

    def has_tables(self) -> bool | None:
        """Whether the database holds the spawn tables; None when it cannot be reached."""
        try:
            with self.holder.get().connect() as conn:
                return sa.inspect(conn).has_table("spawn_jobs")
        except Exception:
            return None

    def revision(self) -> str | None:
        """The schema revision the database is at (None: no spawn tables)."""
        from .migrations import current_revision

        with self._errors():
            return current_revision(self.holder.get())


def _short(exc: BaseException) -> str:
    """A one-line description of a database error, without SQL or parameters."""
    orig = getattr(exc, "orig", None)
    text = str(orig if orig is not None else exc).strip().splitlines()
    first = text[0] if text else ""
    return f"{type(orig or exc).__name__}: {first[:200]}"
