"""Per-app wiring: the settings, the handlers, the store, and the engine objects built over them.

:class:`SpawnState` builds each part once, lazily (the CLI must not pay for
SQLAlchemy), and hands it what it uses through its constructor. Changing the
settings (``install()`` again) rebuilds the parts; changing the database URL
replaces the store too.
"""
from __future__ import annotations

import weakref
from typing import TYPE_CHECKING, Any, Callable, TypeVar

from celery import signals

from .handlers import SpawnManager
from .settings import SpawnSettings

if TYPE_CHECKING:
    from celery import Celery

    from .engine.cancel import Canceller
    from .engine.completion import Completion
    from .engine.outbox import Outbox
    from .engine.publisher import Publisher
    from .engine.recovery import Sweeper
    from .engine.spawner import Spawner
    from .engine.tracker import Tracker
    from .store import SpawnStore

T = TypeVar("T")

_STATE_ATTR = "_celery_spawn_state"
_ALL_STATES: "weakref.WeakSet[SpawnState]" = weakref.WeakSet()


class SpawnState:
    """Everything celery-spawn keeps for one Celery app."""

    def __init__(self, app: Celery, manager: SpawnManager | None = None, **explicit: Any) -> None:
        self.app = app
        self.manager = manager if manager is not None else SpawnManager()
        self.explicit = explicit
        self.settings = SpawnSettings.load(app.conf, **dict(explicit))
        self._store: SpawnStore | None = None
        self._parts: dict[str, Any] = {}
        self._parts_store: SpawnStore | None = None
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

    def _built(self, name: str) -> Any:
        """A part already built over the current store, or None (the fast path: events ask per task)."""
        return self._parts.get(name) if self._parts_store is self._store and self._store is not None else None

    def _part(self, name: str, build: Callable[[], T]) -> T:
        store = self.store
        if self._parts_store is not store:
            self._parts = {}
            self._parts_store = store
        part = self._parts.get(name)
        if part is None:
            part = self._parts[name] = build()
        return part

    # ---- the engine's parts, each built with what it uses --------------------------------
    @property
    def publisher(self) -> Publisher:
        built = self._built("publisher")
        if built is not None:
            return built
        from .engine.publisher import Publisher

        return self._part("publisher", lambda: Publisher(self.app))

    @property
    def completion(self) -> Completion:
        built = self._built("completion")
        if built is not None:
            return built
        from .engine.completion import Completion

        return self._part("completion", lambda: Completion(self.store, self.publisher, self.app))

    @property
    def canceller(self) -> Canceller:
        built = self._built("canceller")
        if built is not None:
            return built
        from .engine.cancel import Canceller

        def revoke(ids: list[str], **options: Any) -> Any:  # looked up at each call: tests and apps may swap it
            return self.app.control.revoke(ids, **options)

        return self._part("canceller", lambda: Canceller(self.store, self.completion, revoke))

    @property
    def outbox(self) -> Outbox:
        built = self._built("outbox")
        if built is not None:
            return built
        from .engine.outbox import Outbox

        return self._part("outbox", lambda: Outbox(self.store, self.publisher))

    @property
    def spawner(self) -> Spawner:
        built = self._built("spawner")
        if built is not None:
            return built
        from .engine.spawner import Spawner

        return self._part("spawner", lambda: Spawner(self.app, self.settings, self.manager, self.store,
                                                     self.outbox, self.completion))

    @property
    def tracker(self) -> Tracker:
        built = self._built("tracker")
        if built is not None:
            return built
        from .engine.tracker import Tracker

        return self._part("tracker", lambda: Tracker(self.app, self.settings, self.store, self.publisher,
                                                     self.completion, self.canceller))

    @property
    def sweeper(self) -> Sweeper:
        built = self._built("sweeper")
        if built is not None:
            return built
        from .engine.recovery import Sweeper
        from .engine.redelivery import Redeliverer

        def build() -> Sweeper:
            redeliverer = Redeliverer(self.app, self.store, self.publisher, self.settings.redeliver_after)
            return Sweeper(self.app, self.store, self.outbox, self.tracker, self.completion, redeliverer,
                           self.settings.recovery_grace)

        return self._part("sweeper", build)

    def reload(self, **explicit: Any) -> None:
        """Read the settings again (with these explicit ones on top) and rebuild the parts."""
        self.explicit.update({k: v for k, v in explicit.items() if v is not None})
        settings = SpawnSettings.load(self.app.conf, **dict(self.explicit))
        if self._store is not None and settings.database_url != self.settings.database_url:
            self._store.dispose()
            self._store = None
        self.settings = settings
        self._parts = {}


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


def attach_state(app: Celery, manager: SpawnManager | None, **settings: Any) -> SpawnState:
    """Create the app's state with these settings, or update the existing one (``install()``)."""
    state = app.__dict__.get(_STATE_ATTR)
    if state is None:
        state = SpawnState(app, manager, **settings)
        setattr(app, _STATE_ATTR, state)
        return state
    if manager is not None and manager is not state.manager:
        # Keep handlers registered before install (e.g. on the default manager).
        for name in state.manager.registered_types():
            if not manager.has_handler(name):
                manager.register_handler(name, state.manager.get_handler(name))
        state.manager = manager
    state.reload(**settings)
    return state


@signals.worker_process_init.connect(weak=False)
def _reset_engines_after_fork(**_: Any) -> None:
    """A forked pool child must not reuse the connections of its parent."""
    for state in list(_ALL_STATES):
        if state._store is not None:
            state._store.after_fork()
