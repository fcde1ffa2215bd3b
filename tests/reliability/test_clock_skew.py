"""A worker whose clock runs 10 minutes ahead, beside a worker with a true clock, under a load with dependencies.

The store takes every time it writes or compares from the database server's clock
(celery_spawn.store.clock), so the fast worker sees no live operation as stale: its
recovery sweep republishes nothing, and every plain child runs exactly once. The
fast clock is libfaketime's (Debian's ``faketime``), preloaded into the worker and
its pool processes; the monotonic clock stays true, as Celery's timers need, and sleeps
bypass libfaketime (tests/realsleep.c), whose own fail.

On PostgreSQL (Redis broker) and on MariaDB (RabbitMQ broker). Short variant: 20 x 100;
``--run-slow``: 50 parents x 200 children.
"""
from __future__ import annotations

import collections
import json
import re
import subprocess
import sys
import time
from datetime import datetime, timedelta

import pytest

from celery_spawn.handlers import default_operation_id
from celery_spawn.store import schema as s
from tests.harness import SKEW, fast_clock_env, wait_for
from tests.reliability.helpers import (
    SWEEP_WORK,
    callback_rows,
    children,
    ensure_callback_table,
    log_counts,
    operation,
)

#: Celery's log line prefix: ``[2026-12-05 21:53:19,258: INFO/MainProcess] ...``
#: ``spawn_redeliver_after`` and ``spawn_recovery_grace`` of this test's workers: far below the skew, far above
#: a slow start or a slow release under load (the suite's 5 s grace is met by a release delayed on a busy machine).
REDELIVER_PATIENCE = 120

LOG_TIME = re.compile(r"^\[(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d),\d+: ", re.M)


def clock_lead(log: str) -> timedelta:
    """How far ahead of this process's clock the worker's first log line was written."""
    first = LOG_TIME.search(log)
    assert first, log[:2000]
    return datetime.strptime(first.group(1), "%Y-%m-%d %H:%M:%S") - datetime.now().replace(microsecond=0)


def run_skewed_load(backend, start_worker, parents: int, per_parent: int, timeout: float) -> None:
    app = backend.make_app()
    ensure_callback_table(app)
    # Redelivery and recovery wait 2 minutes here, not the suite's 8 s and 5 s: a loaded machine must not pass
    # for a lost or stranded message, and a worker comparing on its own clock, 10 minutes ahead, would still
    # find every dispatched child stale.
    patient = {"SPAWN_TEST_REDELIVER_AFTER": str(REDELIVER_PATIENCE),
               "SPAWN_TEST_RECOVERY_GRACE": str(REDELIVER_PATIENCE)}
    true_worker = start_worker(backend, "true", env=patient)
    fast_worker = start_worker(backend, "fast", env={**fast_clock_env(), **patient})
    lead = clock_lead(fast_worker.log())
    assert SKEW - timedelta(minutes=1) < lead < SKEW + timedelta(minutes=1), f"the fast clock leads by {lead}"

    config = {"handler": "stripes", "max_spawn_count": per_parent,
              "on_complete": dict(app.signature("tests.record_callback"))}
    sent = [app.signature("tests.numbers", args=(list(range(per_parent)),), kwargs={"_spawn_config": config}).delay()
            for _ in range(parents)]
    operation_ids = {default_operation_id(p.id) for p in sent}
    wait_for(lambda: {r["operation_id"] for r in callback_rows(app)} >= operation_ids, timeout, interval=1,
             what=f"{parents} on_complete callbacks")
    time.sleep(4)  # two more sweeps of each worker: a late republish would show now

    calls = collections.Counter(r["operation_id"] for r in callback_rows(app))
    assert {op: calls[op] for op in operation_ids} == {op: 1 for op in operation_ids}
    child_ids = []
    for parent in sent:
        op = operation(app, parent.id)
        assert op["completed"] and op["state"] == s.OP_SUCCEEDED and op["total"] == per_parent, op
        rows = children(app, parent.id)
        assert {r["state"] for r in rows} == {s.SUCCEEDED} and len(rows) == per_parent
        child_ids.extend(r["id"] for r in rows)
    logs = {"true": true_worker.log(), "fast": fast_worker.log()}
    ran = log_counts(list(logs.values()), "tests.square", child_ids)
    assert set(ran.values()) == {1}, {k: v for k, v in ran.items() if v != 1}
    by_fast = sum(1 for i in child_ids if f"Task tests.square[{i}] succeeded" in logs["fast"])
    assert 0 < by_fast < len(child_ids), f"the fast worker ran {by_fast} of {len(child_ids)} children"
    republished = [line for text in logs.values() for line in text.splitlines()
                   if any(mark in line for mark in SWEEP_WORK)]
    assert republished == [], "\n".join(republished[:20])
    assert "Errno 22" not in logs["fast"], "a sleep failed under the fast clock"


PROBE = """
import json, time
wall, mono = time.time(), time.monotonic()
time.sleep(0.2)
print(json.dumps({"wall": wall, "mono": mono, "slept": time.monotonic() - mono}))
"""


def test_the_fast_clock_leads_by_the_skew_and_sleeps_for_real():
    """The harness's fast clock: wall time ahead, monotonic true, ``time.sleep`` neither failing nor skipped."""
    wall, mono = time.time(), time.monotonic()
    probe = subprocess.run([sys.executable, "-c", PROBE], env={**fast_clock_env(), "PATH": "/usr/bin:/bin"},
                           capture_output=True, text=True, timeout=60)
    assert probe.returncode == 0, probe.stderr
    seen = json.loads(probe.stdout)
    assert abs(seen["wall"] - wall - SKEW.total_seconds()) < 30, seen
    assert abs(seen["mono"] - mono) < 30, seen
    assert 0.2 <= seen["slept"] < 5, seen


def test_a_worker_with_a_fast_clock_republishes_nothing(load_backend, start_worker):
    run_skewed_load(load_backend, start_worker, parents=20, per_parent=100, timeout=300)


@pytest.mark.slow
def test_a_worker_with_a_fast_clock_republishes_nothing_50_x_200(load_backend, start_worker):
    run_skewed_load(load_backend, start_worker, parents=50, per_parent=200, timeout=900)
