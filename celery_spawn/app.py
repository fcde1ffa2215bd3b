"""Per-app state and :func:`install`, which adds spawning to an existing Celery app."""
from __future__ import annotations

import logging
import weakref
from typing import TYPE_CHECKING, Any

from celery import signals

from .handlers import SpawnManager
from .settings import SpawnSettings

if TYPE_CHECKING:
    from celery import Celery

    from .spawner import Spawner
    from .store import SpawnStore
    from .tracking import Tracker

logger = logging.getLogger("celery_spawn")

_STATE_ATTR = "_celery_spawn_state"
_ALL_STATES: "weakref.WeakSet[SpawnState]" = weakref.WeakSet()


class SpawnState:
    """Everything celery-spawn keeps for one Celery app: settings, handlers, store."""

    def __init__(self, app: Celery, manager: SpawnManager | None = None, **explicit: Any) -> None:
        self.app = app
        self.manager = manager if manager is not None else SpawnManager()
        self.explicit = explicit
        self.settings = SpawnSettings.load(app.conf, **dict(explicit))
        self._store: SpawnStore | None = None
        self._spawner: Spawner | None = None
        self._tracker: Tracker | None = None
        self.installed = False
        _ALL_STATES.add(self)

    @property
    def store(self) -> SpawnStore:
        if self._store is None:
            from .store import SpawnStore

            self._store = SpawnStore(self.settings.database_url, self.settings.engine_options,
                                     auto_migrate=self.settings.auto_migrate,
                                     synchronous_commit=self.settings.synchronous_commit,
                                     prepared_statements=self.settings.prepared_statements)
        return self._store

    @property
    def spawner(self) -> Spawner:
        if self._spawner is None or self._spawner.store is not self.store:
            from .spawner import Spawner

            self._spawner = Spawner(self)
        return self._spawner

    @property
    def tracker(self) -> Tracker:
        if self._tracker is None or self._tracker.store is not self.store:
            from .tracking import Tracker

            self._tracker = Tracker(self)
        return self._tracker

    def reload(self, **explicit: Any) -> None:
        self.explicit.update({k: v for k, v in explicit.items() if v is not None})
        settings = SpawnSettings.load(self.app.conf, **dict(self.explicit))
        if self._store is not None and settings.database_url != self.settings.database_url:
            self._store.dispose()
            self._store = None
        self.settings = settings


def peek_state(app: Celery) -> SpawnState | None:
    """The app's spawn state if spawning was used or installed, else None (no side effects)."""
    return app.__dict__.get(_STATE_ATTR)


def get_state(app: Celery) -> SpawnState:
    """The app's spawn state, created with defaults on first use."""
    state = app.__dict__.get(_STATE_ATTR)
    if state is None:
        state = SpawnState(app)
        setattr(app, _STATE_ATTR, state)
    return state


def install(app: Celery, manager: SpawnManager | None = None, **settings: Any) -> SpawnState:
    """Add spawning to ``app``: handlers, settings, worker hooks. Safe to call again.

    ``settings`` are the ``spawn_*`` settings without their prefix
    (``database_url=...``); they win over ``app.conf`` and the environment.
    """
    state = app.__dict__.get(_STATE_ATTR)
    if state is None:
        state = SpawnState(app, manager, **settings)
        setattr(app, _STATE_ATTR, state)
    else:
        if manager is not None and manager is not state.manager:
            # Keep handlers registered before install (e.g. on the default manager).
            for name in state.manager.registered_types():
                if not manager.has_handler(name):
                    manager.register_handler(name, state.manager.get_handler(name))
            state.manager = manager
        state.reload(**settings)
    if not state.installed:
        from . import tracking  # noqa: F401  (connects the worker signals that track children)
        from .worker import install_worker_hooks

        install_worker_hooks(app)
        state.installed = True
    return state


@signals.worker_process_init.connect(weak=False)
def _reset_engines_after_fork(**_: Any) -> None:
    """A forked pool child must not reuse the connections of its parent."""
    for state in list(_ALL_STATES):
        if state._store is not None:
            state._store.after_fork()
