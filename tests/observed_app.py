"""The test app with tracing set up in each worker process, for the observability tests.

``celery -A tests.observed_app worker`` is :mod:`tests.app` plus, as the
OpenTelemetry and Sentry docs prescribe for prefork workers, a tracer
provider set up in ``worker_process_init`` (Sentry's SDK in ``celeryd_init``):

* ``SPAWN_TEST_SPANS=<file>``: OpenTelemetry's SDK with
  ``opentelemetry-instrumentation-celery``; every finished span is exported to
  the SDK's in-memory exporter and appended to ``<file>`` as a JSON line (the
  test runs in another process).
* ``SPAWN_TEST_SENTRY=<file>``: Sentry's SDK with its Celery integration and a
  transport that appends every envelope item to ``<file>`` as a JSON line.

Children whose options carry the header ``obs-lose-once`` lose their first
publish (a ``ConnectionError``, as from a broker that went away): only the
recovery sweep's publish (a recovered row) gets through.
"""
from __future__ import annotations

import json
import os
import threading

from celery import signals

from celery_spawn import get_state
from celery_spawn.engine.publisher import Publisher
from tests.app import make_app, settings_from_environment

LOSE_ONCE = "obs-lose-once"

app = make_app(**settings_from_environment())
manager = get_state(app).manager


@manager.handler("observed_fanout")
def observed_fanout(context):
    """``parent.result`` children that return the trace headers they came with."""
    return [context.app.signature("obs.headers", args=(i,)) for i in range(context.parent.result)]


@manager.handler("lose_once")
def lose_once(context):
    """The same children, whose first publish is lost."""
    return [context.app.signature("obs.headers", args=(i,), headers={LOSE_ONCE: 1})
            for i in range(context.parent.result)]


@app.task(shared=False, name="obs.headers", bind=True)
def headers(self, n):
    """A child that returns the trace headers it was published with."""
    return {key: getattr(self.request, key, None) for key in ("traceparent", "sentry-trace", "baggage")}


@app.task(shared=False, name="obs.callback")
def callback(summary):
    """An ``on_complete`` callback."""
    return summary["state"]


def _lose_first_publish() -> None:
    original = Publisher.publish

    def publish(self, children):
        if any(LOSE_ONCE in (child.get("message") or "") and not child.get("recovered") for child in children):
            raise ConnectionError("the broker went away (observability test)")
        return original(self, children)

    Publisher.publish = publish  # type: ignore[method-assign]


_lose_first_publish()
_lock = threading.Lock()


def _append(path: str, record: dict) -> None:
    with _lock, open(path, "a", encoding="utf-8") as out:
        out.write(json.dumps(record, default=str) + "\n")


@signals.worker_process_init.connect(weak=False)
def _set_up_tracing(**_) -> None:
    spans_file = os.environ.get("SPAWN_TEST_SPANS")
    if spans_file:
        _set_up_opentelemetry(spans_file)


@signals.celeryd_init.connect(weak=False)
def _set_up_error_tracking(**_) -> None:
    # Sentry's docs: in the worker's main process, before the pool builds the tasks' tracers it wraps.
    sentry_file = os.environ.get("SPAWN_TEST_SENTRY")
    if sentry_file:
        _set_up_sentry(sentry_file)


def _set_up_opentelemetry(path: str) -> None:
    from opentelemetry import trace
    from opentelemetry.instrumentation.celery import CeleryInstrumentor
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

    class FileExporter(InMemorySpanExporter):
        def export(self, spans):
            for span in spans:
                parent = span.parent
                _append(path, {
                    "name": span.name, "trace_id": f"{span.context.trace_id:032x}",
                    "span_id": f"{span.context.span_id:016x}",
                    "parent_id": f"{parent.span_id:016x}" if parent is not None else None,
                    "kind": span.kind.name, "attributes": dict(span.attributes or {}), "pid": os.getpid(),
                })
            return super().export(spans)

    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(FileExporter()))
    trace.set_tracer_provider(provider)
    CeleryInstrumentor().instrument()


def _set_up_sentry(path: str) -> None:
    import sentry_sdk
    from sentry_sdk.integrations.celery import CeleryIntegration
    from sentry_sdk.transport import Transport

    class RecordingTransport(Transport):
        def capture_envelope(self, envelope):
            for item in envelope.items:
                payload = item.payload.json
                if payload is not None:
                    _append(path, {"type": item.type, "payload": payload, "pid": os.getpid()})

    sentry_sdk.init(dsn="https://public@sentry.invalid/1", transport=RecordingTransport, traces_sample_rate=1.0,
                    integrations=[CeleryIntegration()], default_integrations=False)


# ---- celery-spawn's signals, recorded (SPAWN_TEST_SIGNALS=<file>) with a subscriber that raises ----------
def _record_signals(path: str) -> None:
    from celery_spawn import signals as spawn_signals

    def where() -> dict:
        return {"pid": os.getpid(), "thread": threading.current_thread().name}

    @spawn_signals.spawn_recorded.connect(weak=False)
    def recorded(sender=None, result=None, **_):
        _append(path, {"signal": "spawn_recorded", "task": sender.name, "task_id": sender.request.id,
                       "parent_job_id": result.parent_job_id, "operation_id": result.operation_id,
                       "children": list(result.spawned_job_ids), **where()})

    @spawn_signals.spawn_failed.connect(weak=False)
    def failed(sender=None, operation_id=None, exception=None, **_):
        _append(path, {"signal": "spawn_failed", "task": sender.name, "task_id": sender.request.id,
                       "operation_id": operation_id, "exception": type(exception).__name__, **where()})

    @spawn_signals.operation_completed.connect(weak=False)
    def completed(sender=None, operation_id=None, summary=None, **_):
        _append(path, {"signal": "operation_completed", "sender": sender, "operation_id": operation_id,
                       "summary": summary, **where()})

    def broken(**_):
        raise RuntimeError("a subscriber that raises (observability test)")

    for signal in (spawn_signals.spawn_recorded, spawn_signals.spawn_failed, spawn_signals.operation_completed):
        signal.connect(broken, weak=False)

    @signals.task_prerun.connect(weak=False)
    def ran(task_id=None, task=None, **_):
        _append(path, {"signal": "task_prerun", "task": task.name, "task_id": task_id, **where()})


if os.environ.get("SPAWN_TEST_SIGNALS"):
    _record_signals(os.environ["SPAWN_TEST_SIGNALS"])
