"""Worker integration: schema check at start, the periodic recovery sweep, and publishing due scheduled children."""
from __future__ import annotations

import logging
import os
import threading
from typing import TYPE_CHECKING, Any

from celery import bootsteps

if TYPE_CHECKING:
    from celery import Celery

    from .state import SpawnState

logger = logging.getLogger("celery_spawn.worker")

#: Held by a recovery sweep while it runs, and by ``os.fork()`` while it forks. A prefork worker's
#: main process forks a new pool process whenever one exits (a terminated task, a lost process,
#: max tasks per child); forked mid-sweep, the child would inherit locks the sweep thread held and
#: hang on them: a SQLite connection's mutex (held through a busy wait of up to 30 s), which the
#: child takes when it drops the inherited connection, the store's or the producers' pool locks.
#: The fork waits for the sweep in progress instead.
_fork_guard = threading.Lock()
if hasattr(os, "register_at_fork"):  # pragma: no branch - POSIX
    os.register_at_fork(before=_fork_guard.acquire, after_in_parent=_fork_guard.release,
                        after_in_child=_fork_guard.release)


class _PeriodicStep(bootsteps.StartStopStep):
    """Runs :meth:`work` every :meth:`interval` seconds (0: never).

    The timer ticks in the worker's main event loop, so the work itself runs
    in a short-lived thread, one at a time, and a slow database never stalls
    the consumer. The thread holds the fork guard while it works.
    """

    requires = ("celery.worker.components:Timer",)
    #: The worker timer's priority of this step's ticks.
    priority = 10
    #: The name of the step's threads, and what its failure log says it was doing.
    thread_name = action = ""

    def __init__(self, worker: Any, **kwargs: Any) -> None:
        super().__init__(worker, **kwargs)
        self.tref = None
        self._running = threading.Lock()

    def interval(self, state: SpawnState) -> float:
        raise NotImplementedError

    def work(self, state: SpawnState) -> None:
        raise NotImplementedError

    def start(self, worker: Any) -> None:
        from .state import get_state

        interval = self.interval(get_state(worker.app))
        if interval > 0:
            self.tref = worker.timer.call_repeatedly(interval, self.tick, (worker,), priority=self.priority)

    def stop(self, worker: Any) -> None:
        if self.tref is not None:
            self.tref.cancel()
            self.tref = None

    def tick(self, worker: Any) -> None:
        if self._running.locked():
            return
        threading.Thread(target=self._run, args=(worker.app,), name=self.thread_name, daemon=True).start()

    def _run(self, app: Celery) -> None:
        from .state import get_state

        with self._running, _fork_guard:
            try:
                self.work(get_state(app))
            except Exception as exc:
                logger.error("celery-spawn %s failed: %s", self.action, exc)


class RecoveryStep(_PeriodicStep):
    """Every ``spawn_recovery_interval`` seconds, publish children stranded before dispatch."""

    thread_name, action = "celery-spawn-recovery", "recovery sweep"

    def __init__(self, worker: Any, **kwargs: Any) -> None:
        super().__init__(worker, **kwargs)
        from .hooks import guard_copies
        from .state import get_state

        # Before any pool process forks (steps are made before any starts): they inherit the driver
        # imported, and every task's guard against running a copy of a child twice.
        get_state(worker.app).store.load_driver()
        guard_copies(worker.app)

    def start(self, worker: Any) -> None:
        from .state import get_state

        state = get_state(worker.app)
        logger.info("celery-spawn store: %s", state.store.safe_url)
        try:
            _ = state.store.engine  # create or upgrade the schema once, before the pool forks
        except Exception as exc:
            logger.error("celery-spawn store is not usable: %s", exc)
        super().start(worker)

    def interval(self, state: SpawnState) -> float:
        return state.settings.recovery_interval

    def work(self, state: SpawnState) -> None:
        state.sweeper.sweep()


class ScheduleStep(_PeriodicStep):
    """Every ``spawn_schedule_interval`` seconds, publish the scheduled children that are due."""

    priority = 5
    thread_name, action = "celery-spawn-schedule", "publishing of due scheduled children"

    def interval(self, state: SpawnState) -> float:
        return state.settings.schedule_interval

    def work(self, state: SpawnState) -> None:
        state.scheduler.publish_due()


def install_worker_hooks(app: Celery) -> None:
    """Add the recovery and schedule bootsteps to ``app``'s workers (once)."""
    for step in (RecoveryStep, ScheduleStep):
        if step not in app.steps["worker"]:
            app.steps["worker"].add(step)
