"""Trace context for children: captured in the parent's task, stored with each child, restored at each publish.

A spawn takes the trace context current in its parent's task (with
OpenTelemetry, the span of the parent's run, or the ``celery_spawn.spawn``
span the spawn opens under it) as message headers, through the libraries'
own propagation APIs: ``opentelemetry.propagate.inject`` with the globally
configured propagator (``traceparent``, ``tracestate``, ``baggage``), and
Sentry's ``get_traceparent()``/``get_baggage()`` (``sentry-trace``,
``baggage``). Those headers are stored in each child's message, so every
publish of it carries them: at spawn, after a dependency releases it (from
the write-behind thread), from the recovery sweep and redelivery, and in the
``on_complete`` callback.

Neither library is ever imported here: a library counts as in use only when
the process has imported it already (``opentelemetry.trace``; ``sentry_sdk``
with an active client), so an app without them pays one dictionary lookup.
"""
from __future__ import annotations

import contextlib
import sys
from typing import Any, Iterator, Mapping

#: The headers the propagators write (W3C trace context and baggage, Sentry's trace header).
TRACE_HEADERS = frozenset({"traceparent", "tracestate", "baggage", "sentry-trace"})
#: Sentry's celery integration reads the trace from a nested ``headers`` dict in the worker.
NESTED = "headers"
#: Tells Sentry's wrapper of ``send_task``/``apply_async`` to keep the stored trace headers.
SENTRY_KEEP = "sentry-propagate-traces"
#: The span a spawn opens under the parent's run (OpenTelemetry).
SPAN_NAME = "celery_spawn.spawn"


def _otel_trace() -> Any:
    return sys.modules.get("opentelemetry.trace")


def _sentry() -> Any:
    sentry = sys.modules.get("sentry_sdk")
    if sentry is None:
        return None
    try:
        return sentry if sentry.get_client().is_active() else None
    except Exception:  # an old or partial SDK: nothing to propagate
        return None


def in_use() -> bool:
    """Whether a tracing library is in use in this process."""
    return _otel_trace() is not None or _sentry() is not None


@contextlib.contextmanager
def spawn_span(attributes: Mapping[str, Any]) -> Iterator[Any]:
    """The ``celery_spawn.spawn`` span, current while a spawn records and publishes (OpenTelemetry only)."""
    trace = _otel_trace()
    if trace is None:
        yield None
        return
    tracer = trace.get_tracer("celery_spawn")
    with tracer.start_as_current_span(SPAN_NAME, attributes=dict(attributes)) as span:
        yield span


def capture() -> dict[str, Any]:
    """The current trace context as message headers ({} when there is none)."""
    carrier: dict[str, Any] = {}
    if _otel_trace() is not None:
        from opentelemetry import propagate

        propagate.inject(carrier)
    sentry = _sentry()
    if sentry is not None:
        traceparent = sentry.get_traceparent()
        if traceparent:
            sentry_headers = {"sentry-trace": traceparent}
            baggage = sentry.get_baggage()
            if baggage:
                sentry_headers["baggage"] = ",".join(b for b in (carrier.get("baggage"), baggage) if b)
            carrier.update(sentry_headers)
            carrier[NESTED] = dict(sentry_headers)
    return carrier


def carrier_of(headers: Mapping[str, Any] | None) -> dict[str, Any]:
    """The trace headers among a message's headers."""
    if not headers:
        return {}
    return {key: value for key, value in headers.items() if key in TRACE_HEADERS}


def keep_for_sentry(headers: dict[str, Any]) -> dict[str, Any]:
    """``headers`` for ``send_task``/``apply_async``: with a stored Sentry trace, Sentry's wrapper keeps it
    instead of writing the publishing thread's own trace over it."""
    if "sentry-trace" in headers and _sentry() is not None:
        return {**headers, SENTRY_KEEP: False}
    return headers


@contextlib.contextmanager
def restored(headers: Mapping[str, Any] | None) -> Iterator[None]:
    """Make a stored message's trace context current while it is published (OpenTelemetry).

    Publish instrumentation (``opentelemetry-instrumentation-celery``'s
    publish span) then works under the parent's trace, whatever thread
    publishes; a message stored without trace headers is published under an
    empty context, so that its child starts a trace of its own.
    """
    if _otel_trace() is None:
        yield
        return
    from opentelemetry import context, propagate

    token = context.attach(propagate.extract(carrier_of(headers), context=context.Context()))
    try:
        yield
    finally:
        context.detach(token)
