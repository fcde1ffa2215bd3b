"""Load: many parents spawning at once, across two worker processes (concurrency 2 each).

Long variant (``--run-slow``): 50 parents x 200 children, five rounds. Short variant: 20 x 50.
On PostgreSQL (Redis broker) and on MariaDB (RabbitMQ broker): every child
runs exactly once (Celery's own ``succeeded`` log lines, across both
workers), every ``on_complete`` callback fires exactly once,
``celery_spawn.store.queries.stats`` agrees with what ran, and the recovery
sweep finds nothing to do (no phantom republish, no outcome "missed").
"""
from __future__ import annotations

import collections
import time

import pytest

from celery_spawn import get_state
from celery_spawn.handlers import default_operation_id
from celery_spawn.store import queries
from celery_spawn.store import schema as s
from tests.harness import wait_for
from tests.reliability.helpers import (
    SWEEP_WORK,
    callback_rows,
    children,
    ensure_callback_table,
    log_counts,
    operation,
)




def run_load(backend, start_worker, parents: int, per_parent: int, timeout: float) -> None:
    app = backend.make_app()
    ensure_callback_table(app)
    workers = [start_worker(backend, "a"), start_worker(backend, "b")]
    config = {"handler": "numbers", "max_spawn_count": per_parent,
              "on_complete": dict(app.signature("tests.record_callback"))}
    started = time.monotonic()
    sent = [app.signature("tests.numbers", args=(list(range(per_parent)),), kwargs={"_spawn_config": config}).delay()
            for _ in range(parents)]
    ids = [p.id for p in sent]
    operation_ids = {default_operation_id(i) for i in ids}

    def all_called():
        return {r["operation_id"] for r in callback_rows(app)} >= operation_ids

    wait_for(all_called, timeout, interval=1, what=f"{parents} on_complete callbacks")
    elapsed = time.monotonic() - started
    time.sleep(2)  # a late duplicate would show now

    calls = collections.Counter(r["operation_id"] for r in callback_rows(app))
    assert {op: calls[op] for op in operation_ids} == {op: 1 for op in operation_ids}
    logs = [w.log() for w in workers]
    child_ids = []
    for parent_id in ids:
        op = operation(app, parent_id)
        assert op["completed"] and op["state"] == s.OP_SUCCEEDED and op["total"] == per_parent, op
        rows = children(app, parent_id)
        assert len(rows) == per_parent and {r["state"] for r in rows} == {s.SUCCEEDED}
        child_ids.extend(r["id"] for r in rows)
    ran = log_counts(logs, "tests.square", child_ids)
    assert set(ran.values()) == {1}, {k: v for k, v in ran.items() if v != 1}
    both = [sum(1 for i in child_ids if f"Task tests.square[{i}] succeeded" in text) for text in logs]
    assert all(both), f"one worker ran nothing: {both}"

    with get_state(app).store.read() as conn:
        stats = queries.stats(conn, hours=1, queue=backend.queue, detailed=True)
    total = parents * per_parent
    assert stats["operations"] == parents
    assert stats["operations_by_state"] == {s.OP_SUCCEEDED: parents}
    assert stats["children"] == total
    assert stats["children_by_state"] == {s.SUCCEEDED: total}
    assert stats["success_rate"] == 1.0 and stats["child_success_rate"] == 1.0
    assert stats["max_children_per_spawn"] == per_parent
    assert stats["avg_children_per_spawn"] == per_parent
    assert [(g["handler"], g["operations"], g["children"]) for g in stats["by_handler"]] == [
        ("numbers", parents, total)]
    assert stats["durations"]["child_avg_seconds"] is not None
    assert stats["durations"]["operation_max_seconds"] <= elapsed + 5
    assert [(r["task_name"], r["jobs"], r["succeeded"], r["failed"]) for r in stats["by_task"]] == [
        ("tests.square", total, total, 0)]
    assert sum(ran.values()) == stats["children_by_state"][s.SUCCEEDED]  # the store agrees with Celery
    # A healthy run gives the recovery sweep (every 2 s here, grace 5 s, redelivery after 8 s) nothing to do:
    # no child published again, no outcome filled in, no callback recovered.
    phantom = [line for text in logs for line in text.splitlines() if any(
        mark in line for mark in SWEEP_WORK)]
    assert phantom == [], "\n".join(phantom[:20])
    print(f"{backend.name}: {parents} x {per_parent} in {elapsed:.1f}s")


def test_load_short(load_backend, start_worker):
    run_load(load_backend, start_worker, parents=20, per_parent=50, timeout=180)


@pytest.mark.slow
@pytest.mark.parametrize("round_", range(5))
def test_load_50_parents_200_children(load_backend, start_worker, round_):
    run_load(load_backend, start_worker, parents=50, per_parent=200, timeout=900)
