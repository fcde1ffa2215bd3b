"""Worker integration: schema check at start, and the periodic recovery sweep."""
from __future__ import annotations

import logging
import os
import threading
from typing import TYPE_CHECKING, Any

from celery import bootsteps

if TYPE_CHECKING:
    from celery import Celery

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


class RecoveryStep(bootsteps.StartStopStep):
    """Every ``spawn_recovery_interval`` seconds, publish children stranded before dispatch.

    The timer ticks in the worker's main event loop, so the sweep itself runs
    in a short-lived thread and a slow database never stalls the consumer.
    """

    requires = {"celery.worker.components:Timer"}

    def __init__(self, worker: Any, **kwargs: Any) -> None:
        super().__init__(worker, **kwargs)
        self.tref = None
        self._running = threading.Lock()

    def start(self, worker: Any) -> None:
        from .state import get_state

        state = get_state(worker.app)
        logger.info("celery-spawn store: %s", state.store.safe_url)
        try:
            _ = state.store.engine  # create or upgrade the schema once, before the pool forks
        except Exception as exc:
            logger.error("celery-spawn store is not usable: %s", exc)
        interval = state.settings.recovery_interval
        if interval > 0:
            self.tref = worker.timer.call_repeatedly(interval, self.tick, (worker,), priority=10)

    def stop(self, worker: Any) -> None:
        if self.tref is not None:
            self.tref.cancel()
            self.tref = None

    def tick(self, worker: Any) -> None:
        if self._running.locked():
            return
        threading.Thread(target=self._sweep, args=(worker.app,), name="celery-spawn-recovery",
                         daemon=True).start()

    def _sweep(self, app: Celery) -> None:
        from .state import get_state

        with self._running, _fork_guard:
            try:
                get_state(app).sweeper.sweep()
            except Exception as exc:
                logger.error("celery-spawn recovery sweep failed: %s", exc)


def install_worker_hooks(app: Celery) -> None:
    """Add the recovery bootstep to ``app``'s workers (once)."""
    if RecoveryStep not in app.steps["worker"]:
        app.steps["worker"].add(RecoveryStep)
