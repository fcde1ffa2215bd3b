"""The Celery app the benchmarks run (in-process and in ``celery -A benchmarks.app worker``).

Configured from the environment the runner sets: broker, store and the
Redis key the no-op tasks count themselves on. ``SPAWN_BENCH_TRACING=1``
traces every process that imports it (the runner and the workers, whose pool
processes inherit it): OpenTelemetry's SDK with a batch processor to an
exporter that drops the spans, and its Celery instrumentation, so that a run
shows what tracing costs, spawns and baselines alike.
"""
from __future__ import annotations

import os

import redis
from celery import Celery

from celery_spawn import SpawnManager, SpawnTask, depends_on, install

COUNTER_URL = os.environ.get("SPAWN_BENCH_COUNTER_URL", "redis://127.0.0.1:6379/9")


def trace_everything() -> None:
    """OpenTelemetry's SDK and Celery instrumentation in this process (and the processes it forks)."""
    from opentelemetry import trace
    from opentelemetry.instrumentation.celery import CeleryInstrumentor
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor, SpanExporter, SpanExportResult

    class Dropped(SpanExporter):
        def export(self, spans):
            return SpanExportResult.SUCCESS

    provider = TracerProvider()
    provider.add_span_processor(BatchSpanProcessor(Dropped()))
    trace.set_tracer_provider(provider)
    CeleryInstrumentor().instrument()


if os.environ.get("SPAWN_BENCH_TRACING"):
    trace_everything()


def make_app(broker: str, database_url: str, queue: str, child_queue: str | None = None,
             fast: bool = False) -> Celery:
    app = Celery("spawn_bench", broker=broker, set_as_current=False)
    app.conf.update(
        task_default_queue=queue,
        worker_prefetch_multiplier=16,
        broker_connection_retry_on_startup=True,
        spawn_database_url=database_url,
        spawn_recovery_interval=0,
    )
    if fast:  # the documented speed settings (see README)
        app.conf.update(spawn_synchronous_commit=False, spawn_track_started=False)
    counter = redis.Redis.from_url(COUNTER_URL)
    manager = SpawnManager()
    dead_queue = child_queue

    @manager.handler("fanout")
    def fanout(context):
        """``n`` no-op children, each counting itself under ``key``."""
        key, n = context.parent.kwargs["key"], context.parent.kwargs["n"]
        sig = noop.s(key)
        for _ in range(n):
            yield sig.clone()

    @manager.handler("stream")
    def stream(context):
        """``n`` children to a queue nobody consumes: measures the spawning worker alone."""
        n = context.parent.kwargs["n"]
        for _ in range(n):
            yield noop.signature(("unused",), queue=dead_queue or "spawn-bench-dead")

    @manager.handler("sequence")
    def sequence(context):
        """``n`` steps, each depending on the one before."""
        key, n = context.parent.kwargs["key"], context.parent.kwargs["n"]
        previous = None
        for _ in range(n):
            sig = noop.s(key)
            context.freeze(sig)
            if previous is not None:
                depends_on(sig, previous)
            previous = sig.id
            yield sig

    install(app, manager)

    @app.task(name="bench.noop", shared=False)
    def noop(key):
        counter.incr(key)

    @app.task(name="bench.parent", base=SpawnTask, shared=False)
    def parent(key, n):
        return n

    return app


app = make_app(
    broker=os.environ.get("SPAWN_BENCH_BROKER", "redis://127.0.0.1:6379/9"),
    database_url=os.environ.get("CELERY_SPAWN_DATABASE_URL", "sqlite:///spawn_bench.sqlite3"),
    queue=os.environ.get("SPAWN_BENCH_QUEUE", "spawn-bench"),
    child_queue=os.environ.get("SPAWN_BENCH_DEAD_QUEUE"),
    fast=bool(os.environ.get("SPAWN_BENCH_FAST")),
)
