"""The store and the broker out at once: a child that waits for the store and cannot send its retry is not lost.

The worker reaches a redis-server of the test's own and PostgreSQL through
two TcpProxies. The store hangs while ``SpawnTask`` children are claiming their
starts; the broker is cut; then every store connection drops, so each blocked
claim fails while no retry can be sent. Celery's ``retry`` rejects such a
message without requeue (dropped, and recorded failed); celery-spawn sends it
back to the broker instead, and every child runs once when both are back.
"""
from __future__ import annotations

import collections
import time

from celery_spawn.store import schema as s
from tests.harness import wait_for
from tests.reliability.helpers import (
    RelBackend,
    body_runs,
    children,
    new_queue,
    operation,
    private_redis,
    state_counts,
    url_port,
    via,
)
from tests.reliability.proxy import TcpProxy

CHILDREN = 300
#: Outages tried at most until one catches a claim under way.
ROUNDS = 8
WAITED = "waits for the spawn store"
SENT_BACK = "goes back to the broker: its retry could not be sent"


def test_a_child_whose_retry_the_broker_cannot_take_runs_once_both_are_back(postgres_url, shared_redis, tmp_path,
                                                                            start_worker):
    runs = tmp_path / "runs"
    runs.mkdir()
    with private_redis(tmp_path) as redis_port:
        broker = f"redis://127.0.0.1:{redis_port}/0"
        broker_proxy, store_proxy = TcpProxy(redis_port), TcpProxy(url_port(postgres_url))
        try:
            backend = RelBackend("redis-postgresql", via(broker, broker_proxy), f"{shared_redis}/1",
                                 via(postgres_url, store_proxy), new_queue(), visibility_timeout=5,
                                 runs_dir=str(runs))
            app = backend.make_app(broker=broker, database_url=postgres_url)  # the test goes around the proxies
            worker = start_worker(backend, "double-outage")
            parent = app.signature("rel.fanout", kwargs={"count": CHILDREN, "child_pause": 0.2}).delay()
            assert parent.get(timeout=60) == CHILDREN
            wait_for(lambda: state_counts(app, parent.id).get(s.SUCCEEDED, 0) >= 5, 60, interval=0.02,
                     what="children to be running")
            for _ in range(ROUNDS):  # a round may find no claim under way when the broker goes: try again
                store_proxy.hang()  # the claims under way block
                time.sleep(2.0)
                broker_proxy.cut()  # no retry can be sent from now on
                time.sleep(1.0)
                store_proxy.cut()  # every connection drops, the hung ones too: the blocked claims fail,
                store_proxy.resume()  # and cannot send their retries
                time.sleep(3.0)
                broker_proxy.resume()
                if WAITED in worker.log() or state_counts(app, parent.id).get(s.SUCCEEDED, 0) >= CHILDREN:
                    break
                time.sleep(1.0)

            def whole():
                found = operation(app, parent.id)
                return found and found["completed"] and found

            try:
                op = wait_for(whole, 120, interval=0.5, what="the operation to complete")
            except AssertionError as exc:  # the states as they are when the wait gives up, not before it began
                unfinished = [(r["id"], r["state"], r["worker"]) for r in children(app, parent.id)
                              if r["state"] != s.SUCCEEDED]
                raise AssertionError(f"{exc}: {state_counts(app, parent.id)}, unfinished {unfinished[:5]}") from None
            log = worker.log()
            assert SENT_BACK in log, worker.diagnosis()
            assert op["state"] == s.OP_SUCCEEDED, state_counts(app, parent.id)
            rows = children(app, parent.id)
            assert len(rows) == CHILDREN and {r["state"] for r in rows} == {s.SUCCEEDED}, state_counts(app, parent.id)
            ran = body_runs(runs)
            times = collections.Counter({r["id"]: len(ran.get(r["id"], [])) for r in rows})
            assert set(times.values()) == {1}, {k: v for k, v in times.items() if v != 1}
        finally:
            store_proxy.resume()
            broker_proxy.resume()
            store_proxy.stop()
            broker_proxy.stop()
