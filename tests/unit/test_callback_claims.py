"""An ``on_complete`` runs once however often its message comes, and one the broker lost is sent again.

Each delivery goes through the task's tracer (``apply`` with the callback's header), on real stores and
kombu's in-memory broker; the worker-level proof is in ``tests/reliability/test_callbacks.py``.
"""
from __future__ import annotations

import logging
import os
import socket
import subprocess
import sys
import uuid
from datetime import timedelta

import pytest
from celery import Celery
from celery.app.task import Context

from celery_spawn import SpawnManager, SpawnTask, control, get_state, install
from celery_spawn.engine import copies
from celery_spawn.engine.completion import completion_task_id
from celery_spawn.hooks import _on_retry, guard_copies
from celery_spawn.protocol import HEADER_CALLBACK, HEADER_DEFERRALS
from celery_spawn.store import schema as s
from celery_spawn.store import utcnow
from tests.store.helpers import op_row, operation, seed

#: The worker name ``apply`` gives a task's request: this process runs "on" it.
HERE = socket.gethostname()


@pytest.fixture(params=[False, True], ids=["plain", "spawntask"])
def rig(request, store_url):
    app = Celery("callbacks", broker="memory://", set_as_current=False)
    queue = f"callbacks-{uuid.uuid4().hex[:8]}"  # the memory transport is the process's: a queue of our own
    app.conf.update(task_default_queue=queue, broker_connection_retry_on_startup=True)
    install(app, SpawnManager(), database_url=store_url)
    calls: list[dict] = []

    @app.task(name="cb.done", shared=False, base=SpawnTask if request.param else app.Task)
    def done(summary):
        calls.append(summary)
        return "done"

    guard_copies(app)  # as a worker does before its pool starts
    yield app, done, calls
    get_state(app).store.dispose()


def published(app, op_id=None) -> str:
    """A complete operation whose ``on_complete`` (``cb.done``) was published."""
    op_id = op_id or f"op-{uuid.uuid4().hex[:8]}"
    store = get_state(app).store
    seed(store, [op_row(op_id, state=s.OP_SUCCEEDED, callback_state=s.CALLBACK_PENDING,
                        on_complete='{"task": "cb.done"}')])
    store.callback_published(op_id)
    return op_id


def deliver(task, op_id, headers=None):
    """One delivery of ``op_id``'s callback through the task's tracer (signals included); its state."""
    result = task.apply(args=({"operation_id": op_id},), task_id=completion_task_id(op_id),
                        headers={HEADER_CALLBACK: op_id, **(headers or {})})
    return result.state


def waiting(app) -> list:
    """The messages in the app's queue of the in-memory broker (drains it)."""
    found = []
    with app.connection_for_read() as conn:
        channel = conn.default_channel
        while (message := channel.basic_get(app.conf.task_default_queue, no_ack=True)) is not None:
            found.append(message)
    return found


def claim(app, op_id, worker):
    with get_state(app).store.begin() as conn:
        conn.execute(s.operations.update().where(s.operations.c.id == op_id)
                     .values(callback_run=s.CALLBACK_STARTED, callback_worker=worker))


def test_a_callback_delivered_again_never_runs_again(rig):
    app, done, calls = rig
    op_id = published(app)
    assert deliver(done, op_id) == "SUCCESS"
    assert (operation(get_state(app).store, op_id)["callback_run"]) == s.CALLBACK_ENDED
    assert deliver(done, op_id) == "IGNORED"  # this process remembers it ran it
    copies._finished_here.clear()  # another process: the store tells
    assert deliver(done, op_id, headers={"redelivered": True}) == "IGNORED"
    assert len(calls) == 1


def test_a_callback_claimed_by_a_live_process_comes_back_later_and_runs_once_that_is_gone(rig):
    app, done, calls = rig
    op_id = published(app)
    waiting(app)
    sibling = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        claim(app, op_id, f"{HERE}/{sibling.pid}")
        assert deliver(done, op_id) == "IGNORED"
    finally:
        sibling.kill()
        sibling.wait()
    [again] = waiting(app)
    assert again.headers["id"] == completion_task_id(op_id)
    assert again.headers[HEADER_CALLBACK] == op_id and again.headers[HEADER_DEFERRALS] == 1
    assert calls == []
    assert deliver(done, op_id, headers={HEADER_DEFERRALS: 1}) == "SUCCESS"  # its claimant is gone now
    assert len(calls) == 1
    assert operation(get_state(app).store, op_id)["callback_run"] == s.CALLBACK_ENDED


def test_a_callback_whose_claimant_is_gone_runs_again_once(rig, caplog):
    app, done, calls = rig
    op_id = published(app)
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    claim(app, op_id, f"{HERE}/{dead.pid}")
    with caplog.at_level(logging.WARNING, logger="celery_spawn.tracking"):
        assert deliver(done, op_id) == "SUCCESS"
    assert "is gone" in caplog.text and len(calls) == 1


def test_a_callback_whose_claimant_died_after_its_result_was_stored_never_runs_again(store_url):
    """The claimant's worker died after Celery stored the callback's result and before its end was written:
    the broker's copy (``acks_late``) finds the run claimed by a process that is gone, and the result."""
    app = Celery("callbacks-backend", broker="memory://", backend="cache+memory://", set_as_current=False)
    install(app, SpawnManager(), database_url=store_url)
    calls = []

    @app.task(name="cb.done", shared=False)
    def done(summary):
        calls.append(summary)

    guard_copies(app)
    try:
        op_id = published(app)
        dead = subprocess.Popen([sys.executable, "-c", "pass"])
        dead.wait()
        claim(app, op_id, f"{HERE}/{dead.pid}")
        app.backend.mark_as_done(completion_task_id(op_id), op_id)
        assert deliver(done, op_id, headers={"redelivered": True}) == "IGNORED"
        assert calls == [] and operation(get_state(app).store, op_id)["callback_run"] == s.CALLBACK_ENDED
    finally:
        get_state(app).store.dispose()


def test_a_callback_the_store_does_not_know_runs(rig):
    """Its operation purged, or the header set by hand: it runs as it would without claims."""
    app, done, calls = rig
    assert deliver(done, f"op-unknown-{uuid.uuid4().hex[:8]}") == "SUCCESS" and len(calls) == 1


def test_a_retry_frees_the_claim_of_its_attempt(rig):
    app, done, _ = rig
    op_id = published(app)
    store = get_state(app).store
    me = f"{HERE}/{os.getpid()}"
    assert store.claim_callback(op_id, me)
    request = Context(id=completion_task_id(op_id), headers={HEADER_CALLBACK: op_id}, hostname=HERE)
    _on_retry(sender=done, request=request, reason=RuntimeError("later"))
    assert store.callback_claim_of(op_id) == (s.CALLBACK_WAITING, me)
    assert deliver(done, op_id) == "SUCCESS"


def age(app, op_id, seconds=600, **values):
    with get_state(app).store.begin() as conn:
        conn.execute(s.operations.update().where(s.operations.c.id == op_id)
                     .values(updated_at=utcnow() - timedelta(seconds=seconds), **values))


def test_the_sweep_sends_again_a_callback_the_broker_lost(rig, caplog):
    app, done, calls = rig
    op_id = published(app)
    waiting(app)  # the callback's message is lost
    age(app, op_id)
    with caplog.at_level(logging.WARNING, logger="celery_spawn.recovery"):
        report = control.sweep(app, grace_seconds=60, redeliver_after=60)
    assert report.callbacks == 1 and "published again the on_complete callback" in caplog.text
    [again] = waiting(app)
    assert again.headers[HEADER_CALLBACK] == op_id and again.headers["id"] == completion_task_id(op_id)
    assert operation(get_state(app).store, op_id)["callback_sends"] == 2
    assert deliver(done, op_id) == "SUCCESS" and len(calls) == 1
    age(app, op_id)
    assert control.sweep(app, grace_seconds=60, redeliver_after=60).callbacks == 0  # it ran: never again


def test_a_callback_waiting_in_a_busy_queue_is_not_sent_again(rig):
    app, done, calls = rig
    op_id = published(app)
    waiting(app)
    app.send_task("cb.other", queue=app.conf.task_default_queue)  # the queue holds a message: not idle
    age(app, op_id)
    assert control.sweep(app, grace_seconds=60, redeliver_after=60).callbacks == 0
    assert [m.headers["task"] for m in waiting(app)] == ["cb.other"]
    assert control.sweep(app, grace_seconds=60, redeliver_after=0).callbacks == 0  # redelivery off


def test_a_callback_sent_again_too_often_is_given_up(rig, caplog):
    app, done, calls = rig
    op_id = published(app)
    waiting(app)
    age(app, op_id, callback_sends=get_state(app).settings.redeliver_limit + 1)
    with caplog.at_level(logging.ERROR, logger="celery_spawn.recovery"):
        assert control.sweep(app, grace_seconds=60, redeliver_after=60).callbacks == 0
    assert "is lost:" in caplog.text and waiting(app) == []
    assert operation(get_state(app).store, op_id)["callback_run"] == s.CALLBACK_LOST


def test_a_queue_the_broker_does_not_know_is_idle_only_for_callbacks(rig):
    """Redis (like kombu's other virtual transports) knows only queues that hold a message: an emptied queue
    is "not found". Children keep the old rule (cannot tell); a callback's copy costs nothing."""
    app, _, _ = rig
    redeliverer = get_state(app).sweeper.redeliverer
    never = f"never-{uuid.uuid4().hex[:8]}"
    assert redeliverer.queue_is_idle(never) is False
    assert redeliverer.queue_is_idle(never, missing_is_idle=True) is True


def test_a_group_given_as_on_complete_claims_nothing_and_is_never_sent_again(rig):
    """Each member of a group would claim the one run: a group (or a chain) runs as Celery runs it."""
    import json

    from celery import group

    app, done, calls = rig
    store = get_state(app).store
    op_id = f"op-{uuid.uuid4().hex[:8]}"
    seed(store, [op_row(op_id, state=s.OP_SUCCEEDED, callback_state=s.CALLBACK_PENDING,
                        on_complete=json.dumps(dict(group(app.signature("cb.a"), app.signature("cb.b")))))])
    waiting(app)
    assert get_state(app).completion.apply_callback(operation(store, op_id))
    members = waiting(app)
    assert len(members) == 2 and not any(HEADER_CALLBACK in m.headers for m in members)
    got = operation(store, op_id)
    assert (got["callback_state"], got["callback_run"], got["callback_sends"]) == (s.CALLBACK_SENT, None, 1)
    age(app, op_id)
    assert control.sweep(app, grace_seconds=60, redeliver_after=60).callbacks == 0
