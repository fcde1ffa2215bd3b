"""Publishing again children whose message the broker lost after they were dispatched.

A broker can lose a message it already handed out: kombu's Redis transport
drops one when the consumer dies between taking it off the list and
recording it as unacknowledged. The store then says ``dispatched`` forever
and the operation never completes. Nothing tells such a child from one that
waits behind a long queue except time, so the rule is conservative: a
dispatched child is published again only when no worker started it within
``spawn_redeliver_after`` seconds *and* its operation made no progress in
that time (no sibling started or finished), and only when it is a
:class:`~celery_spawn.SpawnTask`, whose claim in the store drops the copy
if the original turns up after all.
"""
from __future__ import annotations

import logging
import math
from datetime import timedelta
from typing import TYPE_CHECKING

import sqlalchemy as sa

from .app import get_state
from .publisher import publish_children
from .store import schema as s
from .store.sql import utcnow

if TYPE_CHECKING:
    from celery import Celery

    from .app import SpawnState

logger = logging.getLogger("celery_spawn.redelivery")

#: Children published again per operation and sweep at most.
PAGE = 1000


def redeliver(app: Celery, after_seconds: float | None = None, limit: int = 50) -> int:
    """Publish again the lost dispatched children of up to ``limit`` stalled operations; returns how many.

    ``after_seconds`` defaults to the app's ``spawn_redeliver_after``; 0 turns
    redelivery off. Safe from every worker at once: the children are leased
    (their ``dispatched_at`` refreshed, rows locked with ``SKIP LOCKED`` where
    the database has it) before they are published.
    """
    state = get_state(app)
    after = state.settings.redeliver_after if after_seconds is None else after_seconds
    if isinstance(after, bool) or not isinstance(after, (int, float)) or not 0 <= after < math.inf:
        raise ValueError(f"after_seconds must be a number of seconds, not {after!r}")
    if not after:
        return 0
    cutoff = utcnow() - timedelta(seconds=after)
    published = 0
    for operation_id in _stalled_operations(state, cutoff, limit):
        try:
            published += _redeliver_operation(state, operation_id, cutoff)
        except Exception as exc:  # one bad operation must not strand the others
            logger.error("redelivery for operation %s failed: %s", operation_id, exc)
    return published


def _never_started(cutoff):
    """Dispatched before ``cutoff`` and never claimed by a worker."""
    return sa.and_(s.jobs.c.state == s.DISPATCHED, s.jobs.c.started_at.is_(None),
                   s.jobs.c.created_at < cutoff, s.jobs.c.dispatched_at < cutoff)


def _stalled_operations(state: SpawnState, cutoff, limit: int) -> list[str]:
    """Operations with old never-started children and no child activity since ``cutoff``."""
    candidates = (
        sa.select(s.jobs.c.operation_id).distinct()
        .where(_never_started(cutoff), s.jobs.c.operation_id.is_not(None))
        .limit(limit)
    )
    stalled = []
    with state.store.read() as conn:
        for operation_id in list(conn.execute(candidates).scalars()):
            progressed = conn.execute(
                sa.select(s.jobs.c.id).where(
                    s.jobs.c.operation_id == operation_id,
                    sa.or_(s.jobs.c.started_at >= cutoff, s.jobs.c.finished_at >= cutoff,
                           s.jobs.c.dispatched_at >= cutoff)).limit(1)
            ).first()
            if progressed is None:
                stalled.append(operation_id)
    return stalled


def _redeliver_operation(state: SpawnState, operation_id: str, cutoff) -> int:
    from .task import SpawnTask

    store = state.store
    with store.begin() as conn:
        lost = store.for_update(
            sa.select(s.jobs.c.id, s.jobs.c.parent_id, s.jobs.c.root_id, s.jobs.c.message, s.jobs.c.operation_id,
                      s.jobs.c.task_name)
            .where(s.jobs.c.operation_id == operation_id, _never_started(cutoff))
            .order_by(s.jobs.c.position).limit(PAGE)
        )
        rows = [dict(r) for r in conn.execute(lost).mappings()]
        safe = [r for r in rows if isinstance(state.app.tasks.get(r["task_name"]), SpawnTask) and r["message"]]
        unsafe = len(rows) - len(safe)
        if unsafe:
            logger.error("%d dispatched children of operation %s never started; they are not SpawnTasks (or not "
                         "registered here), so publishing them again could run them twice: left alone",
                         unsafe, operation_id)
        if rows:  # the lease: the next look at these is ``after`` seconds away
            conn.execute(s.jobs.update().where(s.jobs.c.id.in_([r["id"] for r in rows]),
                                               s.jobs.c.state == s.DISPATCHED)
                         .values(dispatched_at=utcnow()))
    if not safe:
        return 0
    publish_children(state.app, safe)
    logger.warning("published again %d children of operation %s that no worker started (lost by the broker?)",
                   len(safe), operation_id)
    return len(safe)
