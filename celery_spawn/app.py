"""``install()``: add spawning to an existing Celery app."""
from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

from .handlers import SpawnManager
from .settings import DEFAULT_PURGE_BATCH_SIZE, DEFAULT_PURGE_PAUSE_RATIO
from .state import SpawnState, attach_state, get_state, peek_state

if TYPE_CHECKING:
    from celery import Celery

__all__ = ["PURGE_TASK", "SpawnState", "get_state", "install", "peek_state"]

#: The task :func:`install` registers to purge expired trees, for Celery beat (as ``celery.backend_cleanup``).
PURGE_TASK = "celery_spawn.purge_expired"

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
        register_tasks(app)
        state.installed = True
    return state


def register_tasks(app: Celery) -> None:
    """Register ``celery_spawn.purge_expired``: :func:`celery_spawn.purge` with the app's ``spawn_expires``."""

    @app.task(name=PURGE_TASK, shared=False)
    def purge_expired(batch_size: int = DEFAULT_PURGE_BATCH_SIZE,
                      pause_ratio: float = DEFAULT_PURGE_PAUSE_RATIO) -> dict[str, Any]:
        """Delete the finished trees older than ``spawn_expires`` (schedule it with Celery beat)."""
        from .engine.retention import purge

        state = get_state(app)
        return purge(state.store, state.settings.expires, batch_size=batch_size, pause_ratio=pause_ratio)
