"""The lineage store cut in the middle of a spawn and in the middle of child completions.

The worker reaches PostgreSQL or MariaDB through a TcpProxy the test owns
(``CELERY_SPAWN_DATABASE_URL`` points at the proxy port); the test itself
reads the store directly. A cut drops every connection and refuses new ones
for a few seconds. The parent task retries on ``StoreError``
(``autoretry_for``), as the documentation advises.
"""
from __future__ import annotations

import collections
import time

import pytest

from celery_spawn.handlers import default_operation_id
from celery_spawn.store import schema as s
from tests.harness import throwaway_database, wait_for
from tests.reliability.app import HALFWAY
from tests.reliability.helpers import (
    RelBackend,
    RelWorker,
    body_runs,
    callback_rows,
    children,
    ensure_callback_table,
    new_queue,
    operation,
    operations_of,
    state_counts,
    url_port,
    via,
)
from tests.reliability.proxy import TcpProxy

#: Seconds the store stays unreachable.
OUTAGE = 3
KINDS = {"postgresql": "postgresql", "mariadb": "mysql"}


@pytest.fixture(scope="module", params=sorted(KINDS))
def outage_rig(request, shared_redis, tmp_path_factory, artifacts):
    with throwaway_database(KINDS[request.param]) as url:
        proxy = TcpProxy(url_port(url))
        runs = tmp_path_factory.mktemp("runs")
        backend = RelBackend(f"redis-{request.param}", f"{shared_redis}/0", f"{shared_redis}/1", via(url, proxy),
                             new_queue(), runs_dir=str(runs))
        app = backend.make_app(database_url=url)  # the test reads the store directly
        ensure_callback_table(app)
        worker = RelWorker(backend, artifacts / f"rel-store-outage-{request.param}-{backend.queue}.log").start()
        try:
            yield request.param, app, worker, proxy, runs
        finally:
            proxy.resume()
            worker.stop()
            proxy.stop()


def on_complete(app) -> dict:
    return {"on_complete": dict(app.signature("tests.record_callback"))}


def assert_tree_whole(app, parent_id: str, count: int, runs, worker: RelWorker, timeout: float = 90) -> dict:
    """Every child succeeded exactly once, one operation, one callback."""
    try:
        op = wait_for(lambda: (o := operation(app, parent_id)) and o["completed"] and o, timeout, interval=0.5,
                      what=f"the operation to complete ({state_counts(app, parent_id)})")
    except AssertionError as exc:
        raise AssertionError(f"{exc} ({state_counts(app, parent_id)} now)\n{worker.diagnosis()}") from None
    assert op["state"] == s.OP_SUCCEEDED, (op, state_counts(app, parent_id))
    assert op["total"] == count
    assert len(operations_of(app, parent_id)) == 1
    rows_ = children(app, parent_id)
    assert len(rows_) == count and {r["state"] for r in rows_} == {s.SUCCEEDED}
    ran = body_runs(runs)
    times = collections.Counter({r["id"]: len(ran.get(r["id"], [])) for r in rows_})
    assert set(times.values()) == {1}, {k: v for k, v in times.items() if v != 1}
    operation_id = default_operation_id(parent_id)
    wait_for(lambda: callback_rows(app, operation_id), 30, what="the on_complete callback")
    time.sleep(2)  # a second callback would come now
    assert len(callback_rows(app, operation_id)) == 1
    return op


def test_store_cut_mid_spawn_retries_the_parent(outage_rig):
    kind, app, worker, proxy, runs = outage_rig
    config = {"_spawn_config": on_complete(app)}
    parent = app.signature("rel.fanout", kwargs={"count": 400, "pause": 0.004, "marker_at": 150,
                                                 **config}).delay()
    wait_for(lambda: f"{HALFWAY} {parent.id}" in worker.log(), 60, interval=0.01, what="the spawn to be halfway")
    with proxy.outage():
        wait_for(lambda: f"Task rel.fanout[{parent.id}] retry" in worker.log(), 30, what="the parent to retry")
        time.sleep(OUTAGE)
    assert parent.get(timeout=90) == 400
    assert_tree_whole(app, parent.id, 400, runs, worker)
    log = worker.log()
    # A clear error, naming the store without its password; the parent retried on it.
    assert "StoreError('spawn store " in log and "failed: OperationalError" in log
    assert f"Task rel.fanout[{parent.id}] succeeded" in log


def test_store_cut_mid_completions_still_completes_once(outage_rig):
    kind, app, worker, proxy, runs = outage_rig
    config = {"_spawn_config": on_complete(app)}
    parent = app.signature("rel.fanout", kwargs={"count": 200, "child_pause": 0.03, **config}).delay()
    assert parent.get(timeout=60) == 200
    wait_for(lambda: state_counts(app, parent.id).get(s.SUCCEEDED, 0) >= 40, 60, interval=0.05,
             what="children to be finishing")
    with proxy.outage():
        time.sleep(OUTAGE)
    log = worker.log()
    assert "celery-spawn could not record" in log or "StoreError" in log  # the outage is visible in the log
    # SpawnTask children that could not claim their start wait for the store (retry); outcomes whose
    # write was lost are read back from the result backend by the recovery sweep (every 2 s, grace 5 s).
    assert_tree_whole(app, parent.id, 200, runs, worker)


def test_store_cut_mid_completions_of_plain_children(outage_rig):
    """Plain-task children: their start and outcome writes fail during the outage; the sweep reconciles them."""
    kind, app, worker, proxy, runs = outage_rig
    config = {"handler": "numbers", "max_spawn_count": 300, **on_complete(app)}
    parent = app.signature("tests.numbers", args=(list(range(300)),), kwargs={"_spawn_config": config}).delay()
    assert parent.get(timeout=60) == list(range(300))
    wait_for(lambda: state_counts(app, parent.id).get(s.SUCCEEDED, 0) >= 30, 60, interval=0.02,
             what="children to be finishing")
    with proxy.outage():
        time.sleep(OUTAGE)
    op = wait_for(lambda: (o := operation(app, parent.id)) and o["completed"] and o, 60, interval=0.5,
                  what=f"the operation to complete ({state_counts(app, parent.id)})")
    assert op["state"] == s.OP_SUCCEEDED and op["total"] == 300
    rows_ = children(app, parent.id)
    assert len(rows_) == 300 and {r["state"] for r in rows_} == {s.SUCCEEDED}
    assert [app.AsyncResult(r["id"]).get(timeout=30) for r in rows_] == [n * n for n in range(300)]
    # No crash, so no duplicate delivery: every plain child ran exactly once.
    log = worker.log()
    assert {log.count(f"Task tests.square[{r['id']}] succeeded") for r in rows_} == {1}
    operation_id = default_operation_id(parent.id)
    wait_for(lambda: callback_rows(app, operation_id), 30, what="the on_complete callback")
    time.sleep(2)
    assert len(callback_rows(app, operation_id)) == 1
