"""The worker's background process: schema check, due children and sweeps, apart from the pool's forks."""
from __future__ import annotations

import logging
import os
import threading
import types

import pytest

from celery_spawn import worker
from celery_spawn.store import Timeouts


class Calls:
    def __init__(self, fail_schema: int = 0) -> None:
        self.due = self.sweeps = 0
        self.fail_schema = fail_schema

    @property
    def engine(self):
        if self.fail_schema:
            self.fail_schema -= 1
            raise RuntimeError("store unreachable")
        return object()

    def publish_due(self):
        self.due += 1

    def sweep(self):
        self.sweeps += 1


def fake_state(calls, schedule=0.01, recovery=0.05):
    settings = types.SimpleNamespace(schedule_interval=schedule, recovery_interval=recovery)
    return types.SimpleNamespace(settings=settings, store=calls, scheduler=calls, sweeper=calls)


def run_for(monkeypatch, state, seconds, parent=None):
    monkeypatch.setattr("celery_spawn.state.get_state", lambda app: state)
    monkeypatch.setattr(worker.signal, "signal", lambda *args: None)  # keep the test process's handlers
    stop = threading.Event()
    thread = threading.Thread(target=worker.run_background, args=(None, stop, parent or os.getppid()))
    thread.start()
    thread.join(seconds)
    stop.set()
    thread.join(5)
    assert not thread.is_alive()


def test_it_publishes_due_children_more_often_than_it_sweeps(monkeypatch):
    calls = Calls()
    run_for(monkeypatch, fake_state(calls), 0.5)
    assert calls.due > calls.sweeps >= 3


def test_a_store_it_cannot_reach_is_logged_and_retried(monkeypatch, caplog):
    calls = Calls(fail_schema=3)
    with caplog.at_level(logging.ERROR, logger="celery_spawn.worker"):
        run_for(monkeypatch, fake_state(calls), 0.5)
    assert caplog.text.count("store is not usable (retrying): store unreachable") == 3
    assert calls.due > 0  # then it works


def test_it_stops_when_the_worker_is_gone(monkeypatch):
    calls = Calls()
    run_for(monkeypatch, fake_state(calls), 5, parent=-1)  # not our parent: the worker died
    assert calls.due <= 1


def test_a_failing_sweep_does_not_stop_the_loop(monkeypatch, caplog):
    calls = Calls()

    def broken():
        calls.sweeps += 1
        raise RuntimeError("boom")

    calls.sweep = broken
    with caplog.at_level(logging.ERROR, logger="celery_spawn.worker"):
        run_for(monkeypatch, fake_state(calls), 0.4)
    assert calls.sweeps >= 2 and "recovery sweep failed: boom" in caplog.text


@pytest.mark.parametrize("backend, expected", [
    ("postgresql", {"connect_timeout": 10, "options": "-c statement_timeout=60000 -c lock_timeout=30000"}),
    ("mysql", {"connect_timeout": 10, "read_timeout": 60, "write_timeout": 60,
               "init_command": "SET SESSION innodb_lock_wait_timeout = 30"}),
    ("sqlite", {"timeout": 30.0}),
])
def test_timeouts_become_driver_arguments(backend, expected):
    assert Timeouts().connect_args(backend) == expected


def test_zero_means_no_limit():
    assert Timeouts(0, 0, 0).connect_args("postgresql") == {}
    assert Timeouts(0, 0, 0).connect_args("mariadb") == {}
    assert Timeouts(connect=2.5, statement=0.2, lock=0).connect_args("mysql") == {
        "connect_timeout": 3, "read_timeout": 1, "write_timeout": 1}


def test_the_stop_signal_is_seen_whenever_it_was_set_and_setting_it_never_waits():
    from celery_spawn.worker import StopSignal

    stop = StopSignal()
    try:
        assert stop.wait(0.05) is False
        stop.set()  # before the wait, as when the worker stops while the background process sweeps
        assert stop.wait(5) is True
        pid = os.fork()
        if pid == 0:  # a process that would wait on it dies: setting it must not wait for that process
            os._exit(0)
        os.waitpid(pid, 0)
        stop.set()
        assert stop.wait(0) is True
    finally:
        stop.close()
    stop.set()  # closed: nothing to stop, and no error


def test_a_stopping_worker_starts_no_new_background_process(monkeypatch):
    """SIGTERM to the worker's process group kills the background process too: no ERROR, no new one, mid-stop."""
    from celery.worker import state

    from celery_spawn.worker import RecoveryStep

    spawned = []

    class Dead:
        exitcode = -15

        def is_alive(self):
            return False

    from celery_spawn.worker import StopSignal

    step = RecoveryStep.__new__(RecoveryStep)
    step.process, step._stop = Dead(), StopSignal()
    monkeypatch.setattr(step, "_spawn", lambda app: spawned.append(app), raising=False)
    monkeypatch.setattr(state, "should_stop", 0)  # a warm shutdown (its exit code, EX_OK, is 0)
    step._keep_alive("app")
    assert spawned == []
    monkeypatch.setattr(state, "should_stop", None)
    step._keep_alive("app")  # not stopping: a background process that died is replaced
    assert spawned == ["app"]
