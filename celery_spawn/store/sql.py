"""SpawnStore: the narrow interface between the spawner and the SQL tables.

Dialect differences (insert-or-ignore, ``FOR UPDATE SKIP LOCKED``) are decided
once, at construction. Every value reaches SQL as a bound parameter.
"""
from __future__ import annotations

import contextlib
import logging
from datetime import datetime, timedelta, timezone
from typing import Any, Iterable, Iterator, Sequence

import sqlalchemy as sa
from sqlalchemy.engine import Connection
from sqlalchemy.exc import SQLAlchemyError

from ..errors import StoreError
from . import schema as s
from .engine import EngineHolder, redact
from .pgcopy import copy_rows, supports_copy

logger = logging.getLogger(__name__)

#: Rows per executemany / IN (...) list: well under every backend's parameter limit.
CHUNK = 500


def utcnow() -> datetime:
    """Naive UTC, as stored."""
    return datetime.now(timezone.utc).replace(tzinfo=None)


def chunked(items: Sequence[Any], size: int = CHUNK) -> Iterator[Sequence[Any]]:
    for start in range(0, len(items), size):
        yield items[start:start + size]


class SpawnStore:
    """Reads and writes spawn operations, jobs and dependency edges."""

    def __init__(self, url: str, engine_options: dict[str, Any] | None = None, auto_migrate: bool = True,
                 synchronous_commit: bool = True, prepared_statements: bool = True) -> None:
        self.holder = EngineHolder(url, engine_options, synchronous_commit=synchronous_commit,
                                   prepared_statements=prepared_statements)
        self.auto_migrate = auto_migrate
        self._schema_ready = False
        backend = self.holder.dialect
        self.backend = backend
        self.supports_skip_locked = backend in ("postgresql", "mysql", "mariadb")

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
            raise StoreError(f"could not migrate the spawn store at {self.safe_url}: {type(exc).__name__}") from exc

    def after_fork(self) -> None:
        self.holder.after_fork()

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
    def begun(self, conn: Connection) -> Iterator[Connection]:
        """Finish the transaction already begun on ``conn`` (commit, or roll back on error), then close it;
        database errors come out as :class:`StoreError`, as from :meth:`begin`."""
        with self._errors(), conn:
            try:
                yield conn
            except BaseException:
                conn.rollback()
                raise
            conn.commit()

    @contextlib.contextmanager
    def read(self) -> Iterator[Connection]:
        """A read-only connection (no write lock on SQLite)."""
        with self._errors(), self.engine.connect() as conn:
            yield conn.execution_options(spawn_readonly=True)

    def relax_commit(self, conn: Connection) -> None:
        """PostgreSQL: this transaction's commit does not wait for the WAL flush (for writes a crash may lose)."""
        if self.backend == "postgresql":
            conn.exec_driver_sql("SET LOCAL synchronous_commit TO OFF")

    def insert_ignore(self, table: sa.Table) -> sa.Insert:
        """INSERT that skips rows whose primary key exists, in this backend's words."""
        if self.backend == "postgresql":
            from sqlalchemy.dialects.postgresql import insert

            return insert(table).on_conflict_do_nothing()
        if self.backend == "sqlite":
            return table.insert().prefix_with("OR IGNORE")
        return table.insert().prefix_with("IGNORE")

    def for_update(self, query: sa.Select) -> sa.Select:
        if self.supports_skip_locked:
            return query.with_for_update(skip_locked=True)
        return query

    # ---- operations --------------------------------------------------------------------
    def get_operation(self, conn: Connection, operation_id: str) -> dict | None:
        row = conn.execute(sa.select(s.operations).where(s.operations.c.id == operation_id)).mappings().first()
        return dict(row) if row else None

    def insert_operation(self, conn: Connection, row: dict) -> None:
        conn.execute(s.operations.insert(), [row])

    def delete_operation(self, conn: Connection, operation_id: str) -> None:
        job_ids = sa.select(s.jobs.c.id).where(s.jobs.c.operation_id == operation_id)
        conn.execute(s.dependencies.delete().where(s.dependencies.c.job_id.in_(job_ids)))
        conn.execute(s.jobs.delete().where(s.jobs.c.operation_id == operation_id))
        conn.execute(s.operations.delete().where(s.operations.c.id == operation_id))

    def update_operation(self, conn: Connection, operation_id: str, **values: Any) -> None:
        values.setdefault("updated_at", utcnow())
        conn.execute(s.operations.update().where(s.operations.c.id == operation_id).values(**values))

    def record_failed_operation(self, row: dict, fallback_id: str | None = None) -> None:
        """Record (or overwrite) an operation that failed before any child was kept.

        When the id is taken by another parent's operation, the failure is
        recorded under ``fallback_id`` (the parent's default operation id).
        """
        with self.begin() as conn:
            existing = self.get_operation(conn, row["id"])
            if existing is not None and existing["parent_id"] != row["parent_id"] and fallback_id:
                row = {**row, "id": fallback_id}
                existing = self.get_operation(conn, fallback_id)
            if existing is None:
                self.insert_operation(conn, row)
            elif existing["parent_id"] == row["parent_id"] and existing["state"] == s.OP_FAILED:
                self.update_operation(conn, row["id"], error=row["error"], config=row.get("config"))

    # ---- jobs --------------------------------------------------------------------------
    def ensure_job(self, conn: Connection, row: dict) -> None:
        """Insert a job row unless one with its id exists (the root of a tree)."""
        conn.execute(self.insert_ignore(s.jobs), [row])

    def insert_jobs(self, conn: Connection, rows: Sequence[dict]) -> None:
        """Insert job rows (dicts with the same keys): one COPY on PostgreSQL/psycopg2, else multi-row INSERTs."""
        if not rows:
            return
        if supports_copy(conn):
            copy_rows(conn, s.jobs, rows)
            return
        for chunk in chunked(rows):
            conn.execute(s.jobs.insert(), list(chunk))

    def insert_dependencies(self, conn: Connection, rows: Sequence[dict]) -> None:
        for chunk in chunked(rows):
            conn.execute(s.dependencies.insert(), list(chunk))

    def existing_job_ids(self, conn: Connection, ids: Iterable[str]) -> set[str]:
        found: set[str] = set()
        ids = list(ids)
        for chunk in chunked(ids):
            found.update(conn.execute(sa.select(s.jobs.c.id).where(s.jobs.c.id.in_(chunk))).scalars())
        return found

    def job_states(self, conn: Connection, ids: Iterable[str]) -> dict[str, str]:
        states: dict[str, str] = {}
        ids = list(ids)
        for chunk in chunked(ids):
            rows = conn.execute(sa.select(s.jobs.c.id, s.jobs.c.state).where(s.jobs.c.id.in_(chunk)))
            states.update({row.id: row.state for row in rows})
        return states

    def get_job(self, conn: Connection, job_id: str) -> dict | None:
        row = conn.execute(sa.select(s.jobs).where(s.jobs.c.id == job_id)).mappings().first()
        return dict(row) if row else None

    def operation_job_ids(self, conn: Connection, operation_id: str) -> list[str]:
        query = (sa.select(s.jobs.c.id).where(s.jobs.c.operation_id == operation_id)
                 .order_by(s.jobs.c.position))
        return list(conn.execute(query).scalars())

    def pending_page(self, conn: Connection, operation_id: str, after_position: int, limit: int,
                     any_state: bool = False) -> list[dict]:
        """Next undispatched (or, with ``any_state``, all) children of an operation, by position (keyset paging)."""
        query = (
            sa.select(s.jobs.c.id, s.jobs.c.position, s.jobs.c.message, s.jobs.c.parent_id, s.jobs.c.root_id)
            .where(s.jobs.c.operation_id == operation_id, s.jobs.c.position > after_position)
            .order_by(s.jobs.c.position)
            .limit(limit)
        )
        if not any_state:
            query = query.where(s.jobs.c.state == s.PENDING)
        return [dict(r) for r in conn.execute(query).mappings()]

    def mark_dispatched(self, ids: Sequence[str]) -> int:
        """Mark published children; only rows still pending change (idempotent).

        On PostgreSQL the commit does not wait for the WAL flush: a mark lost in
        a database crash only makes the sweep publish the child again, which a
        published page's watermark risks as well.
        """
        if not ids:
            return 0
        with self.begin() as conn:
            self.relax_commit(conn)
            return self.mark_dispatched_in(conn, ids)

    def mark_dispatched_in(self, conn: Connection, ids: Sequence[str]) -> int:
        """:meth:`mark_dispatched` inside the caller's transaction."""
        now = utcnow()
        changed = 0
        for chunk in chunked(list(ids)):
            result = conn.execute(
                s.jobs.update()
                .where(s.jobs.c.id.in_(chunk), s.jobs.c.state == s.PENDING)
                .values(state=s.DISPATCHED, dispatched_at=now)
            )
            changed += result.rowcount or 0
        return changed

    def unpublished_page(self, conn: Connection, operation_id: str, after_position: int, limit: int) -> list[dict]:
        """The next children recorded ``dispatched`` whose message may not be in the broker yet, by position.

        Those are the children without dependency edges after the operation's
        watermark; a child with edges is published by whoever releases it.
        """
        has_edges = sa.exists().where(s.dependencies.c.job_id == s.jobs.c.id)
        query = (
            sa.select(s.jobs.c.id, s.jobs.c.position, s.jobs.c.message, s.jobs.c.parent_id, s.jobs.c.root_id)
            .where(s.jobs.c.operation_id == operation_id, s.jobs.c.position > after_position,
                   s.jobs.c.state == s.DISPATCHED, ~has_edges)
            .order_by(s.jobs.c.position)
            .limit(limit)
        )
        return [dict(r) for r in conn.execute(query).mappings()]

    def advance_watermark(self, operation_id: str, position: int) -> None:
        """Record that every child recorded ``dispatched`` up to ``position`` reached the broker.

        One row update per published page instead of one per child; it also
        refreshes the operation's lease. The watermark only moves forward. On
        PostgreSQL its commit does not wait for the WAL flush: a watermark lost
        in a database crash only makes the sweep publish a page again, as after
        a crash of the publishing process.
        """
        now = utcnow()
        with self.begin() as conn:
            self.relax_commit(conn)
            conn.execute(
                s.operations.update()
                .where(s.operations.c.id == operation_id, s.operations.c.published_through < position)
                .values(published_through=position, updated_at=now)
            )

    def unpublish(self, operation_id: str, after_position: int) -> int:
        """After a broker failure: children recorded ``dispatched`` past ``after_position`` become ``pending``.

        They are then what they are: recorded, not published, shown by
        ``celery spawn pending`` and published by the recovery sweep one by
        one. The watermark is closed (nothing is left for it). Returns how
        many children changed.
        """
        has_edges = sa.exists().where(s.dependencies.c.job_id == s.jobs.c.id)
        with self.begin() as conn:
            changed = conn.execute(
                s.jobs.update()
                .where(s.jobs.c.operation_id == operation_id, s.jobs.c.position > after_position,
                       s.jobs.c.state == s.DISPATCHED, ~has_edges)
                .values(state=s.PENDING, dispatched_at=None)
            ).rowcount
            conn.execute(
                s.operations.update().where(s.operations.c.id == operation_id)
                .values(published_through=s.operations.c.total - 1, updated_at=utcnow())
            )
        return changed or 0

    def touch_operation(self, operation_id: str) -> None:
        with self.begin() as conn:
            conn.execute(s.operations.update().where(s.operations.c.id == operation_id)
                         .values(updated_at=utcnow()))

    # ---- recovery ----------------------------------------------------------------------
    def stale_unfinished_jobs(self, grace_seconds: float, limit: int = 200) -> list[dict]:
        """Dispatched, started or retrying jobs recorded more than ``grace_seconds`` ago (oldest first)."""
        cutoff = utcnow() - timedelta(seconds=grace_seconds)
        with self.read() as conn:
            query = (
                sa.select(s.jobs.c.id, s.jobs.c.operation_id, s.jobs.c.state)
                .where(s.jobs.c.state.in_((s.DISPATCHED, s.STARTED, s.RETRYING)), s.jobs.c.created_at < cutoff,
                       s.jobs.c.operation_id.is_not(None))
                .order_by(s.jobs.c.created_at)
                .limit(limit)
            )
            return [dict(r) for r in conn.execute(query).mappings()]

    def claim_stale_callbacks(self, grace_seconds: float, limit: int = 50) -> list[dict]:
        """Completed operations whose ``on_complete`` was claimed but not published: leased to this caller."""
        cutoff = utcnow() - timedelta(seconds=grace_seconds)
        with self.begin() as conn:
            stale = (
                sa.select(s.operations)
                .where(s.operations.c.callback_state == s.CALLBACK_PENDING, s.operations.c.updated_at < cutoff)
                .order_by(s.operations.c.updated_at)
                .limit(limit)
            )
            rows = [dict(r) for r in conn.execute(self.for_update(stale)).mappings()]
            if rows:
                conn.execute(s.operations.update().where(s.operations.c.id.in_([r["id"] for r in rows]))
                             .values(updated_at=utcnow()))
        return rows

    def claim_stale_operations(self, grace_seconds: float, limit: int = 50) -> list[str]:
        """Operations untouched for ``grace_seconds`` with children to publish: leased to this caller.

        Children to publish are those after the publish watermark (the
        spawner stopped before its end) and pending or held ones. The lease is
        the refreshed ``updated_at``: another sweeper skips the operation
        until the grace period passes again.
        """
        cutoff = utcnow() - timedelta(seconds=grace_seconds)
        ops = s.operations
        with self.begin() as conn:
            stale = (
                sa.select(ops.c.id)
                .where(ops.c.state == s.OP_RUNNING, ops.c.updated_at < cutoff)
                .where(sa.or_(ops.c.published_through < ops.c.total - 1,
                              sa.exists().where(s.jobs.c.operation_id == ops.c.id,
                                                s.jobs.c.state.in_(s.UNDISPATCHED_JOB_STATES))))
                .order_by(s.operations.c.updated_at)
                .limit(limit)
            )
            ids = list(conn.execute(self.for_update(stale)).scalars())
            if ids:
                conn.execute(s.operations.update().where(s.operations.c.id.in_(ids)).values(updated_at=utcnow()))
        return ids


def _short(exc: BaseException) -> str:
    """A one-line description of a database error, without SQL or parameters."""
    orig = getattr(exc, "orig", None)
    text = str(orig if orig is not None else exc).strip().splitlines()
    first = text[0] if text else ""
    return f"{type(orig or exc).__name__}: {first[:200]}"
