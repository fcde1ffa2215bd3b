"""``install()``: add spawning to an existing Celery app."""
from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

from .handlers import SpawnManager
from .state import SpawnState, attach_state, get_state, peek_state

if TYPE_CHECKING:
    from celery import Celery

__all__ = ["SpawnState", "get_state", "install", "peek_state"]

logger = logging.getLogger("celery_spawn")


def install(app: Celery, manager: SpawnManager | None = None, **settings: Any) -> SpawnState:
    """Add spawning to ``app``: handlers, settings, worker hooks. Safe to call again.

    ``settings`` are the ``spawn_*`` settings without their prefix
    (``database_url=...``); they win over ``app.conf`` and the environment.
    """
    state = attach_state(app, manager, **settings)
    if not state.installed:
        from . import hooks  # noqa: F401  (connects the worker signals that track children)
        from .worker import install_worker_hooks

        install_worker_hooks(app)
        state.installed = True
    return state
