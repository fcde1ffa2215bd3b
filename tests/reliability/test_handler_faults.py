"""A handler that raises or hangs halfway through its generator, in a real worker.

The spawn records the operation, its children and their edges in ONE
transaction, so children already generated when the handler fails are all
absent: the operation is recorded as failed with the error, nothing was
published, the parent's own result stands, and the worker keeps working.
"""
from __future__ import annotations

import pytest
import sqlalchemy as sa

from celery_spawn.handlers import child_id, default_operation_id
from celery_spawn.store import schema as s
from tests.harness import wait_for
from tests.reliability.app import JUNK
from tests.reliability.helpers import (
    TIMEOUT,
    RelBackend,
    RelWorker,
    assert_worker_still_works,
    body_runs,
    children,
    new_queue,
    operation,
    operations_of,
    rows,
)


@pytest.fixture(scope="module")
def faults(postgres_url, shared_redis, tmp_path_factory, artifacts):
    runs = tmp_path_factory.mktemp("runs")
    backend = RelBackend("redis-postgresql", f"{shared_redis}/0", f"{shared_redis}/1", postgres_url, new_queue(),
                         runs_dir=str(runs))
    worker = RelWorker(backend, artifacts / f"rel-handler-faults-{backend.queue}.log").start()
    app = backend.make_app()
    yield backend, app, worker, runs
    worker.stop()


def generated_ids(parent_id: str, count: int) -> list[str]:
    return [child_id(default_operation_id(parent_id), i) for i in range(count)]


def assert_failed_without_children(app, parent_id: str, runs, generated: int, *error_parts: str) -> dict:
    op = wait_for(lambda: operation(app, parent_id), 30, what="the failed operation")
    assert op["state"] == s.OP_FAILED, op
    assert op["total"] == 0
    for part in error_parts:
        assert part in (op["error"] or ""), op["error"]
    assert children(app, parent_id) == []
    ids = generated_ids(parent_id, generated)
    stray = rows(app, sa.select(s.jobs.c.id).where(s.jobs.c.id.in_(ids)))
    assert stray == [], "children generated before the failure were recorded"
    assert not set(ids) & set(body_runs(runs)), "children generated before the failure ran"
    assert len(operations_of(app, parent_id)) == 1
    return op


def test_handler_raising_halfway_records_a_failed_operation_and_no_child(faults):
    backend, app, worker, runs = faults
    parent = app.signature("rel.broken", kwargs={"good": 120, "_spawn_config": {
        "handler": "rel_halfway", "batch_size": 25, "max_spawn_count": 1000}}).delay()
    assert parent.get(timeout=TIMEOUT) == "parent result 120"  # the parent's own result stands
    assert_failed_without_children(app, parent.id, runs, 120, "HandlerError",
                                   "data source went away after 120 children")
    assert f"spawn of rel.broken[{parent.id}] refused" in worker.log()
    assert_worker_still_works(app, worker)


def test_handler_hanging_is_cut_by_the_soft_time_limit(faults):
    backend, app, worker, runs = faults
    parent = app.signature("rel.broken", kwargs={"good": 60, "_spawn_config": {
        "handler": "rel_hang", "batch_size": 10}}).apply_async(soft_time_limit=3)
    wait_for(lambda: f"rel-hanging {parent.id}" in worker.log(), 30, what="the handler to hang")
    assert parent.get(timeout=TIMEOUT) == "parent result 60"
    assert_failed_without_children(app, parent.id, runs, 60, "HandlerError", "SoftTimeLimitExceeded")
    assert_worker_still_works(app, worker)


def test_handler_hanging_past_the_hard_time_limit_leaves_nothing(faults):
    """The pool process is killed mid-transaction: nothing of the operation was committed."""
    backend, app, worker, runs = faults
    parent = app.signature("rel.broken", kwargs={"good": 60, "_spawn_config": {
        "handler": "rel_hang", "batch_size": 10}}).apply_async(time_limit=3)
    wait_for(lambda: f"rel-hanging {parent.id}" in worker.log(), 30, what="the handler to hang")
    with pytest.raises(Exception) as failure:
        parent.get(timeout=TIMEOUT)
    assert "TimeLimitExceeded" in repr(failure.value)
    # No operation was committed (the transaction died with the process), so no child either.
    assert operations_of(app, parent.id) == []
    ids = generated_ids(parent.id, 60)
    assert rows(app, sa.select(s.jobs.c.id).where(s.jobs.c.id.in_(ids))) == []
    assert not set(ids) & set(body_runs(runs))
    assert_worker_still_works(app, worker)


@pytest.mark.parametrize("kind", JUNK)
def test_junk_from_a_handler_is_refused_and_the_worker_carries_on(faults, kind):
    backend, app, worker, runs = faults
    parent = app.signature("rel.broken", kwargs={"good": 2, "kind": kind,
                                                 "_spawn_config": {"handler": "rel_junk"}}).delay()
    assert parent.get(timeout=TIMEOUT) == "parent result 2"
    op = assert_failed_without_children(app, parent.id, runs, 2, "HandlerError")
    assert "rel_junk" in op["error"] or "child #" in op["error"], op["error"]
    assert worker.proc.poll() is None
