"""When an operation is complete, and what its completion writes: state, rollups, callback state.

Mixed into :class:`~celery_spawn.store.SpawnStore`. Every method runs in a
transaction of its own: completion is probed after the finishing writes
committed, so that concurrent finishers each see the others' rows.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any

import sqlalchemy as sa

from ..protocol import NON_FINAL
from . import schema as s
from .records import SpawnRecords
from . import trees
from .dialects import FINAL
from .rollups import write_task_rollups
from .stats import Durations, duration_aggregates
from .schema import utcnow

if TYPE_CHECKING:
    from sqlalchemy.engine import Connection


class Completions(SpawnRecords):
    """Reads and writes of operation completion."""

    def completion_candidate(self, operation_id: str) -> tuple[dict | None, dict[str, int], dict[str, Any]]:
        """The operation, its children per state and its rollup, when it may be completed now.

        ``(None, {}, {})`` while a child is unfinished (an index probe per
        non-final state, cheap first), while a descendant is unfinished for a
        ``wait_for_descendants`` operation, or for an unknown operation. A
        complete operation comes back with no counts.
        """
        with self.read() as conn:
            running = conn.execute(
                sa.select(s.jobs.c.id).where(s.jobs.c.operation_id == operation_id,
                                             s.jobs.c.state.in_(NON_FINAL)).limit(1)
            ).first()
            if running is not None:
                return None, {}, {}
            operation = self.get_operation(conn, operation_id)
            if operation is None:
                return None, {}, {}
            if operation["completed"] or (operation["state"] == s.OP_FAILED and not operation["total"]):
                return operation, {}, {}
            if operation["wait_for_descendants"] and self._descendants_unfinished(conn, operation_id):
                return None, {}, {}
            counts, rollup = self.tally(conn, operation_id)
        return operation, counts, rollup

    def complete_operation(self, operation_id: str, final_state: str, rollup: dict[str, Any],
                           with_callback: bool) -> bool:
        """Mark the operation complete once; True for the one caller that did it."""
        now = utcnow()
        with self.begin() as conn:
            done = bool(conn.execute(
                s.operations.update().where(s.operations.c.id == operation_id, s.operations.c.completed.is_(False))
                .values(completed=True, state=final_state, finished_at=now, updated_at=now,
                        callback_state=s.CALLBACK_PENDING if with_callback else None, **rollup)
            ).rowcount)
            if done and rollup:  # an operation completed again (reopened by recovery) replaces its rows
                conn.execute(s.task_rollups.delete().where(s.task_rollups.c.operation_id == operation_id))
                write_task_rollups(conn, s.operations.c.id == operation_id)
            return done

    def parent_operation(self, operation_id: str) -> str | None:
        """The operation that spawned this operation's parent job, if it was spawned."""
        with self.read() as conn:
            parent_job = conn.execute(
                sa.select(s.operations.c.parent_id).where(s.operations.c.id == operation_id)).scalar()
            if not parent_job:
                return None
            return conn.execute(sa.select(s.jobs.c.operation_id).where(s.jobs.c.id == parent_job)).scalar()

    def child_counts(self, operation_id: str) -> dict[str, int]:
        with self.read() as conn:
            return self.tally(conn, operation_id)[0]

    def summary_rows(self, operation_id: str, limit: int) -> tuple[list[dict], list[str]]:
        """The children that did not succeed (id, state, error) and the ids of those that did, by position."""
        with self.read() as conn:
            failures = conn.execute(
                sa.select(s.jobs.c.id, s.jobs.c.state, s.jobs.c.error)
                .where(s.jobs.c.operation_id == operation_id, s.jobs.c.state != s.SUCCEEDED)
                .order_by(s.jobs.c.position).limit(limit)
            ).mappings().all()
            succeeded = list(conn.execute(
                sa.select(s.jobs.c.id).where(s.jobs.c.operation_id == operation_id, s.jobs.c.state == s.SUCCEEDED)
                .order_by(s.jobs.c.position).limit(limit + 1)
            ).scalars())
        return [dict(row) for row in failures], succeeded

    def set_callback_state(self, operation_id: str, state: str, error: str | None = None) -> None:
        values: dict[str, Any] = {"callback_state": state}
        if error is not None:
            values["error"] = error
        with self.begin() as conn:
            self.update_operation(conn, operation_id, **values)

    def tally(self, conn: Connection, operation_id: str) -> tuple[dict[str, int], dict[str, Any]]:
        """The children per state, and the operation's rollup columns (stats), from one GROUP BY state.

        The rollup is ``{}`` (the columns stay NULL) unless every child is final:
        only then can it never go stale.
        """
        timed, seconds, longest = duration_aggregates(conn, s.jobs.c.started_at, s.jobs.c.finished_at)
        rows = conn.execute(
            sa.select(s.jobs.c.state, sa.func.count().label("n"), timed.label("timed"), seconds.label("seconds"),
                      longest.label("longest"))
            .where(s.jobs.c.operation_id == operation_id).group_by(s.jobs.c.state)
        ).all()
        counts = {row.state: int(row.n) for row in rows}
        if any(state not in s.FINAL_JOB_STATES for state in counts):
            return counts, {}
        durations = Durations()
        for row in rows:
            durations.add(row.timed, row.seconds, row.longest)
        rollup: dict[str, Any] = {column: counts.get(state, 0) for state, column in s.CHILD_COUNT_COLUMNS.items()}
        rollup.update(children_timed=durations.timed, children_seconds=durations.seconds,
                      children_max_seconds=durations.max_seconds)
        return counts, rollup

    def _descendants_unfinished(self, conn: Connection, operation_id: str) -> bool:
        """Whether any job below the operation's children, at any depth, is not final (one recursive query),
        or an operation spawned below them is still open."""
        tree = trees.below_operation(operation_id, name="subtree")
        pending = conn.execute(
            sa.select(sa.func.count()).select_from(s.jobs.join(tree, s.jobs.c.id == tree.c.id))
            .where(s.jobs.c.state.notin_(FINAL))
        ).scalar()
        if pending:
            return True
        open_ops = conn.execute(
            sa.select(sa.func.count()).select_from(s.operations.join(tree, s.operations.c.parent_id == tree.c.id))
            .where(s.operations.c.completed.is_(False), s.operations.c.total > 0)
        ).scalar()
        return bool(open_ops)
