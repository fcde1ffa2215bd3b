"""Controlling spawn trees from code: cancel a tree, find an operation's callback."""
from __future__ import annotations

from typing import TYPE_CHECKING, Any

from .app import get_state
from .handlers import child_id

if TYPE_CHECKING:
    from celery import Celery


def cancel(app: Celery, job_or_operation_id: str, terminate: bool = False) -> dict[str, Any]:
    """Stop every unfinished descendant of a job or operation.

    Held and pending children are marked cancelled; dispatched and running
    ones are revoked (terminated with ``terminate=True``); finished ones stay
    as they are. Raises :class:`~celery_spawn.errors.JobNotFound` for an
    unknown id.
    """
    return get_state(app).tracker.cancel(job_or_operation_id, terminate=terminate)


def completion_task_id(operation_id: str) -> str:
    """The deterministic task id of an operation's ``on_complete`` callback."""
    return child_id(operation_id, -1)
