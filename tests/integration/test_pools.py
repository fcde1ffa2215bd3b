"""Spawning, dependencies and completion on the worker pools other than prefork.

Tracking is written behind by a thread in each process that runs tasks; with
``-P solo`` and ``-P threads`` that is the worker's main process, where the
task threads and the writer share one interpreter.
"""
from __future__ import annotations

import json
import uuid

import pytest

from celery_spawn.store import schema as s
from tests.harness import Worker, wait_for
from tests.integration.helpers import TIMEOUT, callback_rows, on_complete, run_diamond, run_nested, store_rows

#: The callbacks table exists on the client app's store (the fixture is in tests/integration/conftest.py).
pytestmark = pytest.mark.usefixtures("callback_table")

POOLS = [("solo", 1), ("threads", 4), ("gevent", 20), ("eventlet", 20)]


@pytest.fixture(scope="module", params=POOLS, ids=[p for p, _ in POOLS])
def pool_worker(request, backend, artifacts):
    pool, concurrency = request.param
    log = artifacts / f"worker-{pool}-{backend.name}-{uuid.uuid4().hex[:6]}.log"
    proc = Worker(backend, log, concurrency=concurrency, pool=pool).start()
    yield proc
    proc.stop()


def test_a_diamond_and_its_callback(pool_worker, client_app):
    """D runs once after B and C; the operation completes and its callback fires once."""
    _, operation, steps = run_diamond(client_app, on_complete(client_app, handler="diamond"))
    assert steps["D"]["started"] >= max(steps["B"]["finished"], steps["C"]["finished"])
    [callback] = wait_for(lambda: callback_rows(client_app, operation["id"]), TIMEOUT, what="callback")
    assert json.loads(callback["summary"])["counts"] == {"succeeded": 4}


def test_a_nested_tree_completes_after_its_deepest_child(pool_worker, client_app):
    parent_id, callback = run_nested(client_app, levels=2, fanout=3)
    assert json.loads(callback["summary"])["counts"] == {"succeeded": 3}
    jobs = store_rows(client_app, s.jobs, root_id=parent_id)
    assert len(jobs) == 1 + 3 + 9 and {j["state"] for j in jobs} == {"succeeded"}
    assert "Traceback" not in pool_worker.log()
