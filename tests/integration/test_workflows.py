"""Dependencies, status tracking, completion callbacks and cancellation with real workers."""
from __future__ import annotations

import json
import time
import uuid

import pytest
import sqlalchemy as sa

from celery_spawn import cancel, get_state
from celery_spawn.contrib.testing import assert_tree
from celery_spawn.handlers import child_id, default_operation_id
from celery_spawn.store import schema as s
from tests.harness import Worker, wait_for
from tests.integration.helpers import (
    TIMEOUT,
    callback_rows,
    children_of,
    on_complete,
    operation_of,
    run_diamond,
    run_nested,
    store_rows,
    wait_children,
    wait_operation_done,
)

#: The callbacks table exists on the client app's store (the fixture is in tests/integration/conftest.py).
pytestmark = pytest.mark.usefixtures("callback_table")


def test_diamond_runs_d_once_after_b_and_c(worker, client_app):
    rows, _, steps = run_diamond(client_app, {"handler": "diamond"})
    for row in rows:
        assert row["state"] == "succeeded" or store_rows(client_app, s.jobs, id=row["id"])[0]["state"] == "succeeded"
    assert steps["B"]["started"] >= steps["A"]["finished"]
    assert steps["C"]["started"] >= steps["A"]["finished"]
    assert steps["D"]["started"] >= max(steps["B"]["finished"], steps["C"]["finished"])
    d_row = next(r for r in rows if client_app.AsyncResult(r["id"]).result["step"] == "D")
    assert "record_step" in d_row["task_name"]
    assert worker.log().count(f"Task tests.record_step[{d_row['id']}] succeeded") == 1


def test_failed_dependency_cancels_dependents(worker, client_app):
    parent = client_app.signature("tests.spawner", kwargs={"_spawn_config": {"handler": "failing_chain"}}).delay()
    parent.get(timeout=TIMEOUT)
    operation = wait_operation_done(client_app, parent.id)
    rows = children_of(client_app, parent.id)
    by_position = [store_rows(client_app, s.jobs, id=r["id"])[0] for r in rows]
    a, b, c, d = by_position
    assert a["state"] == "failed" and "failed on purpose" in a["error"]
    assert b["state"] == "cancelled" and a["id"] in b["error"]
    assert c["state"] == "cancelled"
    assert d["state"] == "succeeded"
    assert client_app.AsyncResult(d["id"]).get(timeout=TIMEOUT)["step"] == "D"
    assert operation["state"] == "partially_failed"


def test_completion_callback_and_summary(worker, client_app):
    config = on_complete(client_app, handler="numbers")
    parent = client_app.signature("tests.numbers", args=([1, 2, 3],), kwargs={"_spawn_config": config}).delay()
    assert parent.get(timeout=TIMEOUT) == [1, 2, 3]
    operation_id = default_operation_id(parent.id)
    [row] = wait_for(lambda: callback_rows(client_app, operation_id), TIMEOUT, what="callback")
    summary = json.loads(row["summary"])
    assert summary["operation_id"] == operation_id
    assert summary["parent_id"] == parent.id
    assert summary["counts"] == {"succeeded": 3}
    assert summary["failed"] == []
    assert sorted(summary["results"].values()) == [1, 4, 9]
    time.sleep(1)
    assert len(callback_rows(client_app, operation_id)) == 1


def test_callback_exactly_once_across_two_workers(worker, client_app, artifacts):
    """100 operations, two worker processes (concurrency 2 each) finishing children at once."""
    second = Worker(worker.backend, artifacts / f"worker2-{worker.backend.name}-{uuid.uuid4().hex[:6]}.log").start()
    try:
        config = on_complete(client_app, handler="numbers")
        parents = [client_app.signature("tests.numbers", args=(list(range(4)),),
                                        kwargs={"_spawn_config": config}).delay() for _ in range(100)]
        operation_ids = {default_operation_id(p.id) for p in parents}
        wait_for(lambda: {r["operation_id"] for r in callback_rows(client_app)} >= operation_ids, 240,
                 interval=1, what="100 callbacks")
        time.sleep(2)
        rows = [r for r in callback_rows(client_app) if r["operation_id"] in operation_ids]
        assert len(rows) == 100
        assert len({r["operation_id"] for r in rows}) == 100
    finally:
        second.stop()


def test_wait_for_descendants_completes_after_deepest_child(worker, client_app):
    parent_id, row = run_nested(client_app, levels=3, fanout=2)
    operation_id = default_operation_id(parent_id)
    with get_state(client_app).store.read() as conn:
        jobs = [dict(r) for r in conn.execute(sa.select(s.jobs).where(s.jobs.c.root_id == parent_id)).mappings()]

    def node(levels: int) -> dict:  # a tests.nest of ``levels`` spawns two nests of levels - 1, down to squares
        if levels == 0:
            return {"task": "tests.square", "state": "succeeded", "children": []}
        return {"task": "tests.nest", "state": "succeeded", "children": [node(levels - 1)] * 2}

    assert_tree(client_app, parent_id, node(3))
    deepest_finish = max(j["finished_at"] for j in jobs if j["depth"] == 3)
    [operation] = store_rows(client_app, s.operations, id=operation_id)
    assert operation["finished_at"] >= deepest_finish
    assert json.loads(row["summary"])["counts"] == {"succeeded": 2}


def test_a_cancel_without_terminate_records_the_real_outcome_of_running_children(worker, client_app):
    """Revoking does not stop a running child: it keeps running, marked as asked to stop, its real outcome is
    recorded, and the operation (with its on_complete) completes only after it."""
    config = {"handler": "sleepers", **on_complete(client_app)}
    parent = client_app.signature("tests.spawner", kwargs={"count": 4, "seconds": 3, "_spawn_config": config}).delay()
    parent.get(timeout=TIMEOUT)
    wait_children(client_app, parent.id, 4)
    running = wait_for(lambda: [r["id"] for r in children_of(client_app, parent.id) if r["state"] == "started"],
                       TIMEOUT, what="a started child")
    operation_id = default_operation_id(parent.id)
    result = cancel(client_app, operation_id)
    assert result["cancelled"] == 3  # the three held behind the first
    assert result["cancel_requested"] == len(running) and result["still_running"] == len(running)
    rows = {r["id"]: r for r in children_of(client_app, parent.id)}
    for job_id in running:  # still running, and the store says so
        assert rows[job_id]["state"] == "started" and rows[job_id]["error"].startswith("cancel requested")
    assert not operation_of(client_app, parent.id)["completed"]
    [callback] = wait_for(lambda: callback_rows(client_app, operation_id), TIMEOUT, what="the callback")
    rows = {r["id"]: r for r in children_of(client_app, parent.id)}
    for job_id in running:
        assert rows[job_id]["state"] == "succeeded"  # its real outcome, recorded when it came
    # The summary was taken when the operation completed: it counts the running children's successes, so the
    # callback came after them (today's revoke-at-once would count them revoked, and call back at once).
    assert json.loads(callback["summary"])["counts"] == {"succeeded": len(running), "cancelled": 3}
    assert operation_of(client_app, parent.id)["finished_at"] >= max(rows[j]["finished_at"] for j in running)


def test_cancel_stops_a_running_tree(worker, client_app):
    parent = client_app.signature("tests.spawner", kwargs={
        "count": 12, "seconds": 5, "_spawn_config": {"handler": "sleepers"}}).delay()
    parent.get(timeout=TIMEOUT)
    wait_children(client_app, parent.id, 12)
    wait_for(lambda: any(r["state"] == "started" for r in children_of(client_app, parent.id)), TIMEOUT,
             what="a started child")
    result = cancel(client_app, default_operation_id(parent.id), terminate=True)
    assert result["cancelled"] == 3  # the three held children
    assert result["revoked"] >= 1
    operation = wait_operation_done(client_app, parent.id)
    assert operation["state"] in ("cancelled", "partially_failed")
    time.sleep(3)
    rows = children_of(client_app, parent.id)
    assert all(r["state"] in s.FINAL_JOB_STATES for r in rows)
    ran = [r for r in rows if r["state"] == "succeeded"]
    assert len(ran) < 12
    # Terminated pool processes are replaced and the worker goes on running tasks
    # (with the embedded broker it used to stop: a process killed holding the pool's shared pipe lock).
    after = client_app.signature("tests.spawner", kwargs={"_spawn_config": {"handler": "flaky"}}).delay()
    after.get(timeout=TIMEOUT)
    assert wait_operation_done(client_app, after.id)["state"] == "succeeded"


def test_last_two_dependencies_finishing_together_publish_once(worker, client_app, artifacts):
    """Diamonds whose B and C end at the same instant, on two worker processes: each D runs once."""
    second = Worker(worker.backend, artifacts / f"worker3-{worker.backend.name}-{uuid.uuid4().hex[:6]}.log").start()
    try:
        parents = [client_app.signature("tests.spawner", kwargs={"_spawn_config": {"handler": "diamond"}}).delay()
                   for _ in range(30)]
        for parent in parents:
            wait_operation_done(client_app, parent.id, timeout=180)
        logs = worker.log() + second.log()
        for parent in parents:
            d_id = child_id(default_operation_id(parent.id), 3)
            assert logs.count(f"Task tests.record_step[{d_id}] succeeded") == 1
            assert store_rows(client_app, s.jobs, id=d_id)[0]["state"] == "succeeded"
            assert operation_of(client_app, parent.id)["state"] == "succeeded"
    finally:
        second.stop()


def test_a_finished_child_delivered_again_does_not_run_again(worker, client_app):
    parent = client_app.signature("tests.count", args=(2,), kwargs={"_spawn_config": {"handler": "counters"}}).delay()
    assert parent.get(timeout=TIMEOUT) == 2
    wait_operation_done(client_app, parent.id)
    row = children_of(client_app, parent.id)[1]
    assert row["state"] == "succeeded"
    message = json.loads(row["message"])
    client_app.send_task("tests.count", args=message["args"], task_id=row["id"],
                         headers=message["options"]["headers"])
    wait_for(lambda: f"skipping tests.count[{row['id']}]" in worker.log(), TIMEOUT, what="duplicate skipped")
    assert worker.log().count(f"Task tests.count[{row['id']}] succeeded") == 1


def test_retries_are_counted(worker, client_app):
    parent = client_app.signature("tests.spawner", kwargs={"_spawn_config": {"handler": "flaky"}}).delay()
    parent.get(timeout=TIMEOUT)
    operation = wait_operation_done(client_app, parent.id)
    [row] = children_of(client_app, parent.id)
    assert row["state"] == "succeeded"
    assert row["retries"] == 1
    assert row["started_at"] is not None and row["finished_at"] >= row["started_at"]
    assert operation["state"] == "succeeded"
