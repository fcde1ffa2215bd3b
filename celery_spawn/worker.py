"""Worker integration: celery-spawn's background work runs in a process of its own.

The recovery sweep and the publishing of due scheduled children wait on the
store and the broker. Run in a thread of the worker's main process, a hung
store would hold whatever that thread holds when the main process forks a
pool process (a SQLite connection's mutex, a connection pool's lock), and the
new pool process would hang on it; run in the event loop, it would stall the
worker. So a prefork worker's main process does none of it: at start it forks
one background process (before the pool, while no thread of ours runs), which
checks the schema, then publishes due children every
``spawn_schedule_interval`` seconds and sweeps every
``spawn_recovery_interval`` seconds. A store that hangs or is down there is
logged and retried, and touches nothing else: tasks that need no store run
normally, and pool processes are replaced as always.

The worker stops it with a byte down a pipe (:class:`StopSignal`), not a
multiprocessing ``Event``: an ``Event``'s ``set`` waits for every process
sleeping on it to acknowledge, and a background process killed while it
slept (``SIGTERM`` to the worker's whole process group, as systemd's default
``KillMode`` sends) never does, which left the worker hanging in its shutdown.
"""
from __future__ import annotations

import logging
import os
import select
import signal
import time
from typing import TYPE_CHECKING, Any

from celery import bootsteps
from celery.exceptions import ImproperlyConfigured

if TYPE_CHECKING:
    from celery import Celery

logger = logging.getLogger("celery_spawn.worker")

#: Seconds between two looks when neither the schedule nor the sweep asks for more often.
IDLE_WAIT = 1.0
#: Seconds the worker waits for its background process to stop before killing it.
STOP_TIMEOUT = 10.0
#: Seconds between the worker's checks that its background process lives (a new one if it died).
WATCH_INTERVAL = 5.0


class StopSignal:
    """A stop the background process waits for: a byte written down a pipe.

    Setting it never waits on the other side, which may be dead (see the
    module's docstring); a stop set before the wait is still seen.
    """

    def __init__(self) -> None:
        self._read, self._write = os.pipe()

    def set(self) -> None:
        try:
            os.write(self._write, b"s")
        except OSError:  # closed already: nothing waits on it any more
            pass

    def wait(self, timeout: float) -> bool:
        """Whether the stop came within ``timeout`` seconds."""
        readable, _, _ = select.select([self._read], [], [], timeout)
        return bool(readable)

    def close(self) -> None:
        for fd in (self._read, self._write):
            try:
                os.close(fd)
            except OSError:
                pass


class RecoveryStep(bootsteps.StartStopStep):
    """Starts (and stops) the worker's celery-spawn background process."""

    requires = ("celery.worker.components:Timer",)

    def __init__(self, worker: Any, **kwargs: Any) -> None:
        super().__init__(worker, **kwargs)
        from .hooks import guard_copies
        from .state import get_state

        # Before any pool process forks (steps are made before any starts): they inherit the driver
        # imported, and every task's guard against running a copy of a child twice.
        state = get_state(worker.app)
        state.store.load_driver()
        state.store.measure_clock()  # ... and the database server's clock (each process measures again)
        guard_copies(worker.app)
        self.process: Any = None
        self._stop: Any = None
        self._watch: Any = None
        self.exporter: Any = None
        if state.settings.metrics_port:
            from .metrics import WorkerExporter

            # Before any process forks: the pool and background processes count in multiprocess mode.
            self.exporter = WorkerExporter(state.settings.metrics_port)
            try:
                self.exporter.prepare(multiprocess=True)
            except ImportError as exc:
                raise ImproperlyConfigured(f"setting spawn_metrics_port (env CELERY_SPAWN_METRICS_PORT) is "
                                           f"{state.settings.metrics_port}, but {exc}") from None

    def start(self, worker: Any) -> None:
        from .state import get_state

        state = get_state(worker.app)
        logger.info("celery-spawn store: %s", state.store.safe_url)
        if self.exporter is not None:
            try:
                self.exporter.start()
            except OSError as exc:  # the port is taken: the worker runs on, without its /metrics
                logger.error("celery-spawn cannot serve /metrics on port %d (spawn_metrics_port, env "
                             "CELERY_SPAWN_METRICS_PORT): %s", self.exporter.port, exc)
        if state.settings.recovery_interval <= 0 and state.settings.schedule_interval <= 0:
            return
        self._spawn(worker.app)
        self._watch = worker.timer.call_repeatedly(WATCH_INTERVAL, self._keep_alive, (worker.app,), priority=10)

    def _spawn(self, app: Celery) -> None:
        from billiard import get_context

        context: Any = get_context("fork")
        self._stop = StopSignal()
        self.process = context.Process(target=run_background, args=(app, self._stop, os.getpid()),
                                       name="celery-spawn", daemon=True)
        self.process.start()

    def _keep_alive(self, app: Celery) -> None:
        if _shutting_down():  # the background process died of the worker's own stop (SIGTERM to its group)
            return
        if self.process is not None and not self.process.is_alive():
            logger.error("the celery-spawn background process exited (%s): starting another",
                         self.process.exitcode)
            self._stop.close()
            self._spawn(app)

    def stop(self, worker: Any) -> None:
        try:
            self._stop_background()
        finally:
            if self.exporter is not None:
                self.exporter.stop()

    def _stop_background(self) -> None:
        if self._watch is not None:
            self._watch.cancel()
            self._watch = None
        if self.process is None:
            return
        self._stop.set()
        self.process.join(STOP_TIMEOUT)
        if self.process.is_alive():  # stuck on a hung store: nothing of its work is lost by a kill
            os.kill(self.process.pid, signal.SIGKILL)
            self.process.join(STOP_TIMEOUT)
        self._stop.close()
        self.process = None


def _shutting_down() -> bool:
    """Whether the worker is stopping: Celery's shutdown handlers set these flags (see ``maybe_shutdown``)."""
    from celery.worker import state

    return any(flag is not None and flag is not False for flag in (state.should_stop, state.should_terminate))


def run_background(app: Celery, stop: StopSignal, parent_pid: int) -> None:
    """The background process: schema check, then due children and sweeps until the worker stops."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the worker's Ctrl-C is the worker's: it stops us
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    from .state import get_state

    state = get_state(app)
    settings = state.settings
    schedule, recovery = settings.schedule_interval, settings.recovery_interval
    wait = min(x for x in (schedule, recovery, IDLE_WAIT) if x > 0)
    ready = False
    next_sweep = time.monotonic() + recovery
    while True:
        if not ready:
            ready = _schema_ready(state)
        if ready and schedule > 0:
            _attempt("publishing of due scheduled children", state.scheduler.publish_due)
        if ready and recovery > 0 and time.monotonic() >= next_sweep:
            _attempt("recovery sweep", state.sweeper.sweep)
            next_sweep = time.monotonic() + recovery
        if stop.wait(wait) or os.getppid() != parent_pid:  # stopped, or the worker died
            return


def _schema_ready(state: Any) -> bool:
    try:
        _ = state.store.engine  # creates or upgrades the schema on first use
    except Exception as exc:
        logger.error("celery-spawn store is not usable (retrying): %s", exc)
        return False
    return True


def _attempt(action: str, work: Any) -> None:
    try:
        work()
    except Exception as exc:
        logger.error("celery-spawn %s failed: %s", action, exc)


def install_worker_hooks(app: Celery) -> None:
    """Add the celery-spawn bootstep to ``app``'s workers (once)."""
    if RecoveryStep not in app.steps["worker"]:
        app.steps["worker"].add(RecoveryStep)
