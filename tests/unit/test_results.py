"""``OperationResult`` in eager mode, and the pieces under it: reading many results in one round trip,
turning a stored refusal back into its exception. The real-worker proof is tests/integration/test_results.py."""
from __future__ import annotations

import pytest
from celery import Celery, states

from celery_spawn import InvalidJobId, OperationResult, SpawnError, SpawnLimitExceeded, SpawnTask, get_state
from celery_spawn import operations_of
from celery_spawn.engine.completion import fetch_results
from celery_spawn.errors import HandlerNotFound
from celery_spawn.results import _refusal


@pytest.fixture
def tasks(spawn_app):
    @spawn_app.task(name="shop.square")
    def square(n):
        return n * n

    @spawn_app.task(name="shop.numbers", base=SpawnTask)
    def numbers(values):
        return values

    @get_state(spawn_app).manager.handler("squares")
    def squares(context):
        return [square.s(n) for n in context.parent.result]

    return numbers


def test_an_eager_spawn_has_a_handle_with_its_summary(spawn_app, tasks):
    spawn_app.conf.task_always_eager = True  # children run inline; their results kept for the summary
    parent = tasks.apply(args=([2, 3],), kwargs={"_spawn_config": {"handler": "squares", "operation_id": "sq"}})
    handle = OperationResult("sq", app=spawn_app)
    summary = handle.get(timeout=5)
    assert summary["state"] == "succeeded" and sorted(summary["results"].values()) == [4, 9]
    assert handle.progress() == {"done": 2, "total": 2, "percent": 100.0, "counts": {"succeeded": 2}}
    assert operations_of(parent.id, app=spawn_app) == [handle]
    assert handle.parent.id == parent.id


def test_a_refused_eager_spawn_raises_from_get_unless_told_not_to(spawn_app, tasks):
    spawn_app.conf.task_always_eager = True
    parent = tasks.apply(args=([1, 2, 3],), kwargs={"_spawn_config": {"handler": "squares", "max_spawn_count": 1}})
    assert parent.get() == [1, 2, 3]
    [handle] = operations_of(parent.id, app=spawn_app)
    with pytest.raises(SpawnLimitExceeded):
        handle.get(timeout=5)
    assert handle.get(timeout=5, propagate=False)["state"] == "failed"


def test_an_unknown_operation_is_running_until_it_exists_and_a_bad_id_is_refused(spawn_app):
    from celery.exceptions import TimeoutError as CeleryTimeoutError

    handle = OperationResult("not-yet", app=spawn_app)
    assert handle.state == "running" and not handle.ready() and handle.id is None
    with pytest.raises(CeleryTimeoutError):
        handle.get(timeout=0.05, interval=0.01)
    with pytest.raises(InvalidJobId):
        OperationResult("tenant/42 report", app=spawn_app)


@pytest.mark.parametrize("stored, expected", [
    ("SpawnLimitExceeded: 3 children, at most 1", SpawnLimitExceeded),
    ("HandlerNotFound: no handler 'x'", HandlerNotFound),
    ("ValueError: not one of ours", SpawnError),
    ("no class at all", SpawnError),
])
def test_a_stored_refusal_comes_back_as_its_spawn_error(stored, expected):
    error = _refusal({"state": "failed", "total": 0, "error": stored})
    assert type(error) is expected
    assert str(error) in stored


def test_a_failed_operation_with_children_is_no_refusal():
    assert _refusal({"state": "failed", "total": 3, "error": None}) is None


def test_results_of_a_key_value_backend_come_in_one_mget():
    app = Celery("results", backend="cache+memory://", set_as_current=False)
    backend = app.backend
    for n in range(5):
        backend.store_result(f"t{n}", n * 10, states.SUCCESS)
    calls = []
    original = backend.mget
    backend.mget = lambda keys: calls.append(len(keys)) or original(keys)
    fetched = fetch_results(app, [f"t{n}" for n in range(5)] + ["missing"])
    assert fetched == {f"t{n}": n * 10 for n in range(5)}
    assert calls == [6]


def test_results_of_another_backend_are_read_one_by_one(tmp_path):
    app = Celery("results", backend=f"db+sqlite:///{tmp_path / 'results.sqlite'}", set_as_current=False)
    app.backend.store_result("a", {"x": 1}, states.SUCCESS)
    app.backend.store_result("b", None, states.STARTED)
    assert fetch_results(app, ["a", "b", "c"]) == {"a": {"x": 1}}
