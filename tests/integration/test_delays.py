"""Delayed children are held in the store (``scheduled``), not in a worker's memory: real workers.

With a broker visibility timeout shorter than the delays (Redis), a child
published with a countdown would wait unacknowledged past it and be
delivered again; held in the store, each child is published when due and
runs exactly once, across a worker restart too.
"""
from __future__ import annotations

import collections
import time
import uuid
from datetime import timezone

import pytest
import sqlalchemy as sa

from celery_spawn import cancel, get_state
from celery_spawn.handlers import default_operation_id
from tests.app import runs
from tests.harness import Worker, wait_for
from tests.integration.helpers import TIMEOUT, children_of, ok, wait_children, wait_operation_done

#: Shorter than most of the delays below, so a countdown message would outlive it.
VISIBILITY_TIMEOUT = 4
CHILDREN = 60
DELAY = 0.25  # seconds between children: the last is due 14.75 s after the spawn


@pytest.fixture(scope="module")
def runs_table(client_app):
    with get_state(client_app).store.begin() as conn:
        runs.create(conn, checkfirst=True)


@pytest.fixture(scope="module")
def short_visibility_worker(backend, artifacts, runs_table):
    made = Worker(backend, artifacts / f"worker-delays-{backend.name}-{uuid.uuid4().hex[:6]}.log", concurrency=4,
                  env={"SPAWN_TEST_VISIBILITY_TIMEOUT": str(VISIBILITY_TIMEOUT)})
    yield made.start()
    made.stop()


def runs_of(app, key):
    with get_state(app).store.read() as conn:
        return [dict(r) for r in conn.execute(sa.select(runs).where(runs.c.key == key)).mappings()]


def spawn_recorded_runs(app, key, count, delay):
    config = {"handler": "recorded_runs", "spawn_delay_ms": int(delay * 1000)}
    parent = app.signature("tests.spawner", kwargs={"key": key, "count": count, "_spawn_config": config}).delay()
    parent.get(timeout=TIMEOUT)
    return parent


def test_delayed_plain_children_run_exactly_once_across_a_restart(short_visibility_worker, backend, client_app):
    key = f"delays-{uuid.uuid4().hex[:8]}"
    parent = spawn_recorded_runs(client_app, key, CHILDREN, DELAY)
    rows = wait_children(client_app, parent.id, CHILDREN)
    assert collections.Counter(r["state"] for r in rows)["scheduled"] >= CHILDREN - 10  # held by the store
    assert all(r["not_before"] is not None for r in rows if r["state"] == "scheduled")
    pending = ok(backend, "pending")
    assert "SCHEDULED" in pending and default_operation_id(parent.id) in pending
    assert "scheduled" in ok(backend, "tree", parent.id)

    # A worker restart in the middle: what is still scheduled waits in the store for the next worker.
    wait_for(lambda: len(runs_of(client_app, key)) >= 10, TIMEOUT, what="the first delayed children to run")
    short_visibility_worker.stop(warm=True)  # a child killed mid-run may run again: at least once, not this test's
    assert any(r["state"] == "scheduled" for r in children_of(client_app, parent.id))
    short_visibility_worker.start()

    wait_operation_done(client_app, parent.id, timeout=TIMEOUT)
    final = children_of(client_app, parent.id)
    assert [r["state"] for r in final] == ["succeeded"] * CHILDREN
    # Redis hands a message out again once its visibility timeout passes: give it the time to do so.
    time.sleep(VISIBILITY_TIMEOUT + 3)
    ran = collections.Counter(r["job_id"] for r in runs_of(client_app, key))
    assert set(ran) == {r["id"] for r in final}
    assert [job for job, times in ran.items() if times != 1] == []
    started = {r["job_id"]: r["at"] for r in runs_of(client_app, key)}
    early = [row["id"] for row in final if row["not_before"] is not None
             and started[row["id"]] < row["not_before"].replace(tzinfo=timezone.utc).timestamp() - 0.01]
    assert early == []  # published when due, never before


def test_cancelling_scheduled_children_needs_no_revoke_and_none_of_them_runs(short_visibility_worker,
                                                                             client_app):
    key = f"cancel-{uuid.uuid4().hex[:8]}"
    parent = spawn_recorded_runs(client_app, key, 10, 2.0)
    wait_children(client_app, parent.id, 10)
    wait_for(lambda: len(runs_of(client_app, key)) >= 1, TIMEOUT, what="the first child to run")
    result = cancel(client_app, default_operation_id(parent.id))
    assert result["cancelled"] >= 8
    operation = wait_operation_done(client_app, parent.id)
    assert operation["state"] in ("cancelled", "partially_failed")
    cancelled = [r for r in children_of(client_app, parent.id) if r["state"] == "cancelled"]
    assert len(cancelled) == result["cancelled"]
    time.sleep(5)
    ran = {r["job_id"] for r in runs_of(client_app, key)}
    assert ran.isdisjoint(r["id"] for r in cancelled)
