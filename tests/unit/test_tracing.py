"""Trace context captured in the parent, stored with each child, and restored at every publish.

The spans here come from a tracer provider of the test's own (never the
global one, which this process must not fix for the other tests), so the
spawn's own ``celery_spawn.spawn`` span is the API's no-op one: it keeps the
parent's context current, as in an app that traces nothing itself.
"""
from __future__ import annotations

import json
import threading

import pytest
from celery import signals as celery_signals

from celery_spawn import SpawnConfig
from celery_spawn.errors import SpawnConfigError
from celery_spawn.engine.publisher import Publisher

sdk_trace = pytest.importorskip("opentelemetry.sdk.trace")


def test_inherit_trace_context_is_on_by_default_and_validated():
    assert SpawnConfig().inherit_trace_context is True
    off = SpawnConfig.new().with_inherit_trace_context(False)
    assert off.inherit_trace_context is False and off.to_dict() == {"inherit_trace_context": False}
    assert SpawnConfig.from_dict({"inherit_trace_context": False}) == off
    assert SpawnConfig().with_inherit_trace_context().inherit_trace_context is True
    with pytest.raises(SpawnConfigError, match="inherit_trace_context must be true or false, not 'no'"):
        SpawnConfig.from_dict({"inherit_trace_context": "no"})


@pytest.fixture
def tracer():
    return sdk_trace.TracerProvider().get_tracer("tests")


def trace_id_of(headers: dict) -> str:
    return headers["traceparent"].split("-")[1]


def fan_out(rig, count=3):
    @rig.handler("fan")
    def fan(context):
        return [rig.sig(i) for i in range(count)]


def test_children_and_the_callback_carry_the_parent_trace(broker_rig, tracer):
    fan_out(broker_rig)
    with tracer.start_as_current_span("parent-run") as span:
        result = broker_rig.spawn({"handler": "fan", "on_complete": dict(broker_rig.app.signature("unit.child"))})
    trace_id = f"{span.get_span_context().trace_id:032x}"
    messages = broker_rig.drain()
    assert len(messages) == 3
    assert {trace_id_of(m.headers) for m in messages} == {trace_id}
    stored = [json.loads(row["message"])["options"]["headers"] for row in broker_rig.children_of(result.id)]
    assert {trace_id_of(headers) for headers in stored} == {trace_id}
    callback = json.loads(broker_rig.operation(result.id)["on_complete"])
    assert trace_id_of(callback["options"]["headers"]) == trace_id


def test_off_children_carry_no_trace(broker_rig, tracer):
    fan_out(broker_rig)
    with tracer.start_as_current_span("parent-run"):
        result = broker_rig.spawn({"handler": "fan", "inherit_trace_context": False})
    assert all("traceparent" not in m.headers for m in broker_rig.drain())
    assert all("traceparent" not in row["message"] for row in broker_rig.children_of(result.id))


def test_no_current_span_stores_nothing(broker_rig):
    fan_out(broker_rig, 1)
    result = broker_rig.spawn({"handler": "fan"})
    assert all("traceparent" not in row["message"] for row in broker_rig.children_of(result.id))
    broker_rig.drain()


def test_a_publish_from_another_thread_runs_under_the_stored_trace(broker_rig, tracer):
    """A release by the write-behind thread: publish instrumentation sees the child's trace as current."""
    from opentelemetry import trace

    fan_out(broker_rig, 2)
    with tracer.start_as_current_span("parent-run") as span:
        result = broker_rig.spawn({"handler": "fan"})
    broker_rig.drain()
    rows = broker_rig.children_of(result.id)
    seen: list[str] = []

    def on_publish(headers=None, **_):  # what opentelemetry-instrumentation-celery reads
        seen.append(f"{trace.get_current_span().get_span_context().trace_id:032x}")

    celery_signals.before_task_publish.connect(on_publish, weak=False)
    try:
        thread = threading.Thread(target=Publisher(broker_rig.app).publish, args=(rows,))
        thread.start()
        thread.join()
    finally:
        celery_signals.before_task_publish.disconnect(on_publish)
    assert seen == [f"{span.get_span_context().trace_id:032x}"] * 2
    assert {trace_id_of(m.headers) for m in broker_rig.drain()} == {seen[0]}


def test_a_recovered_publish_keeps_the_stored_trace(broker_rig, tracer):
    """The rows the sweep and redelivery send (``recovered``) carry the trace beside the recovered mark."""
    from celery_spawn.protocol import HEADER_RECOVERED

    fan_out(broker_rig, 2)
    with tracer.start_as_current_span("parent-run") as span:
        result = broker_rig.spawn({"handler": "fan"})
    broker_rig.drain()
    rows = [{**row, "recovered": True} for row in broker_rig.children_of(result.id)]
    Publisher(broker_rig.app).publish(rows)
    messages = broker_rig.drain()
    assert {trace_id_of(m.headers) for m in messages} == {f"{span.get_span_context().trace_id:032x}"}
    assert all(m.headers.get(HEADER_RECOVERED) for m in messages)
