"""The recovery sweep: publish children that were recorded but never reached the broker."""
from __future__ import annotations

import logging
from typing import TYPE_CHECKING

from .app import get_state
from .spawner import settle_dependencies, stored_batch_size

if TYPE_CHECKING:
    from celery import Celery

logger = logging.getLogger("celery_spawn.recovery")


def recover(app: Celery, grace_seconds: float | None = None, limit: int = 50) -> int:
    """Publish pending children (and claimed ``on_complete`` callbacks) left behind; returns how many.

    Safe to run from every worker at once: operations are leased with
    ``FOR UPDATE SKIP LOCKED`` (PostgreSQL, MySQL/MariaDB) and a refreshed
    timestamp, and a child that is published twice runs once.
    """
    state = get_state(app)
    grace = state.settings.recovery_grace if grace_seconds is None else grace_seconds
    spawner = state.spawner
    published = 0
    for operation_id in state.store.claim_stale_operations(grace, limit):
        try:
            published += _recover_operation(state, spawner, operation_id)
        except Exception as exc:  # one bad operation must not strand the others
            logger.error("recovery of operation %s failed: %s", operation_id, exc)
    for operation in state.store.claim_stale_callbacks(grace, limit):
        try:
            if state.tracker.apply_callback(operation):
                logger.warning("recovery published the on_complete callback of operation %s", operation["id"])
                published += 1
        except Exception as exc:
            logger.error("recovery of the callback of operation %s failed: %s", operation["id"], exc)
    return published


def _recover_operation(state, spawner, operation_id: str) -> int:
    with state.store.begin() as conn:
        operation = state.store.get_operation(conn, operation_id)
        if operation is None:
            return 0
        # Held children whose dependencies ended while the spawn was being recorded.
        settle_dependencies(state, conn, operation_id)
    count = spawner.publish_pending(operation_id, stored_batch_size(operation))
    if count:
        logger.warning("recovery published %d stranded children of operation %s", count, operation_id)
    return count
