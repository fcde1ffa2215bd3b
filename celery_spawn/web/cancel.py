"""Cancelling an operation from the web API.

With the Celery app (``serve -A proj``), :func:`celery_spawn.control.cancel`
does it all: undispatched children are cancelled, running ones revoked, the
operation completes and its ``on_complete`` callback runs. Without one, the
server can only write to the store: :func:`cancel_in_store` cancels the
children that were never dispatched (pending, held) below the operation and
leaves running ones alone.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any

import sqlalchemy as sa

from ..store import schema as s
from ..store.sql import chunked, utcnow

if TYPE_CHECKING:
    from celery import Celery

    from ..store import SpawnStore

__all__ = ["STORE_ONLY_NOTE", "cancel_in_store", "cancel_operation"]

#: Why a store-only cancel does less, said in its response.
STORE_ONLY_NOTE = ("store only: this server has no Celery app (serve it with -A), so children already "
                   "dispatched or running were not revoked and no on_complete callback was applied")
#: The error recorded on children cancelled here.
REASON = "cancelled from the web API"


def cancel_operation(store: SpawnStore, celery_app: Celery | None, operation_id: str, *,
                     terminate: bool = False) -> dict[str, Any]:
    """Cancel an operation (it must exist) through Celery when possible, else in the store."""
    if celery_app is not None:
        from ..control import cancel

        result = cancel(celery_app, operation_id, terminate=terminate)
        return {"operation_id": operation_id, "mode": "celery", "cancelled": int(result.get("cancelled", 0)),
                "revoked": int(result.get("revoked", 0)), "still_running": 0, "terminate": terminate,
                "operations": sorted(result.get("operations", [])), "completed": None, "note": None}
    return {"operation_id": operation_id, "mode": "store", "terminate": False, **cancel_in_store(store, operation_id),
            "note": STORE_ONLY_NOTE}


def cancel_in_store(store: SpawnStore, operation_id: str) -> dict[str, Any]:
    """Mark the pending and held jobs below an operation cancelled; one transaction, guarded updates.

    Returns ``cancelled`` (jobs changed), ``revoked`` (always 0),
    ``still_running`` (unfinished jobs left to their workers), ``operations``
    (those that lost children) and ``completed`` (those this cancel finished).
    """
    jobs = s.jobs
    tree = sa.select(jobs.c.id).where(jobs.c.operation_id == operation_id).cte("web_cancel", recursive=True)
    tree = tree.union_all(sa.select(jobs.c.id).join(tree, jobs.c.parent_id == tree.c.id))
    with store.begin() as conn:
        rows = conn.execute(
            sa.select(jobs.c.id, jobs.c.state, jobs.c.operation_id).join(tree, jobs.c.id == tree.c.id)
            .where(jobs.c.state.notin_(tuple(s.FINAL_JOB_STATES)))
        ).all()
        waiting = [row.id for row in rows if row.state in s.UNDISPATCHED_JOB_STATES]
        cancelled = 0
        now = utcnow()
        for chunk in chunked(waiting):
            cancelled += conn.execute(
                jobs.update().where(jobs.c.id.in_(chunk), jobs.c.state.in_(tuple(s.UNDISPATCHED_JOB_STATES)))
                .values(state=s.CANCELLED, error=REASON, finished_at=now)
            ).rowcount or 0
        touched = sorted({row.operation_id for row in rows
                          if row.state in s.UNDISPATCHED_JOB_STATES and row.operation_id})
        for touched_id in touched:
            conn.execute(s.operations.update().where(s.operations.c.id == touched_id).values(updated_at=now))
        completed = [op for op in touched if _complete_without_callback(conn, op, now)]
    return {"cancelled": cancelled, "revoked": 0, "still_running": len(rows) - len(waiting), "operations": touched,
            "completed": completed}


def _complete_without_callback(conn: sa.Connection, operation_id: str, now: Any) -> bool:
    """Complete an operation whose children are all final, unless completing it is a worker's job.

    A worker completes an operation when its last running child ends; when the
    cancel ended the last ones, nobody else would. An ``on_complete``
    callback or ``wait_for_descendants`` needs the Celery app: left running.
    """
    from ..tracking import _operation_state  # the one rule for an operation's final state

    ops = s.operations
    row = conn.execute(sa.select(ops.c.completed, ops.c.on_complete, ops.c.wait_for_descendants)
                       .where(ops.c.id == operation_id)).first()
    if row is None or row.completed or row.on_complete or row.wait_for_descendants:
        return False
    counts: dict[str, int] = dict(conn.execute(
        sa.select(s.jobs.c.state, sa.func.count()).where(s.jobs.c.operation_id == operation_id)
                               .group_by(s.jobs.c.state)).all())
    if not counts or any(state not in s.FINAL_JOB_STATES for state in counts):
        return False
    return bool(conn.execute(
        ops.update().where(ops.c.id == operation_id, ops.c.completed.is_(False))
        .values(completed=True, state=_operation_state(counts), finished_at=now, updated_at=now)
    ).rowcount)
