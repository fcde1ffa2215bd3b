"""Core guarantees with a real worker: redelivery, recovery of unpublished children, pacing, inheritance."""
from __future__ import annotations

from datetime import timezone

import pytest

from celery_spawn.engine.publisher import Publisher
from celery_spawn.handlers import default_operation_id
from celery_spawn.store import schema as s
from tests.harness import wait_for
from tests.integration.helpers import TIMEOUT, children_of, results_of, store_rows, wait_children


def succeeded_count(worker, task_name, task_id):
    return worker.log().count(f"Task {task_name}[{task_id}] succeeded")


def test_redelivered_parent_duplicates_nothing(worker, client_app):
    """The same parent message delivered twice (as after a crash) spawns and dispatches once."""
    parent_id = f"redelivered-{worker.backend.name}-{id(client_app)}"
    sig = client_app.signature("tests.numbers", args=([2, 3, 4],), kwargs={"_spawn_config": {"handler": "numbers"}})
    sig.apply_async(task_id=parent_id)
    wait_for(lambda: succeeded_count(worker, "tests.numbers", parent_id) == 1, TIMEOUT, what="first delivery")
    rows = wait_children(client_app, parent_id, 3)
    assert results_of(client_app, rows) == [4, 9, 16]
    sig.apply_async(task_id=parent_id)
    wait_for(lambda: succeeded_count(worker, "tests.numbers", parent_id) == 2, TIMEOUT, what="second delivery")
    wait_for(lambda: all(r["state"] == "succeeded" for r in children_of(client_app, parent_id)), TIMEOUT,
             what="children succeeded")
    assert [r["id"] for r in children_of(client_app, parent_id)] == [r["id"] for r in rows]
    for row in rows:
        assert succeeded_count(worker, "tests.square", row["id"]) == 1
    assert len(store_rows(client_app, s.operations, parent_id=parent_id)) == 1


def test_recovery_sweep_publishes_children_stranded_before_dispatch(worker, client_app, monkeypatch):
    """A spawn whose publishing failed (broker down) is finished by the workers' recovery sweep."""
    def broker_down(app, children):
        raise ConnectionError("broker unreachable")

    monkeypatch.setattr(Publisher, "publish", broker_down)
    parent = client_app.tasks["tests.numbers"].apply(args=([5, 6],), kwargs={"_spawn_config": {"handler": "numbers"}})
    assert parent.get() == [5, 6]
    monkeypatch.undo()
    rows = children_of(client_app, parent.id)
    assert [r["state"] for r in rows] == ["pending", "pending"]
    # spawn_recovery_grace is 5 s and the sweep runs every 2 s in the test worker
    wait_for(lambda: all(r["state"] == "succeeded" for r in children_of(client_app, parent.id)), TIMEOUT,
             what="recovered children to run")
    assert results_of(client_app, rows) == [25, 36]
    assert "recovery published 2 stranded children" in worker.log()


def test_spawn_delay_paces_dispatch(worker, client_app):
    parent = client_app.signature("tests.count", args=(4,), kwargs={
        "_spawn_config": {"handler": "stamps", "spawn_delay_ms": 1000}}).delay()
    assert parent.get(timeout=TIMEOUT) == 4
    rows = wait_children(client_app, parent.id, 4)
    started = [r["started"] for r in results_of(client_app, rows)]
    recorded = rows[0]["created_at"].replace(tzinfo=timezone.utc).timestamp()
    # child i may not start before i * delay after the spawn (a polling transport may start it later)
    for index, at in enumerate(started):
        assert at >= recorded + index * 1.0 - 0.05, (index, at - recorded)


def test_priority_is_inherited_when_the_broker_has_one(worker, client_app):
    if worker.backend.broker.startswith("filesystem"):
        pytest.skip("the filesystem transport has no priorities")
    parent = client_app.signature("tests.numbers", args=([1, 2],), kwargs={
        "_spawn_config": {"handler": "numbers", "inherit_priority": True}}).apply_async(priority=3)
    parent.get(timeout=TIMEOUT)
    rows = wait_children(client_app, parent.id, 2)
    assert {r["priority"] for r in rows} == {3}
    [operation] = store_rows(client_app, s.operations, id=default_operation_id(parent.id))
    assert operation["queue"] == worker.backend.queue


def test_a_spawn_refused_for_its_config_is_counted_under_the_handler_it_asked_for(worker, client_app):
    """A bad value refuses the spawn on a real worker; the parent's result stands, and stats name its handler."""
    from celery_spawn import get_state
    from celery_spawn.store import queries

    parent = client_app.signature("tests.spawner", kwargs={
        "_spawn_config": {"handler": "sleepers", "max_spawn_count": "lots"}}).delay()
    assert parent.get(timeout=TIMEOUT) == "spawned"
    [operation] = wait_for(lambda: store_rows(client_app, s.operations, id=default_operation_id(parent.id)),
                           TIMEOUT, what="the refused operation")
    assert operation["state"] == "failed" and operation["error"].startswith("SpawnConfigError")
    assert operation["handler"] == "sleepers"
    with get_state(client_app).store.read() as conn:
        handlers = {group["handler"] for group in queries.stats(conn, hours=1)["by_handler"]}
    assert "sleepers" in handlers and None not in handlers
