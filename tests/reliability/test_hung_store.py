"""A store that accepts connections and never answers (a TCP proxy that swallows every byte).

Whatever celery-spawn does with such a store, the worker goes on: tasks that
need no store run, a pool process that dies is replaced, and a worker started
against the hung store becomes ready and says, in its log, that the store is
not usable (and keeps trying). PostgreSQL and MariaDB, a Redis broker.
"""
from __future__ import annotations

import os
import signal
import uuid

import pytest

from tests.harness import throwaway_database, wait_for
from tests.reliability.helpers import RelBackend, RelWorker, new_queue, operation, url_port, via
from tests.reliability.proxy import TcpProxy

KINDS = {"postgresql": "postgresql", "mariadb": "mysql"}
#: Seconds a task that needs no store may take through all of this (it takes milliseconds).
QUICK = 30


@pytest.fixture(params=sorted(KINDS))
def hung_rig(request, shared_redis, artifacts):
    with throwaway_database(KINDS[request.param]) as url, TcpProxy(url_port(url)) as proxy:
        backend = RelBackend(f"redis-{request.param}", f"{shared_redis}/0", f"{shared_redis}/1", via(url, proxy),
                             new_queue())
        workers = []

        def start(name):
            log = artifacts / f"rel-hung-store-{request.param}-{name}-{uuid.uuid4().hex[:6]}.log"
            workers.append(RelWorker(backend, log).start())
            return workers[-1]

        try:
            yield backend, backend.make_app(database_url=url), proxy, start  # the test reads the store directly
        finally:
            proxy.resume()
            for worker in workers:
                worker.stop()


def pids(app, count=6):
    return {app.signature("rel.pid").delay().get(timeout=QUICK) for _ in range(count)}


def children_of(pid: int) -> set[int]:
    """The processes ``pid`` forked (its pool processes and celery-spawn's background process)."""
    found: set[int] = set()
    for task in os.listdir(f"/proc/{pid}/task"):
        with open(f"/proc/{pid}/task/{task}/children") as listing:
            found.update(int(child) for child in listing.read().split())
    return found


def test_plain_tasks_run_and_pool_processes_are_replaced_while_the_store_hangs(hung_rig):
    backend, app, proxy, start = hung_rig
    worker = start("running")
    wait_for(lambda: "celery-spawn store" in worker.log(), 30, what="the worker's start")
    # A spawn before the hang: the store works, so the background process has a connection to lose.
    parent = app.signature("rel.fanout", kwargs={"count": 3}).delay()
    assert parent.get(timeout=QUICK) == 3
    wait_for(lambda: (op := operation(app, parent.id)) and op["completed"], QUICK, what="the spawn to complete")
    proxy.hang()
    before = children_of(worker.proc.pid)
    victim = sorted(pids(app))[0]
    assert victim in before
    assert app.signature("tests.square", args=(7,)).delay().get(timeout=QUICK) == 49
    os.kill(victim, signal.SIGKILL)  # the main process forks a new pool process, store or no store
    after = wait_for(lambda: (found := children_of(worker.proc.pid)) and victim not in found
                     and len(found) == len(before) and found, 60, interval=0.5,
                     what="as many processes as before, the killed one replaced")
    assert len(after - before) == 1 and f"pid:{victim} exited with 'signal 9" in worker.log()
    assert victim not in pids(app, 10)
    assert app.signature("tests.square", args=(8,)).delay().get(timeout=QUICK) == 64


def test_a_worker_started_against_a_hung_store_becomes_ready_and_says_so(hung_rig):
    backend, app, proxy, start = hung_rig
    proxy.hang()
    worker = start("starting")  # returns once the worker logged " ready."
    assert app.signature("tests.square", args=(9,)).delay().get(timeout=QUICK) == 81
    wait_for(lambda: "celery-spawn store is not usable (retrying)" in worker.log(), 60,
             what="the log line about the hung store")
    assert "password" not in worker.log().lower() or "***" in worker.log()
