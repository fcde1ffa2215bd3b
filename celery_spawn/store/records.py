"""What a spawn writes: its operation, its children and their dependency edges, and how far it published.

Mixed into :class:`~celery_spawn.store.SpawnStore`; each method states its
transaction: those taking ``conn`` run in the caller's, the others in their own.
"""
from __future__ import annotations

from datetime import datetime
from typing import Any, Iterable, Sequence

import sqlalchemy as sa
from sqlalchemy.engine import Connection

from . import labels
from . import schema as s
from .cancels import Cancels
from .dialects import chunked
from .schema import utcnow



class SpawnRecords(Cancels):
    """Operations, job rows, edges and the publish watermark."""

    # ---- operations --------------------------------------------------------------------
    def get_operation(self, conn: Connection, operation_id: str) -> dict | None:
        row = conn.execute(sa.select(s.operations).where(s.operations.c.id == operation_id)).mappings().first()
        return dict(row) if row else None

    def insert_operation(self, conn: Connection, row: dict) -> bool:
        """Insert an operation; False (and nothing written) when its id is taken."""
        # (psycopg (3) forgets an INSERT's rowcount when its cursor closes, unless it is preserved)
        statement = self.dialect.insert_ignore(s.operations).execution_options(preserve_rowcount=True)
        return conn.execute(statement, row).rowcount == 1

    def operation_owner(self, conn: Connection, operation_id: str) -> str | None:
        """The parent whose spawn holds ``operation_id``, if any."""
        return conn.execute(sa.select(s.operations.c.parent_id)
                            .where(s.operations.c.id == operation_id)).scalar()

    def resolve_operation(self, conn: Connection, token: str) -> tuple[dict | None, int]:
        """The operation a label (its newest) or an operation id names, and how many others share the label."""
        return labels.resolve_operation(conn, token)

    def delete_operation(self, conn: Connection, operation_id: str) -> None:
        job_ids = sa.select(s.jobs.c.id).where(s.jobs.c.operation_id == operation_id)
        conn.execute(s.dependencies.delete().where(s.dependencies.c.job_id.in_(job_ids)))
        conn.execute(s.jobs.delete().where(s.jobs.c.operation_id == operation_id))
        conn.execute(s.task_rollups.delete().where(s.task_rollups.c.operation_id == operation_id))
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
        conn.execute(self.dialect.insert_ignore(s.jobs), [row])

    def insert_jobs(self, conn: Connection, rows: Sequence[dict]) -> None:
        """Insert job rows (dicts with the same keys): one COPY on PostgreSQL/psycopg2, else multi-row INSERTs."""
        if rows:
            self.dialect.insert_jobs(conn, rows)

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
            self.dialect.relax_commit(conn)
            return self.mark_dispatched_in(conn, ids)

    def lock_jobs(self, conn: Connection, ids: Sequence[str]) -> None:
        """Lock these job rows, in id order, in the caller's transaction.

        A tracking write marks some jobs dispatched (published by its previous
        batch) and finishes others. Taken one statement after the other, two
        workers' writes deadlock: each marks a job the other is finishing. Taken
        here first, in one order, they only wait for each other.
        """
        for chunk in chunked(sorted(set(ids))):
            conn.execute(sa.select(s.jobs.c.id).where(s.jobs.c.id.in_(chunk)).order_by(s.jobs.c.id)
                         .with_for_update()).all()

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

    # ---- scheduled children (spawn_delay, countdown, eta) ---------------------------------
    def due_scheduled(self, conn: Connection, now: datetime, limit: int) -> list[dict]:
        """Scheduled children due by ``now``, soonest first, locked in the caller's transaction.

        Rows another caller holds are skipped where the database can
        (``SKIP LOCKED``); SQLite's write transaction serialises callers.
        """
        query = (
            sa.select(s.jobs.c.id, s.jobs.c.position, s.jobs.c.message, s.jobs.c.parent_id, s.jobs.c.root_id,
                      s.jobs.c.operation_id)
            .where(s.jobs.c.state == s.SCHEDULED, s.jobs.c.not_before <= now)
            .order_by(s.jobs.c.not_before)
            .limit(limit)
        )
        return [dict(r) for r in conn.execute(self.dialect.for_update(query)).mappings()]

    def mark_scheduled_dispatched(self, conn: Connection, ids: Sequence[str], now: datetime) -> int:
        """Mark published scheduled children dispatched, in the caller's transaction."""
        changed = 0
        for chunk in chunked(list(ids)):
            changed += conn.execute(
                s.jobs.update().where(s.jobs.c.id.in_(chunk), s.jobs.c.state == s.SCHEDULED)
                .values(state=s.DISPATCHED, dispatched_at=now)
            ).rowcount or 0
        return changed

    def next_due(self, conn: Connection) -> datetime | None:
        """The soonest due time of a scheduled child, if any."""
        return conn.execute(sa.select(sa.func.min(s.jobs.c.not_before)).where(s.jobs.c.state == s.SCHEDULED)).scalar()

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
            self.dialect.relax_commit(conn)
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

    # ---- dependencies ------------------------------------------------------------------
    def dependency_problem(self, conn: Connection, operation_id: str) -> tuple[str, str] | None:
        """The first edge of the operation's children on a job the store does not have, as (job, dependency)."""
        child = s.jobs.alias("child")
        target = s.jobs.alias("target")
        unknown = conn.execute(
            sa.select(s.dependencies.c.job_id, s.dependencies.c.depends_on_id)
            .join(child, child.c.id == s.dependencies.c.job_id)
            .outerjoin(target, target.c.id == s.dependencies.c.depends_on_id)
            .where(child.c.operation_id == operation_id, target.c.id.is_(None))
            .limit(1)
        ).first()
        return (unknown.job_id, unknown.depends_on_id) if unknown is not None else None

    def internal_edges(self, conn: Connection, operation_id: str) -> list[tuple[str, str]]:
        """The (job, dependency) edges between children of the same operation (for a cycle check)."""
        child = s.jobs.alias("child")
        target = s.jobs.alias("target")
        edges = conn.execute(
            sa.select(s.dependencies.c.job_id, s.dependencies.c.depends_on_id)
            .join(child, child.c.id == s.dependencies.c.job_id)
            .join(target, target.c.id == s.dependencies.c.depends_on_id)
            .where(child.c.operation_id == operation_id, target.c.operation_id == operation_id)
        ).all()
        return [(e.job_id, e.depends_on_id) for e in edges]

    def settle_dependencies(self, conn: Connection, operation_id: str, grace_seconds: float) -> int:
        """Count off dependencies of an operation's held children on jobs that are already final.

        A dependency on an earlier job that already succeeded is met at once; one
        that already failed cancels the child and its dependents (unless it
        ignores that failure). This is the same release as a finishing job's.
        Returns how many held children became pending.
        """
        child = s.jobs.alias("child")
        target = s.jobs.alias("target")
        rows = conn.execute(
            sa.select(s.dependencies.c.depends_on_id, s.dependencies.c.ignore_failure, target.c.state)
            .join(child, child.c.id == s.dependencies.c.job_id)
            .join(target, target.c.id == s.dependencies.c.depends_on_id)
            .where(child.c.operation_id == operation_id, child.c.state == s.HELD,
                   s.dependencies.c.satisfied.is_(False), target.c.state.in_(tuple(s.FINAL_JOB_STATES)))
        ).all()
        if not rows:
            return 0
        targets = {row.depends_on_id: row.state for row in rows}
        ended = sorted(job for job, state in targets.items() if state != s.SUCCEEDED)
        for job in ended:
            self.cancel_dependents(conn, [job], f"dependency {job} {targets[job]}")
        succeeded = sorted(job for job, state in targets.items() if state == s.SUCCEEDED)
        return len(self.dialect.release(conn, succeeded, ended, grace_seconds))
