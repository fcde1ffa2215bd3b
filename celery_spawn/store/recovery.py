"""What the recovery sweep reads and leases: operations with unpublished children, outcomes the store
missed, callbacks never published, dispatched children the broker lost, and started children whose
run is gone.

Mixed into :class:`~celery_spawn.store.SpawnStore`. Every lease is a
refreshed timestamp taken under ``FOR UPDATE SKIP LOCKED`` where the database
has it, so every worker may sweep at once.
"""
from __future__ import annotations

from datetime import datetime, timedelta
from typing import Iterable, Sequence

import sqlalchemy as sa

from . import schema as s
from .connection import StoreBase
from .schema import utcnow


#: Children published again per operation and sweep at most.
REDELIVERY_PAGE = 1000


class Recovery(StoreBase):
    """Stale rows for the recovery sweep, each leased to the caller that reads it."""

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
            rows = [dict(r) for r in conn.execute(self.dialect.for_update(stale)).mappings()]
            if rows:
                conn.execute(s.operations.update().where(s.operations.c.id.in_([r["id"] for r in rows]))
                             .values(updated_at=utcnow()))
        return rows

    def claim_stale_operations(self, grace_seconds: float, limit: int = 50) -> list[str]:
        """Operations untouched for ``grace_seconds`` with children to publish: leased to this caller.

        Children to publish are those after the publish watermark (the
        spawner stopped before its end) and pending or held ones (scheduled
        ones are the scheduler's, when they are due). The lease is
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
                                                s.jobs.c.state.in_((s.PENDING, s.HELD)))))
                .order_by(s.operations.c.updated_at)
                .limit(limit)
            )
            ids = list(conn.execute(self.dialect.for_update(stale)).scalars())
            if ids:
                conn.execute(s.operations.update().where(s.operations.c.id.in_(ids)).values(updated_at=utcnow()))
        return ids

    def claim_overdue_completions(self, grace_seconds: float, limit: int = 50) -> list[str]:
        """Running operations untouched for ``grace_seconds`` whose children all ended before it: leased to this caller.

        Whoever records a child's end probes its operation for completion
        afterwards; a process killed between the two leaves an operation that
        nothing would complete. The lease is the refreshed ``updated_at``, as
        for stale operations.
        """
        cutoff = utcnow() - timedelta(seconds=grace_seconds)
        ops = s.operations
        with self.begin() as conn:
            overdue = (
                sa.select(ops.c.id)
                .where(ops.c.state == s.OP_RUNNING, ops.c.completed.is_(False), ops.c.updated_at < cutoff)
                # ... and no child ended within the grace: its own probe may still be on its way
                .where(~sa.exists().where(s.jobs.c.operation_id == ops.c.id,
                                          sa.or_(s.jobs.c.state.notin_(s.FINAL_JOB_STATES),
                                                 s.jobs.c.finished_at >= cutoff)))
                .order_by(ops.c.updated_at)
                .limit(limit)
            )
            ids = list(conn.execute(self.dialect.for_update(overdue)).scalars())
            if ids:
                conn.execute(ops.update().where(ops.c.id.in_(ids)).values(updated_at=utcnow()))
        return ids

    # ---- dispatched children the broker lost ----------------------------------------------
    def stalled_operations(self, cutoff: datetime, limit: int) -> list[str]:
        """Operations with children dispatched before ``cutoff`` and never started, and no child
        activity (a start, a finish, a dispatch) since then."""
        candidates = (
            sa.select(s.jobs.c.operation_id).distinct()
            .where(_never_started(cutoff), s.jobs.c.operation_id.is_not(None))
            .limit(limit)
        )
        with self.read() as conn:
            return list(conn.execute(_unmoved_since(candidates, cutoff)).scalars())

    def waiting_queues(self, operation_id: str, cutoff: datetime) -> set[str | None]:
        """The queues of an operation's children dispatched before ``cutoff`` and never started."""
        with self.read() as conn:
            return set(conn.execute(sa.select(s.jobs.c.queue).distinct()
                                    .where(s.jobs.c.operation_id == operation_id, _never_started(cutoff))).scalars())

    def lease_lost_children(self, operation_id: str, cutoff: datetime, limit: int = REDELIVERY_PAGE,
                            idle_queues: Iterable[str | None] = ()) -> list[dict]:
        """An operation's children dispatched before ``cutoff``, never started, and not merely waiting in
        their queue, leased to the caller (their ``dispatched_at`` refreshed: the next look at them is a
        whole cutoff away, and their ``redeliveries`` counted: each row says how many times it was sent
        again, this time included).

        Not waiting: their queue is one of ``idle_queues`` (it holds no message ready to deliver), or the
        queue has moved past them (a job recorded and dispatched after them there has started).
        """
        idle = list(idle_queues)
        not_waiting = [_overtaken()]
        if any(q is not None for q in idle):
            not_waiting.append(s.jobs.c.queue.in_([q for q in idle if q is not None]))
        if None in idle:
            not_waiting.append(s.jobs.c.queue.is_(None))
        return self._lease_to_send_again(
            s.DISPATCHED, limit, s.jobs.c.operation_id == operation_id, _never_started(cutoff), sa.or_(*not_waiting))

    # ---- started children whose run is gone -----------------------------------------------
    def quiet_starts(self, cutoff: datetime, limit: int) -> dict[str, set[str | None]]:
        """Operations with children started before ``cutoff`` (and not sent again since) and no child
        activity since then, each with who claimed those children (``nodename/pid``): the runs the caller
        asks after. Claims are few (one per worker process), however many children they hold."""
        candidates = (sa.select(s.jobs.c.operation_id).distinct()
                      .where(_old_start(cutoff), s.jobs.c.operation_id.is_not(None)).limit(limit))
        quiet: dict[str, set[str | None]] = {}
        with self.read() as conn:
            ids = list(conn.execute(_unmoved_since(candidates, cutoff)).scalars())
            if ids:
                for operation_id, worker in conn.execute(
                        sa.select(s.jobs.c.operation_id, s.jobs.c.worker).distinct()
                        .where(s.jobs.c.operation_id.in_(ids), _old_start(cutoff))):
                    quiet.setdefault(operation_id, set()).add(worker)
        return quiet

    def lease_orphaned_starts(self, operation_id: str, claims: Iterable[str], cutoff: datetime,
                              limit: int = REDELIVERY_PAGE) -> list[dict]:
        """An operation's children started before ``cutoff`` by one of ``claims`` and not sent again since,
        leased as :meth:`lease_lost_children` leases: their ``dispatched_at`` refreshed, their
        ``redeliveries`` counted. Returns the rows leased, with their stored message and claim."""
        workers = list(claims)
        if not workers:
            return []
        return self._lease_to_send_again(s.STARTED, limit, s.jobs.c.operation_id == operation_id,
                                         _old_start(cutoff), s.jobs.c.worker.in_(workers), columns=[s.jobs.c.worker])

    def _lease_to_send_again(self, state: str, limit: int, *where: sa.ColumnElement[bool],
                             columns: Sequence[sa.ColumnElement] = ()) -> list[dict]:
        """Lease up to ``limit`` jobs in ``state`` matching ``where`` (in spawn order) to be sent again: their
        ``dispatched_at`` refreshed (the next look is a whole cutoff away) and their ``redeliveries`` counted,
        each row saying how many times it was sent again, this time included."""
        with self.begin() as conn:
            query = self.dialect.for_update(
                sa.select(s.jobs.c.id, s.jobs.c.parent_id, s.jobs.c.root_id, s.jobs.c.message, s.jobs.c.operation_id,
                          s.jobs.c.task_name, s.jobs.c.redeliveries, *columns)
                .where(*where).order_by(s.jobs.c.position).limit(limit)
            )
            rows = [dict(r) for r in conn.execute(query).mappings()]
            if rows:
                conn.execute(s.jobs.update().where(s.jobs.c.id.in_([r["id"] for r in rows]), s.jobs.c.state == state)
                             .values(dispatched_at=utcnow(), redeliveries=s.jobs.c.redeliveries + 1))
            for row in rows:
                row["redeliveries"] = (row["redeliveries"] or 0) + 1
        return rows


def _overtaken() -> sa.ColumnElement[bool]:
    """A job recorded and dispatched after this one, bound for the same queue, has started: the queue moved
    past it. A child that merely waits behind a long queue has not been overtaken, whatever its age."""
    later = s.jobs.alias("later")
    behind = sa.or_(
        sa.and_(later.c.created_at > s.jobs.c.created_at, later.c.dispatched_at > s.jobs.c.dispatched_at),
        # a sibling of the same spawn: published after it in the same page
        sa.and_(later.c.operation_id == s.jobs.c.operation_id, later.c.position > s.jobs.c.position,
                later.c.dispatched_at >= s.jobs.c.dispatched_at),
    )
    return sa.exists().where(
        later.c.state.in_((s.STARTED, s.RETRYING, s.SUCCEEDED, s.FAILED)),
        later.c.started_at.is_not(None),
        later.c.queue.is_not_distinct_from(s.jobs.c.queue),
        behind,
    )


def _unmoved_since(candidates: sa.Select, cutoff: datetime) -> sa.Select:
    """Those of the ``candidates`` (a select of operation ids) in which no child started, finished or was
    dispatched since ``cutoff``: one statement for all of them, each probe an index range of one operation."""
    found = candidates.subquery("candidates")
    moved = s.jobs.alias("moved")
    return sa.select(found.c.operation_id).where(~sa.exists().where(
        moved.c.operation_id == found.c.operation_id,
        sa.or_(moved.c.started_at >= cutoff, moved.c.finished_at >= cutoff, moved.c.dispatched_at >= cutoff)))


def _old_start(cutoff: datetime) -> sa.ColumnElement[bool]:
    """Started before ``cutoff``, still running, and not sent again (by the sweep) since."""
    return sa.and_(s.jobs.c.state == s.STARTED, s.jobs.c.started_at < cutoff,
                   sa.or_(s.jobs.c.dispatched_at.is_(None), s.jobs.c.dispatched_at < cutoff))


def _never_started(cutoff: datetime) -> sa.ColumnElement[bool]:
    """Dispatched before ``cutoff`` and never claimed by a worker."""
    return sa.and_(s.jobs.c.state == s.DISPATCHED, s.jobs.c.started_at.is_(None),
                   s.jobs.c.created_at < cutoff, s.jobs.c.dispatched_at < cutoff)
