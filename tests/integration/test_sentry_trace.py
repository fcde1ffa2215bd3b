"""Children in their parent's Sentry trace, with a real prefork worker and a recording transport.

The worker runs :mod:`tests.observed_app` with Sentry's SDK and its Celery
integration set up in each pool process; its transport writes every envelope
item to a file. Each child returns the ``sentry-trace`` header it was
published with, and its transaction must be in the parent's trace.
"""
from __future__ import annotations

import uuid

import pytest

from tests.harness import COMBINATIONS, Worker, wait_for
from tests.integration.helpers import TIMEOUT, children_of, read_lines

pytest.importorskip("sentry_sdk.integrations.celery")

TRACED = [c for c in COMBINATIONS if c == "embedded"]
pytestmark = pytest.mark.parametrize("observed_backend", TRACED, indirect=True, scope="module")


@pytest.fixture(scope="module")
def envelopes(tmp_path_factory):
    return tmp_path_factory.mktemp("sentry") / "envelopes.jsonl"


@pytest.fixture(scope="module")
def sentry_worker(observed_backend, envelopes, artifacts):
    backend = observed_backend
    log = artifacts / f"worker-sentry-{backend.name}-{uuid.uuid4().hex[:6]}.log"
    proc = Worker(backend, log, app="tests.observed_app", env={"SPAWN_TEST_SENTRY": str(envelopes)}).start()
    yield proc
    proc.stop()


def transactions(path, name: str) -> list[dict]:
    return [item["payload"] for item in read_lines(path)
            if item["type"] == "transaction" and item["payload"].get("transaction") == name]


@pytest.mark.parametrize("handler", ["observed_fanout", "lose_once"])
def test_children_carry_the_parent_sentry_trace(sentry_worker, obs_client, envelopes, handler):
    parent = obs_client.signature("tests.count", args=(3,), kwargs={"_spawn_config": {"handler": handler}}).delay()
    rows = wait_for(lambda: (rows := children_of(obs_client, parent.id)) and len(rows) == 3
                    and all(r["state"] == "succeeded" for r in rows) and rows, TIMEOUT, what="3 children")

    def parent_transaction():
        found = [t for t in transactions(envelopes, "tests.count")
                 if t["contexts"]["trace"].get("data", {}).get("celery.task_id", parent.id) == parent.id]
        return found[-1] if found else None

    wait_for(parent_transaction, TIMEOUT, what="the parent's transaction")
    trace_ids = {t["contexts"]["trace"]["trace_id"] for t in transactions(envelopes, "tests.count")}
    received = [obs_client.AsyncResult(row["id"]).get(timeout=TIMEOUT) for row in rows]
    child_traces = {headers["sentry-trace"].split("-")[0] for headers in received}
    assert len(child_traces) == 1 and child_traces <= trace_ids, (received, trace_ids)
    (trace_id,) = child_traces
    wait_for(lambda: len([t for t in transactions(envelopes, "obs.headers")
                          if t["contexts"]["trace"]["trace_id"] == trace_id]) == 3,
             TIMEOUT, what="the children's transactions in the parent's trace")


def test_off_children_carry_no_sentry_trace(sentry_worker, obs_client):
    parent = obs_client.signature("tests.count", args=(2,), kwargs={
        "_spawn_config": {"handler": "observed_fanout", "inherit_trace_context": False}}).delay()
    rows = wait_for(lambda: (rows := children_of(obs_client, parent.id)) and len(rows) == 2
                    and all(r["state"] == "succeeded" for r in rows) and rows, TIMEOUT, what="2 children")
    received = [obs_client.AsyncResult(row["id"]).get(timeout=TIMEOUT) for row in rows]
    assert [headers["sentry-trace"] for headers in received] == [None, None]
