"""The recovery sweep: publish children that were recorded but never reached the broker."""
from __future__ import annotations

import logging
from typing import TYPE_CHECKING

from .app import get_state
from .redelivery import redeliver
from .spawner import settle_dependencies, stored_batch_size

if TYPE_CHECKING:
    from celery import Celery

logger = logging.getLogger("celery_spawn.recovery")


#: The longest grace period a sweep accepts (the spawn_recovery_grace setting's own limit).
MAX_GRACE_SECONDS = 7 * 86_400


def recover(app: Celery, grace_seconds: float | None = None, limit: int = 50,
            redeliver_after: float | None = None) -> int:
    """Publish pending children (and claimed ``on_complete`` callbacks) left behind; returns how many.

    Also publishes again dispatched children the broker lost (see
    :mod:`celery_spawn.redelivery`; ``redeliver_after`` defaults to the app's
    ``spawn_redeliver_after``).

    Safe to run from every worker at once: operations are leased with
    ``FOR UPDATE SKIP LOCKED`` (PostgreSQL, MySQL/MariaDB) and a refreshed
    timestamp, and a child that is published twice runs once.
    """
    state = get_state(app)
    grace = state.settings.recovery_grace if grace_seconds is None else grace_seconds
    if isinstance(grace, bool) or not isinstance(grace, (int, float)) or not 0 <= grace <= MAX_GRACE_SECONDS:
        raise ValueError(f"grace_seconds must be between 0 and {MAX_GRACE_SECONDS}, not {grace!r}")
    spawner = state.spawner
    published = 0
    for operation_id in state.store.claim_stale_operations(grace, limit):
        try:
            published += _recover_operation(state, spawner, operation_id)
        except Exception as exc:  # one bad operation must not strand the others
            logger.error("recovery of operation %s failed: %s", operation_id, exc)
    published += reconcile(app, grace)
    published += redeliver(app, redeliver_after, limit)
    for operation in state.store.claim_stale_callbacks(grace, limit):
        try:
            if state.tracker.apply_callback(operation):
                logger.warning("recovery published the on_complete callback of operation %s", operation["id"])
                published += 1
        except Exception as exc:
            logger.error("recovery of the callback of operation %s failed: %s", operation["id"], exc)
    return published


def reconcile(app: Celery, grace_seconds: float, limit: int = 200) -> int:
    """Apply outcomes the store missed, from the result backend; returns how many jobs changed.

    A child's final state is written by a worker signal. When that write is
    lost (the store was down, or the pool process died right after Celery
    stored the result), the job stays dispatched/started and its operation
    never completes. The result backend still knows: this reads it for old
    unfinished jobs and finishes them as the signal would have. Without a
    result backend nothing can be learnt, and nothing changes.
    """
    from celery import states

    from .store import schema as s
    from .tracking import has_result_backend

    if not has_result_backend(app):
        return 0
    state = get_state(app)
    changed = 0
    for job in state.store.stale_unfinished_jobs(grace_seconds, limit):
        try:
            result = app.AsyncResult(job["id"])
            outcome = result.state
            if outcome == states.SUCCESS:
                done = state.tracker.finish(job["id"], s.SUCCEEDED, operation_id=job["operation_id"])
            elif outcome == states.FAILURE:
                done = state.tracker.finish(job["id"], s.FAILED, f"{result.result!r}"[:4000],
                                            operation_id=job["operation_id"])
            elif outcome == states.REVOKED:
                done = state.tracker.finish(job["id"], s.REVOKED, "revoked", operation_id=job["operation_id"])
            else:
                continue
            changed += int(done)
        except Exception as exc:  # one unreadable result must not stop the others
            logger.error("reconciling job %s failed: %s", job["id"], exc)
    if changed:
        logger.warning("recovery applied %d outcomes the store had missed", changed)
    return changed


def _recover_operation(state, spawner, operation_id: str) -> int:
    with state.store.begin() as conn:
        operation = state.store.get_operation(conn, operation_id)
        if operation is None:
            return 0
        # Held children whose dependencies ended while the spawn was being recorded.
        settle_dependencies(state, conn, operation_id)
    count = spawner.publish_pending(operation_id, stored_batch_size(operation), operation=operation)
    if count:
        logger.warning("recovery published %d stranded children of operation %s", count, operation_id)
    return count
