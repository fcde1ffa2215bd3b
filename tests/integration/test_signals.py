"""celery-spawn's signals in a real prefork worker: once per event, in the process where it happened, with
their documented arguments, and a subscriber that raises breaks nothing.

The worker runs :mod:`tests.observed_app` with ``SPAWN_TEST_SIGNALS``: every
signal (and every task's ``task_prerun``) is written to a file with its
process and thread, and each signal also has a subscriber that raises.
"""
from __future__ import annotations

import collections
import uuid

import pytest

from celery_spawn.handlers import default_operation_id
from tests.harness import COMBINATIONS, Worker, wait_for
from tests.integration.helpers import TIMEOUT, children_of, read_lines

SIGNALLED = [c for c in COMBINATIONS if c == "embedded"]
pytestmark = pytest.mark.parametrize("observed_backend", SIGNALLED, indirect=True, scope="module")


@pytest.fixture(scope="module")
def signals_file(tmp_path_factory):
    return tmp_path_factory.mktemp("signals") / "signals.jsonl"


@pytest.fixture(scope="module")
def signalling_worker(observed_backend, signals_file, artifacts):
    backend = observed_backend
    log = artifacts / f"worker-signals-{backend.name}-{uuid.uuid4().hex[:6]}.log"
    proc = Worker(backend, log, app="tests.observed_app", env={"SPAWN_TEST_SIGNALS": str(signals_file)}).start()
    yield proc
    proc.stop()


def test_signals_fire_once_where_the_event_happened(signalling_worker, obs_client, signals_file):
    parent = obs_client.signature("tests.count", args=(4,), kwargs={"_spawn_config": {"handler": "observed_fanout"}})
    parent = parent.delay()
    refused = obs_client.signature("tests.count", args=(3,), kwargs={
        "_spawn_config": {"handler": "observed_fanout", "max_spawn_count": 2}}).delay()
    assert refused.get(timeout=TIMEOUT) == 3  # the parent's result stands
    assert parent.get(timeout=TIMEOUT) == 4
    operation_id = default_operation_id(parent.id)

    def completed():
        lines = read_lines(signals_file)
        return lines if any(line["signal"] == "operation_completed" for line in lines) else None

    wait_for(completed, TIMEOUT, what="operation_completed")
    wait_for(lambda: len(children_of(obs_client, parent.id)) == 4, TIMEOUT, what="4 children recorded")
    lines = read_lines(signals_file)
    by_signal = collections.defaultdict(list)
    for line in lines:
        by_signal[line["signal"]].append(line)
    ran_in = {line["task_id"]: line["pid"] for line in by_signal["task_prerun"]}
    main_pid = signalling_worker.proc.pid

    (recorded,) = by_signal["spawn_recorded"]
    assert recorded["task"] == "tests.count" and recorded["task_id"] == parent.id
    assert recorded["parent_job_id"] == parent.id and recorded["operation_id"] == operation_id
    assert recorded["children"] == [row["id"] for row in children_of(obs_client, parent.id)]
    assert recorded["pid"] == ran_in[parent.id] != main_pid  # the parent's pool process, in its task thread
    assert recorded["thread"] == "MainThread"

    (failed,) = by_signal["spawn_failed"]
    assert failed["task_id"] == refused.id and failed["exception"] == "SpawnLimitExceeded"
    assert failed["operation_id"] == default_operation_id(refused.id) and failed["pid"] == ran_in[refused.id]

    wait_for(lambda: all(r["state"] == "succeeded" for r in children_of(obs_client, parent.id)), TIMEOUT,
             what="the children to succeed")
    (done,) = [line for line in read_lines(signals_file) if line["signal"] == "operation_completed"]
    assert done["sender"] == done["operation_id"] == operation_id
    summary = done["summary"]
    assert summary["state"] == "succeeded" and summary["total"] == 4 and summary["counts"] == {"succeeded": 4}
    # completed by the write-behind thread of a pool process that ran a child
    assert done["pid"] in {ran_in[row["id"]] for row in children_of(obs_client, parent.id)}
    assert done["thread"] == "celery-spawn-write-behind"
    # the subscribers that raise were logged, and broke nothing
    assert signalling_worker.log().count("a subscriber that raises (observability test)") >= 3
