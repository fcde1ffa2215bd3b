"""Prometheus metrics of celery-spawn, counted where things happen and a no-op without ``prometheus-client``.

The engine calls the small functions below at its few seams (the spawner's
entry point, a batch of finishes, the write-behind's queue, the sweep). Each
asks :func:`active` first: that is None unless ``prometheus_client`` is in
use in this process, so nothing is imported, counted or allocated for an app
that does not export metrics. "In use" means any of:

* the process imported ``prometheus_client`` already (the app exports metrics
  of its own: celery-spawn's join them in its registry);
* ``PROMETHEUS_MULTIPROC_DIR`` is set (the client's multiprocess mode: every
  process writes its values to files there, read by whoever serves them);
* :func:`enable` was called (a worker with ``spawn_metrics_port``, ``serve``).

Counters and histograms live in the client's default registry. Under a
prefork worker the pool processes count in multiprocess mode, and the
worker's main process serves the sum of every process (:func:`serve`).
"""
from __future__ import annotations

import logging
import os
import shutil
import sys
import tempfile
import threading
from typing import Any, Callable, Iterable, Mapping

logger = logging.getLogger("celery_spawn.metrics")

#: Where the client's multiprocess mode keeps its files.
MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"
#: What to install when the client is missing.
INSTALL_HINT = "pip install 'celery-spawn[metrics]'"
#: The job states ``celery_spawn_children{state}`` reports: work not yet finished.
GAUGE_STATES = ("held", "scheduled", "pending", "dispatched", "started")
#: Histogram buckets (seconds): a spawn's record-and-publish, a dependency hop.
SPAWN_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
RELEASE_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 60.0)


class Metrics:
    """The metric objects of one process (built once, on first use)."""

    def __init__(self, prometheus: Any) -> None:
        counter, histogram, gauge = prometheus.Counter, prometheus.Histogram, prometheus.Gauge
        self.spawns = counter("celery_spawn_spawns_total", "Spawns by handler and outcome (recorded, refused, failed)",
                              ["handler", "outcome"])
        self.children_spawned = counter("celery_spawn_children_spawned_total", "Children recorded by spawns",
                                        ["handler"])
        self.children_finished = counter("celery_spawn_children_finished_total",
                                         "Spawned children that reached a final state, by state", ["state"])
        self.spawn_seconds = histogram("celery_spawn_spawn_seconds",
                                       "Seconds a spawn took to record and publish its children", ["handler"],
                                       buckets=SPAWN_BUCKETS)
        self.release_seconds = histogram("celery_spawn_dependency_release_seconds",
                                         "Seconds from a dependency's finish to the publish of the dependent it "
                                         "released", buckets=RELEASE_BUCKETS)
        self.sweep_republished = counter("celery_spawn_sweep_republished_total",
                                         "Children the recovery sweep published again, by reason (stranded: never "
                                         "reached the broker; redelivered: lost by it)", ["reason"])
        self.events_dropped = counter("celery_spawn_tracking_events_dropped_total",
                                      "Tracking events dropped because too many waited for the store")
        self.queue_depth = gauge("celery_spawn_tracking_queue_depth",
                                 "Tracking events waiting in the write-behind queues", multiprocess_mode="livesum")


_lock = threading.Lock()
_metrics: Metrics | None = None
_enabled = False


def active() -> Metrics | None:
    """This process's metrics, or None when ``prometheus_client`` is not in use (see the module's text)."""
    if _metrics is not None:
        return _metrics
    if not (_enabled or "prometheus_client" in sys.modules or os.environ.get(MULTIPROC_ENV)):
        return None
    return _build()


def _build() -> Metrics | None:
    global _metrics
    with _lock:
        if _metrics is None:
            try:
                import prometheus_client
            except ImportError:
                return None
            _metrics = Metrics(prometheus_client)
    return _metrics


def available() -> bool:
    """Whether ``prometheus_client`` can be imported."""
    if "prometheus_client" in sys.modules:  # imported already, or blocked (None: its import raises)
        return sys.modules["prometheus_client"] is not None
    import importlib.util

    return importlib.util.find_spec("prometheus_client") is not None


def enable() -> Metrics:
    """Count from now on in this process; raises ImportError (naming the extra) without the client."""
    global _enabled
    _enabled = True
    metrics = _build()
    if metrics is None:
        raise ImportError(f"Prometheus metrics need prometheus-client: {INSTALL_HINT}")
    return metrics


# ---- what the engine counts -------------------------------------------------------------------
def spawn_finished(handler: str, outcome: str, seconds: float) -> None:
    """One spawn ended: ``recorded``, ``refused`` (bad input, nothing recorded) or ``failed`` (an error raised)."""
    metrics = active()
    if metrics is not None:
        metrics.spawns.labels(handler, outcome).inc()
        metrics.spawn_seconds.labels(handler).observe(seconds)


def children_spawned(handler: str, count: int) -> None:
    metrics = active()
    if metrics is not None and count:
        metrics.children_spawned.labels(handler).inc(count)


def children_finished(states: Iterable[str]) -> None:
    """Children this process moved to a final state (each counted once: only the write that changed it counts)."""
    metrics = active()
    if metrics is None:
        return
    counts: dict[str, int] = {}
    for state in states:
        counts[state] = counts.get(state, 0) + 1
    for state, count in counts.items():
        metrics.children_finished.labels(state).inc(count)


def dependency_released(seconds: float, count: int = 1) -> None:
    """``count`` dependents published ``seconds`` after the finish that released them."""
    metrics = active()
    if metrics is not None:
        for _ in range(count):
            metrics.release_seconds.observe(max(seconds, 0.0))


def sweep_republished(reason: str, count: int) -> None:
    metrics = active()
    if metrics is not None and count:
        metrics.sweep_republished.labels(reason).inc(count)


def tracking_event_dropped() -> None:
    metrics = active()
    if metrics is not None:
        metrics.events_dropped.inc()


def tracking_queue_depth(depth: int) -> None:
    metrics = active()
    if metrics is not None:
        metrics.queue_depth.set(depth)


# ---- the store-backed gauges (read when scraped) --------------------------------------------------
def store_collector(read: Callable[[], Mapping[str, Any]]) -> Any:
    """A collector of ``celery_spawn_children{state}`` and ``celery_spawn_operations_running``.

    ``read`` returns the store's backlog at each scrape: ``children`` (a count
    per unfinished state) and ``operations_running``.
    """
    from prometheus_client.core import GaugeMetricFamily

    class StoreCollector:
        def collect(self) -> Iterable[Any]:
            backlog = read()
            children = GaugeMetricFamily("celery_spawn_children", "Spawned children not yet final, by state "
                                         "(read from the store)", labels=["state"])
            for state in GAUGE_STATES:
                children.add_metric([state], backlog["children"].get(state, 0))
            yield children
            yield GaugeMetricFamily("celery_spawn_operations_running", "Operations whose children are not all "
                                    "final (read from the store)", value=backlog["operations_running"])

        def describe(self) -> Iterable[Any]:
            return []  # read at scrape time only, never at registration

    return StoreCollector()


def render(*collectors: Any) -> tuple[bytes, str]:
    """The text a scrape of ``collectors`` gets, and its content type (ImportError without the client)."""
    try:
        from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
    except ImportError:
        raise ImportError(f"Prometheus metrics need prometheus-client: {INSTALL_HINT}") from None
    registry = CollectorRegistry(auto_describe=False)
    for collector in collectors:
        registry.register(collector)
    return generate_latest(registry), CONTENT_TYPE_LATEST


# ---- a worker's /metrics --------------------------------------------------------------------------
class WorkerExporter:
    """Serves ``/metrics`` from a worker's main process; in a prefork worker, summed over its processes.

    :meth:`prepare` runs before the pool forks: multiprocess mode must be
    chosen before ``prometheus_client`` is first imported. Without
    ``PROMETHEUS_MULTIPROC_DIR`` a prefork worker gets a directory of its own,
    removed when it stops; a directory given in the environment is the
    operator's, used as it is (empty it before the worker starts).
    """

    def __init__(self, port: int, address: str = "0.0.0.0") -> None:
        self.port = port
        self.address = address
        self.own_dir: str | None = None
        self.server: Any = None
        self.thread: Any = None

    def prepare(self, multiprocess: bool) -> None:
        if not available():
            raise ImportError(f"Prometheus metrics need prometheus-client: {INSTALL_HINT}")
        if multiprocess and not os.environ.get(MULTIPROC_ENV):
            client = sys.modules.get("prometheus_client.values")
            if client is not None and not getattr(client.ValueClass, "_multiprocess", False):
                logger.warning("prometheus_client was imported before the worker could turn on its multiprocess "
                               "mode: /metrics shows the main process only. Set %s to an empty directory in the "
                               "worker's environment", MULTIPROC_ENV)
            else:
                self.own_dir = tempfile.mkdtemp(prefix="celery-spawn-metrics-")
                os.environ[MULTIPROC_ENV] = self.own_dir
        enable()

    def start(self) -> None:
        from prometheus_client import REGISTRY, CollectorRegistry, start_http_server

        registry = REGISTRY
        if os.environ.get(MULTIPROC_ENV):
            from prometheus_client import multiprocess

            registry = CollectorRegistry()
            multiprocess.MultiProcessCollector(registry)
        self.server, self.thread = start_http_server(self.port, addr=self.address, registry=registry)
        logger.info("celery-spawn metrics: http://%s:%d/metrics", self.address, self.server.server_port)

    def stop(self) -> None:
        if self.server is not None:
            self.server.shutdown()
            self.server.server_close()
            self.server = None
        if self.own_dir is not None:
            if os.environ.get(MULTIPROC_ENV) == self.own_dir:
                del os.environ[MULTIPROC_ENV]
            shutil.rmtree(self.own_dir, ignore_errors=True)
            self.own_dir = None


def process_exited(pid: int) -> None:
    """Drop the live gauges of a pool process that ended (multiprocess mode only)."""
    if os.environ.get(MULTIPROC_ENV) and "prometheus_client" in sys.modules:
        from prometheus_client import multiprocess

        try:
            multiprocess.mark_process_dead(pid)
        except Exception as exc:  # a missing file is no harm
            logger.debug("could not drop the metrics of process %d: %s", pid, exc)
