"""Children in their parent's trace, with a real prefork worker: OpenTelemetry and Sentry.

The worker runs :mod:`tests.observed_app`: a tracer provider (and
``opentelemetry-instrumentation-celery``) or Sentry's SDK set up in each pool
process, every span or envelope written to a file the test reads. The parent
is sent from the test process without any trace, so its run span in the
worker starts the trace; every child's run span must be in it, whichever
process and thread published the child: the parent's task (fan-out), the
write-behind thread (a chain released step by step), or the recovery sweep
in the worker's background process (a child whose first publish was lost).
"""
from __future__ import annotations

import uuid

import pytest

from celery_spawn import completion_task_id
from celery_spawn.handlers import default_operation_id
from tests.harness import COMBINATIONS, Worker, wait_for
from tests.integration.helpers import TIMEOUT, children_of, read_lines, wait_children

pytest.importorskip("opentelemetry.sdk.trace")
pytest.importorskip("opentelemetry.instrumentation.celery")

#: SQLite with the file broker (the release after the commit) and PostgreSQL with Redis (the release read
#: and published ahead of the write).
TRACED = [c for c in COMBINATIONS if c in ("embedded", "redis-postgresql")]
pytestmark = pytest.mark.parametrize("observed_backend", TRACED, indirect=True, scope="module")


@pytest.fixture(scope="module")
def spans_file(tmp_path_factory):
    return tmp_path_factory.mktemp("spans") / "spans.jsonl"


@pytest.fixture(scope="module")
def traced_worker(observed_backend, spans_file, artifacts):
    backend = observed_backend
    log = artifacts / f"worker-traced-{backend.name}-{uuid.uuid4().hex[:6]}.log"
    proc = Worker(backend, log, app="tests.observed_app", env={"SPAWN_TEST_SPANS": str(spans_file)}).start()
    yield proc
    proc.stop()


def run_span(spans: list[dict], task_id: str) -> dict | None:
    """The span of a task's run (the instrumentation's consumer span, which names the task id)."""
    for span in spans:
        if span["name"].startswith("run/") and task_id in span["attributes"].values():
            return span
    return None


def all_succeeded(app, parent_id: str, count: int) -> list[dict] | None:
    rows = children_of(app, parent_id)
    return rows if len(rows) == count and all(r["state"] == "succeeded" for r in rows) else None


def assert_in_parent_trace(spans_file, parent_id: str, child_ids: list[str]) -> None:
    def ended():
        spans = read_lines(spans_file)
        found = [run_span(spans, job_id) for job_id in [parent_id, *child_ids]]
        return (spans, found) if all(found) else None

    spans, found = wait_for(ended, TIMEOUT, what="the run spans of the parent and its children")
    parent_span, children = found[0], found[1:]
    trace_id = parent_span["trace_id"]
    in_trace = {span["span_id"] for span in spans if span["trace_id"] == trace_id}
    for child in children:
        assert child["trace_id"] == trace_id, (child, parent_span)
        assert child["parent_id"] in in_trace, child
    names = {span["name"] for span in spans if span["trace_id"] == trace_id}
    assert "celery_spawn.spawn" in names


def test_fan_out_children_and_callback_join_the_parent_trace(traced_worker, obs_client, spans_file):
    on_complete = dict(obs_client.signature("obs.callback"))
    parent = obs_client.signature("tests.count", args=(5,), kwargs={
        "_spawn_config": {"handler": "observed_fanout", "on_complete": on_complete}}).delay()
    rows = wait_for(lambda: all_succeeded(obs_client, parent.id, 5), TIMEOUT, what="5 children to succeed")
    callback_id = completion_task_id(default_operation_id(parent.id))
    assert_in_parent_trace(spans_file, parent.id, [r["id"] for r in rows] + [callback_id])
    # the parent's run span is the spawn span's parent: the children hang under the spawn
    spans = read_lines(spans_file)
    spawn = [s for s in spans if s["name"] == "celery_spawn.spawn"
             and s["trace_id"] == run_span(spans, parent.id)["trace_id"]]
    assert len(spawn) == 1 and spawn[0]["parent_id"] == run_span(spans, parent.id)["span_id"]


def test_chain_released_by_the_write_behind_stays_in_the_trace(traced_worker, obs_client, spans_file):
    parent = obs_client.signature("tests.run_workflow", kwargs={"workflow_type": "etl_pipeline"}).delay()
    rows = wait_for(lambda: all_succeeded(obs_client, parent.id, 3), TIMEOUT, what="the three steps to succeed")
    assert_in_parent_trace(spans_file, parent.id, [r["id"] for r in rows])


def test_child_republished_by_the_sweep_stays_in_the_trace(traced_worker, obs_client, spans_file):
    parent = obs_client.signature("tests.count", args=(3,), kwargs={"_spawn_config": {"handler": "lose_once"}}).delay()
    wait_children(obs_client, parent.id, 3)
    rows = wait_for(lambda: all_succeeded(obs_client, parent.id, 3), TIMEOUT, what="the sweep to publish them")
    assert "recovery published 3 stranded children" in traced_worker.log()
    assert_in_parent_trace(spans_file, parent.id, [r["id"] for r in rows])


def test_without_inherit_trace_context_children_start_their_own_traces(traced_worker, obs_client, spans_file):
    parent = obs_client.signature("tests.count", args=(2,), kwargs={
        "_spawn_config": {"handler": "observed_fanout", "inherit_trace_context": False}}).delay()
    rows = wait_for(lambda: all_succeeded(obs_client, parent.id, 2), TIMEOUT, what="2 children to succeed")

    def ended():
        spans = read_lines(spans_file)
        found = [run_span(spans, job_id) for job_id in [parent.id, *(r["id"] for r in rows)]]
        return found if all(found) else None

    parent_span, *children = wait_for(ended, TIMEOUT, what="the run spans")
    assert {child["trace_id"] for child in children}.isdisjoint({parent_span["trace_id"]})
