"""``OperationResult`` and ``operations_of`` on a real prefork worker, with a Redis result backend and with a
database result backend (SQLAlchemy's ``db+postgresql``): waiting, progress, children, refusals, timeouts.

The children's results of a summary come from one ``get_many`` round trip on Redis, and one
``AsyncResult`` at a time on the database backend (which has no ``get_many``).
"""
from __future__ import annotations

import uuid

import pytest
from celery.exceptions import TimeoutError as CeleryTimeoutError
from celery.result import ResultSet

from celery_spawn import OperationResult, SpawnLimitExceeded, get_state, operations_of
from tests.harness import (
    REDIS_URL,
    Backend,
    Worker,
    check_broker,
    throwaway_database,
    throwaway_store,
    wait_for,
    with_driver,
)
from tests.integration.helpers import TIMEOUT, children_of

pytestmark = pytest.mark.integration

RESULT_BACKENDS = ["redis", "database"]


@pytest.fixture(scope="module", params=RESULT_BACKENDS)
def result_backend(request):
    return request.param


@pytest.fixture(scope="module")
def results_backend(result_backend):
    """Redis broker and PostgreSQL store; the result backend is Redis or a PostgreSQL database of its own."""
    check_broker(REDIS_URL)
    queue = f"spawn-test-{uuid.uuid4().hex[:8]}"
    with throwaway_store("postgresql") as store_url:
        if result_backend == "redis":
            yield Backend("results-redis", f"{REDIS_URL}/0", f"{REDIS_URL}/1", store_url, queue)
            return
        with throwaway_database("postgresql") as url:
            yield Backend("results-database", f"{REDIS_URL}/0", "db+" + with_driver(url, "psycopg2"), store_url, queue)


@pytest.fixture(scope="module")
def results_worker(results_backend, artifacts):
    log = artifacts / f"worker-results-{uuid.uuid4().hex[:6]}.log"
    proc = Worker(results_backend, log).start()
    yield proc
    proc.stop()


@pytest.fixture(scope="module")
def app(results_backend, results_worker):
    made = results_backend.make_app()
    yield made
    get_state(made).store.dispose()


def numbers(app, values, **config):
    parent_id = f"results-{uuid.uuid4().hex[:10]}"
    result = app.signature("tests.numbers", args=(values,),
                           kwargs={"_spawn_config": {"handler": "numbers", **config}}).apply_async(task_id=parent_id)
    return parent_id, result


def test_get_returns_the_summary_with_every_childs_result(app):
    label = f"squares-{uuid.uuid4().hex[:8]}"
    handle = OperationResult(label, app=app)
    assert handle.state == "running" and not handle.ready()  # not spawned yet: like a PENDING task
    parent_id, parent = numbers(app, [1, 2, 3], operation_id=label)
    summary = handle.get(timeout=TIMEOUT)
    assert handle.id == label
    assert summary["operation_id"] == label and summary["parent_id"] == parent_id
    assert summary["state"] == "succeeded" and summary["total"] == 3 and summary["failed"] == []
    children = [row["id"] for row in children_of(app, parent_id)]
    assert summary["results"] == dict(zip(children, [1, 4, 9]))
    assert handle.ready() and handle.successful() and not handle.failed()
    assert handle.state == "succeeded"
    assert parent.get(timeout=TIMEOUT) == [1, 2, 3]


def test_progress_counts_the_children_by_state(app):
    parent_id, _ = numbers(app, [5, 6])
    [handle] = wait_operations(app, parent_id)
    handle.get(timeout=TIMEOUT)
    assert handle.progress() == {"done": 2, "total": 2, "percent": 100.0, "counts": {"succeeded": 2}}


def test_progress_while_children_run(app):
    parent_id = f"sleepy-{uuid.uuid4().hex[:8]}"
    app.signature("tests.spawner", kwargs={"count": 4, "seconds": 1.5, "_spawn_config": {"handler": "sleepers"}}
                  ).apply_async(task_id=parent_id)
    [handle] = wait_operations(app, parent_id)
    early = handle.progress()
    assert early["total"] == 4 and early["done"] < 4 and sum(early["counts"].values()) == 4
    with pytest.raises(CeleryTimeoutError):
        handle.get(timeout=0.2, interval=0.05)
    assert handle.get(timeout=TIMEOUT)["counts"] == {"succeeded": 4}


def test_children_is_a_result_set_of_the_children_in_spawn_order(app):
    parent_id, _ = numbers(app, [2, 3, 4])
    [handle] = wait_operations(app, parent_id)
    handle.get(timeout=TIMEOUT)
    children = handle.children
    assert isinstance(children, ResultSet)
    assert [r.id for r in children.results] == [row["id"] for row in children_of(app, parent_id)]
    assert children.join(timeout=TIMEOUT) == [4, 9, 16]
    assert handle.parent.id == parent_id


def test_the_parents_own_result_lists_its_children(app):
    parent_id, parent = numbers(app, [7, 8])
    parent.get(timeout=TIMEOUT)
    listed = app.AsyncResult(parent_id).children
    assert [child.id for child in listed] == [row["id"] for row in children_of(app, parent_id)]
    [handle] = operations_of(parent)
    assert handle == OperationResult(handle.id, app=app)
    assert operations_of(parent_id, app=app) == [handle]
    assert handle.get(timeout=TIMEOUT)["results"] == {child.id: value for child, value in zip(listed, [49, 64])}


def test_a_refused_spawn_raises_its_error_and_the_parent_result_stands(app):
    parent_id, parent = numbers(app, [1, 2, 3], max_spawn_count=2)
    assert parent.get(timeout=TIMEOUT) == [1, 2, 3]
    [handle] = wait_operations(app, parent_id)
    with pytest.raises(SpawnLimitExceeded, match="2"):
        handle.get(timeout=TIMEOUT)
    summary = handle.get(timeout=TIMEOUT, propagate=False)
    assert summary["state"] == "failed" and summary["total"] == 0
    assert summary["error"].startswith("SpawnLimitExceeded")
    assert handle.failed() and handle.ready() and not handle.successful()


def test_cancel_through_the_handle(app):
    parent_id = f"cancelled-{uuid.uuid4().hex[:8]}"
    app.signature("tests.spawner", kwargs={"count": 6, "seconds": 3, "_spawn_config": {"handler": "sleepers"}}
                  ).apply_async(task_id=parent_id)
    [handle] = wait_operations(app, parent_id)
    outcome = handle.cancel()
    assert outcome["cancelled"] >= 3  # the children held behind the first at least
    summary = handle.get(timeout=TIMEOUT)
    assert summary["counts"].get("cancelled", 0) >= 3


def wait_operations(app, parent_id: str) -> list[OperationResult]:
    return wait_for(lambda: operations_of(parent_id, app=app), TIMEOUT, what=f"{parent_id} to spawn")
