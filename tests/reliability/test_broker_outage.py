"""The broker cut in the middle of a spawn: the spawn finishes once it is back, nothing lost, nothing doubled.

The worker reaches the broker through a TcpProxy the test owns: a
``redis-server`` the test started on a free port, or the shared RabbitMQ. The
test publishes the parent directly, waits for the handler to be halfway
through its 300 children, cuts every broker connection for a few seconds,
then lets the recovery sweep (and Celery's redelivery) finish the job. The
children are SpawnTasks, so a copy published twice is skipped by its claim.
"""
from __future__ import annotations

import collections
import time

import pytest

from celery_spawn.handlers import default_operation_id
from celery_spawn.store import schema as s
from tests.harness import wait_for
from tests.reliability.app import HALFWAY
from tests.reliability.helpers import (
    RelBackend,
    body_runs,
    callback_rows,
    children,
    delete_amqp_queue,
    ensure_callback_table,
    log_counts,
    new_queue,
    operation,
    operations_of,
    private_redis,
    state_counts,
    url_port,
    via,
)
from tests.reliability.proxy import TcpProxy

CHILDREN = 300
OUTAGE = 4


@pytest.fixture(params=["redis", "rabbitmq"])
def broker_rig(request, postgres_url, shared_redis, tmp_path, start_worker):
    runs = tmp_path / "runs"
    runs.mkdir()
    queue = new_queue()
    with contextlib_for(request.param, tmp_path) as direct:
        proxy = TcpProxy(url_port(direct) if request.param == "redis" else 5672)
        backend = RelBackend(f"{request.param}-postgresql", via(direct, proxy), f"{shared_redis}/1", postgres_url,
                             queue, visibility_timeout=5, runs_dir=str(runs))
        app = backend.make_app(broker=direct)  # the test publishes straight to the broker
        ensure_callback_table(app)
        worker = start_worker(backend, request.param)
        try:
            yield request.param, app, worker, proxy, runs, lambda **kw: start_worker(backend, "restarted", **kw)
        finally:
            proxy.resume()
            proxy.stop()
            if request.param == "rabbitmq":
                delete_amqp_queue(direct, queue)


def contextlib_for(kind: str, tmp_path):
    import contextlib

    if kind == "redis":
        @contextlib.contextmanager
        def redis_url():
            with private_redis(tmp_path) as port:
                yield f"redis://127.0.0.1:{port}/0"
        return redis_url()
    from tests.harness import AMQP_URL, check_broker

    check_broker(AMQP_URL)
    return contextlib.nullcontext(AMQP_URL)


def test_broker_cut_mid_spawn(broker_rig):
    kind, app, worker, proxy, runs, restart = broker_rig
    config = {"on_complete": dict(app.signature("tests.record_callback"))}
    parent = app.signature("rel.fanout", kwargs={"count": CHILDREN, "pause": 0.004, "marker_at": CHILDREN // 3,
                                                 "_spawn_config": config}).delay()
    wait_for(lambda: f"{HALFWAY} {parent.id}" in worker.log(), 60, interval=0.01, what="the spawn to be halfway")
    with proxy.outage():
        time.sleep(OUTAGE)
    workers = [worker]

    def finished():
        if workers[-1].proc.poll() is not None:
            # kombu 5.7's Redis transport can die on a lost connection while it holds unacked messages
            # ("Unrecoverable error: AttributeError ... 'hostname'" in Channel.close -> restore_unacked);
            # a supervisor would restart it, and so do we: celery-spawn's guarantees are under test here.
            print(f"the {kind} worker exited after the broker outage (exit {workers[-1].proc.returncode}); "
                  "restarting it")
            workers.append(restart())
        found = operation(app, parent.id)
        return found if found and found["completed"] else None

    op = wait_for(finished, 120, interval=0.5,
                  what=f"the spawn to finish after the outage ({state_counts(app, parent.id)})")
    assert op["state"] == s.OP_SUCCEEDED and op["total"] == CHILDREN
    assert len(operations_of(app, parent.id)) == 1
    rows_ = children(app, parent.id)
    assert len(rows_) == CHILDREN and {r["state"] for r in rows_} == {s.SUCCEEDED}
    ran = body_runs(runs)
    times = collections.Counter({r["id"]: len(ran.get(r["id"], [])) for r in rows_})
    assert set(times.values()) == {1}, {k: v for k, v in times.items() if v != 1}
    twice = {k: v for k, v in log_counts([w.log() for w in workers], "rel.unit", list(times)).items() if v > 1}
    assert not twice
    operation_id = default_operation_id(parent.id)
    wait_for(lambda: callback_rows(app, operation_id), 60, what="the on_complete callback")
    time.sleep(2)
    assert len(callback_rows(app, operation_id)) == 1
    assert proxy.cuts == 1 and proxy.accepted > 1  # the worker did reconnect through the proxy


@pytest.mark.parametrize("broker_rig", ["rabbitmq"], indirect=True)
def test_an_on_complete_sent_into_a_hung_rabbitmq_arrives_once(broker_rig):
    """The fault explorer's lost callbacks on RabbitMQ (seeds 1621, 1625, ...): without publisher confirms, an
    ``on_complete`` published into a connection that had stopped answering was recorded as sent, and lost with
    the connection. With confirms its publish fails, and the recovery sweep sends it once the broker is back."""
    kind, app, worker, proxy, runs, restart = broker_rig
    worker.stop()
    restart(concurrency=1)  # one pool process: the one that published the child completes its operation
    config = {"on_complete": dict(app.signature("tests.record_callback"))}
    parent = app.signature("rel.fanout", kwargs={"count": 1, "child_pause": 3, "_spawn_config": config}).delay()
    wait_for(lambda: body_runs(runs), 60, interval=0.05, what="the child to start")
    proxy.hang()  # the child ends, and its operation completes, while the broker answers nothing
    wait_for(lambda: (operation(app, parent.id) or {}).get("completed"), 60, what="the operation to complete")
    time.sleep(3)  # its callback goes out into the hung connection
    # The hang ends as a dead peer's does: the connections are reset. The outage lasts a moment, as a real one
    # does: a worker back within milliseconds can find RabbitMQ still holding its old connection's exclusive
    # pidbox queue, and Celery's consumer stops on that (ResourceLocked, "Unrecoverable error").
    with proxy.outage():
        time.sleep(2)
    operation_id = default_operation_id(parent.id)
    wait_for(lambda: callback_rows(app, operation_id), 120, what="the on_complete callback after the hang")
    time.sleep(3)  # a second copy would show now
    assert len(callback_rows(app, operation_id)) == 1
    assert [r["state"] for r in children(app, parent.id)] == [s.SUCCEEDED]
