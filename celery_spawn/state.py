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
    from .engine.schedule import Scheduler
    from .engine.spawner import Spawner
    from .engine.tracker import Tracker
    from .store import SpawnStore

T = TypeVar("T")

_STATE_ATTR = "_celery_spawn_state"
_ALL_STATES: "weakref.WeakSet[SpawnState]" = weakref.WeakSet()


class _Part:
    """A part of the engine on :class:`SpawnState`, built by the builder of the same name below."""

    def __set_name__(self, owner: type, name: str) -> None:
        self.name = name

    def __get__(self, state: SpawnState | None, owner: type) -> Any:
        if state is None:
            return self
        return state.part(self.name, _BUILDERS[self.name])


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
            from .store import SpawnStore, Timeouts

            settings = self.settings
            self._store = SpawnStore(settings.database_url, settings.engine_options,
                                     auto_migrate=settings.auto_migrate,
                                     synchronous_commit=settings.synchronous_commit,
                                     prepared_statements=settings.prepared_statements,
                                     timeouts=Timeouts(settings.connect_timeout, settings.statement_timeout,
                                                       settings.lock_timeout))
        return self._store

    def part(self, name: str, build: Callable[[SpawnState], T]) -> T:
        """The part ``name``, built once over the current store (and again after :meth:`reload`)."""
        parts = self._parts
        if self._parts_store is self._store and self._store is not None and name in parts:
            return parts[name]  # the fast path: worker events ask for the tracker on every task
        store = self.store
        if self._parts_store is not store:
            self._parts = parts = {}
            self._parts_store = store
        part = parts[name] = build(self)
        return part

    # ---- the engine's parts, each built with what it uses (see the builders below) --------
    publisher: Publisher = _Part()  # type: ignore[assignment]
    completion: Completion = _Part()  # type: ignore[assignment]
    canceller: Canceller = _Part()  # type: ignore[assignment]
    outbox: Outbox = _Part()  # type: ignore[assignment]
    spawner: Spawner = _Part()  # type: ignore[assignment]
    tracker: Tracker = _Part()  # type: ignore[assignment]
    sweeper: Sweeper = _Part()  # type: ignore[assignment]
    scheduler: Scheduler = _Part()  # type: ignore[assignment]

    def reload(self, **explicit: Any) -> None:
        """Read the settings again (with these explicit ones on top) and rebuild the parts."""
        self.explicit.update({k: v for k, v in explicit.items() if v is not None})
        settings = SpawnSettings.load(self.app.conf, **dict(self.explicit))
        if self._store is not None and settings.database_url != self.settings.database_url:
            self._store.dispose()
            self._store = None
        self.settings = settings
        self._parts = {}


# ---- builders: each part with what it uses (imported here, not at start: the CLI stays light) -----
def _publisher(state: SpawnState) -> Publisher:
    from .engine.publisher import Publisher

    return Publisher(state.app)


def _completion(state: SpawnState) -> Completion:
    from .engine.completion import Completion

    return Completion(state.store, state.publisher, state.app)


def _canceller(state: SpawnState) -> Canceller:
    from .engine.cancel import Canceller

    def revoke(ids: list[str], **options: Any) -> Any:  # looked up at each call: tests and apps may swap it
        return state.app.control.revoke(ids, **options)

    return Canceller(state.store, state.completion, revoke)


def _outbox(state: SpawnState) -> Outbox:
    from .engine.outbox import Outbox

    return Outbox(state.store, state.publisher)


def _spawner(state: SpawnState) -> Spawner:
    from .engine.spawner import Spawner

    return Spawner(state.app, state.settings, state.manager, state.store, state.outbox, state.completion)


def _tracker(state: SpawnState) -> Tracker:
    from .engine.tracker import Tracker

    return Tracker(state.app, state.settings, state.store, state.publisher, state.completion, state.canceller)


def _sweeper(state: SpawnState) -> Sweeper:
    from .engine.recovery import Sweeper
    from .engine.redelivery import Redeliverer

    redeliverer = Redeliverer(state.app, state.store, state.publisher, state.settings.redeliver_after,
                              state.tracker, state.settings.redeliver_limit)
    return Sweeper(state.app, state.store, state.outbox, state.tracker, state.completion, redeliverer,
                   state.settings.recovery_grace)


def _scheduler(state: SpawnState) -> Scheduler:
    from .engine.schedule import Scheduler

    return Scheduler(state.store, state.publisher)


_BUILDERS: dict[str, Callable[[SpawnState], Any]] = {
    "publisher": _publisher, "completion": _completion, "canceller": _canceller, "outbox": _outbox,
    "spawner": _spawner, "tracker": _tracker, "sweeper": _sweeper, "scheduler": _scheduler,
}


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
