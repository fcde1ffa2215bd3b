"""A prefork worker's main process never forks a pool process in the middle of a recovery sweep."""
from __future__ import annotations

import os
import threading
import time
import types

import pytest

from celery_spawn import worker


def test_fork_waits_for_a_running_sweep_and_the_child_starts_free():
    sweeping = threading.Event()

    def sweep():  # what RecoveryStep._sweep holds while recover() runs
        with worker._fork_guard:
            sweeping.set()
            time.sleep(0.5)

    thread = threading.Thread(target=sweep)
    thread.start()
    assert sweeping.wait(5)
    started = time.monotonic()
    pid = os.fork()
    if pid == 0:  # the child: the guard (and so whatever a sweep holds) is free here
        acquired = worker._fork_guard.acquire(timeout=2)
        os._exit(0 if acquired else 1)
    waited = time.monotonic() - started
    _, status = os.waitpid(pid, 0)
    thread.join()
    assert waited >= 0.3, "fork did not wait for the sweep to finish"
    assert os.waitstatus_to_exitcode(status) == 0
    assert not worker._fork_guard.locked()


@pytest.mark.parametrize("step_class, part, method", [
    (worker.RecoveryStep, "sweeper", "sweep"), (worker.ScheduleStep, "scheduler", "publish_due")])
def test_periodic_work_runs_under_the_guard(monkeypatch, step_class, part, method):
    seen = []
    engine_part = types.SimpleNamespace(**{method: lambda: seen.append(worker._fork_guard.locked())})
    monkeypatch.setattr("celery_spawn.state.get_state", lambda app: types.SimpleNamespace(**{part: engine_part}))
    step = step_class.__new__(step_class)
    step._running = threading.Lock()
    step._run(object())
    assert seen == [True] and not worker._fork_guard.locked()
