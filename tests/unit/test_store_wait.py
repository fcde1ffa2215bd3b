"""A child that cannot claim its start for want of the store retries later; when the broker cannot take that
retry either, the message goes back to the broker instead of being dropped as a failure."""
from __future__ import annotations

from datetime import datetime, timedelta, timezone

import pytest
from celery import Celery
from celery.canvas import Signature
from celery.exceptions import Reject, Retry

from celery_spawn.errors import StoreError
from celery_spawn.hooks import UNCLAIMED, wait_for_store

OUTAGE = StoreError("spawn store failed: OperationalError: server closed the connection unexpectedly")


@pytest.fixture
def task():
    app = Celery("store-wait", broker="memory://", set_as_current=False)

    @app.task(name="t.child", bind=True, acks_late=True, shared=False)
    def child(self):
        return "ran"

    child.push_request(id="child-1", retries=0, is_eager=False, called_directly=False, delivery_info={})
    yield child
    child.pop_request()


def test_it_retries_later_and_the_attempt_is_marked_unclaimed(task, monkeypatch):
    sent = []
    monkeypatch.setattr(Signature, "apply_async", lambda sig, *a, **kw: sent.append(sig))
    with pytest.raises(Retry):
        wait_for_store(task, OUTAGE)
    assert len(sent) == 1 and sent[0].options["eta"] > datetime.now(timezone.utc)
    assert getattr(task.request, UNCLAIMED) is True


def test_the_retry_is_dated_on_the_database_servers_clock(task, monkeypatch):
    """A host whose clock runs ten minutes ahead: a countdown dated by it would hold the retry back ten
    minutes on every other worker (the fault explorer's seed 2628). The eta is the server's now + the delay."""
    from celery_spawn.hooks import STORE_RETRY_DELAY
    from celery_spawn.store.clock import OFFSET

    from celery_spawn.store import clock

    sent, slept = [], []
    monkeypatch.setattr(Signature, "apply_async", lambda sig, *a, **kw: sent.append(sig))
    monkeypatch.setattr(clock.time, "sleep", slept.append)
    monkeypatch.setattr(OFFSET, "seconds", -600.0)
    with pytest.raises(Retry):
        wait_for_store(task, OUTAGE)
    [retry] = sent
    assert "countdown" not in retry.options or retry.options["countdown"] is None
    expected = datetime.now(timezone.utc) - timedelta(seconds=600 - STORE_RETRY_DELAY)
    assert abs((retry.options["eta"] - expected).total_seconds()) < 5
    # By this host's clock that retry is due at once: should it come back here, it would not wait at all, so
    # the delay is waited out before it is sent (and not on a host whose clock agrees with the server's).
    assert slept == [STORE_RETRY_DELAY]
    monkeypatch.setattr(OFFSET, "seconds", 0.3)
    with pytest.raises(Retry):
        wait_for_store(task, OUTAGE)
    assert slept == [STORE_RETRY_DELAY]


def test_a_child_waits_for_the_store_past_the_tasks_retry_limit(task, monkeypatch):
    """Its attempts never started: Celery's limit (3 by default) must not fail it while the store is out."""
    sent = []
    monkeypatch.setattr(Signature, "apply_async", lambda sig, *a, **kw: sent.append(sig))
    task.request.retries = 40
    assert task.max_retries == 3
    with pytest.raises(Retry):
        wait_for_store(task, OUTAGE)
    assert len(sent) == 1
    assert not hasattr(task, "override_max_retries")  # Celery's per-call override, not left on the task


def test_a_retry_the_broker_cannot_take_goes_back_to_the_broker(task, monkeypatch, caplog):
    def broker_out(sig, *args, **kwargs):
        raise ConnectionResetError(104, "Connection reset by peer")

    monkeypatch.setattr(Signature, "apply_async", broker_out)
    with pytest.raises(Reject) as rejected:
        wait_for_store(task, OUTAGE)
    # Celery itself rejects without requeue, which drops the message and records a failure of a child that
    # never ran; requeued, it runs once the broker and the store are back.
    assert rejected.value.requeue is True
    assert "goes back to the broker: its retry could not be sent" in caplog.text


def test_a_spawn_whose_retry_the_broker_cannot_take_goes_back_to_the_broker(monkeypatch):
    """A parent that retries its spawn on a store failure (``autoretry_for``): its result stands, and its
    message is not dropped as a failure when the broker cannot take the retry either."""
    from celery_spawn import SpawnTask

    app = Celery("store-wait-parent", broker="memory://", set_as_current=False)

    @app.task(name="t.parent", base=SpawnTask, bind=True, shared=False, spawn_handler="fan", acks_late=True,
              autoretry_for=(StoreError,), retry_kwargs={"countdown": 1, "max_retries": 5})
    def parent(self):
        return 7

    def store_out(result, call_config):
        raise OUTAGE

    def broker_out(sig, *args, **kwargs):
        raise ConnectionResetError(104, "Connection reset by peer")

    monkeypatch.setattr(parent, "spawn", store_out)
    monkeypatch.setattr(Signature, "apply_async", broker_out)
    parent.push_request(id="parent-1", retries=0, is_eager=False, called_directly=False, delivery_info={})
    try:
        with pytest.raises(Reject) as rejected:
            parent()
    finally:
        parent.pop_request()
    assert rejected.value.requeue is True
