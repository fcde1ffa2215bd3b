"""Redelivery of dispatched children the broker lost, on real stores and kombu's in-memory broker."""
from __future__ import annotations

import logging
from datetime import timedelta

import pytest
import sqlalchemy as sa
from celery import Celery

from celery_spawn import SpawnManager, SpawnTask, get_state, install, recover
from celery_spawn.handlers import default_operation_id
from celery_spawn.protocol import HEADER_RECOVERED
from celery_spawn.store import schema as s
from celery_spawn.store import utcnow

QUEUE = "redelivery-test"


@pytest.fixture
def rig(store_url):
    app = Celery("redelivery", broker="memory://", set_as_current=False)
    app.conf.update(task_default_queue=QUEUE, broker_connection_retry_on_startup=True)
    manager = SpawnManager()
    install(app, manager, database_url=store_url)

    @app.task(name="r.parent", base=SpawnTask, shared=False)
    def parent(n, plain=False):
        return n

    @app.task(name="r.child", base=SpawnTask, shared=False)
    def child(i):
        return i

    @app.task(name="r.plain", shared=False)
    def plain_child(i):
        return i

    @manager.handler("kids")
    def kids(context):
        task = plain_child if context.parent.kwargs.get("plain") else child
        return [task.s(i) for i in range(context.parent.result)]

    yield app, parent
    get_state(app).store.dispose()


def redeliver(app, after_seconds=None, limit=50):
    return get_state(app).sweeper.redeliverer.redeliver(after_seconds, limit)


def spawn(app, parent, n: int, plain: bool = False) -> str:
    result = parent.apply(args=(n,), kwargs={"plain": plain, "_spawn_config": {"handler": "kids"}})
    assert result.get() == n
    return default_operation_id(result.id)


def age(app, operation_id: str, seconds: float, **where) -> None:
    """Make an operation's children look dispatched ``seconds`` ago."""
    then = utcnow() - timedelta(seconds=seconds)
    query = s.jobs.update().where(s.jobs.c.operation_id == operation_id)
    for column, value in where.items():
        query = query.where(getattr(s.jobs.c, column) == value)
    with get_state(app).store.begin() as conn:
        conn.execute(query.values(created_at=then, dispatched_at=then))


def jobs(app, operation_id: str) -> list[dict]:
    with get_state(app).store.read() as conn:
        return [dict(r) for r in conn.execute(
            sa.select(s.jobs).where(s.jobs.c.operation_id == operation_id).order_by(s.jobs.c.position)).mappings()]


def queued_messages(app) -> list:
    """The task messages waiting in the in-memory queue (drains it)."""
    messages = []
    with app.connection_for_read() as conn:
        queue = conn.SimpleQueue(QUEUE, no_ack=True)
        try:
            while True:
                messages.append(queue.get(timeout=0.05))
        except queue.Empty:
            pass
        finally:
            queue.close()
    return messages


def queued(app) -> list[str]:
    """Ids of the task messages waiting in the in-memory queue (drains it)."""
    return [message.headers["id"] for message in queued_messages(app)]


def test_children_idle_past_the_limit_are_published_again_once(rig):
    app, parent = rig
    operation_id = spawn(app, parent, 3)
    first = queued(app)
    assert len(first) == 3
    age(app, operation_id, 120)
    assert redeliver(app, after_seconds=60) == 3
    assert sorted(queued(app)) == sorted(first)  # the same ids: a claim in the store drops a late original
    rows = jobs(app, operation_id)
    assert {r["state"] for r in rows} == {s.DISPATCHED}
    assert all(r["dispatched_at"] > utcnow() - timedelta(seconds=30) for r in rows)  # leased again
    assert redeliver(app, after_seconds=60) == 0  # not again before another quiet minute
    assert queued(app) == []


def test_started_children_and_moving_operations_are_left_alone(rig):
    app, parent = rig
    operation_id = spawn(app, parent, 3)
    queued(app)
    age(app, operation_id, 120)
    first = jobs(app, operation_id)[0]["id"]
    with get_state(app).store.begin() as conn:  # one sibling finished a moment ago: the queue moves
        conn.execute(s.jobs.update().where(s.jobs.c.id == first)
                     .values(state=s.SUCCEEDED, started_at=utcnow(), finished_at=utcnow()))
    assert redeliver(app, after_seconds=60) == 0
    with get_state(app).store.begin() as conn:  # ...until it stops moving
        conn.execute(s.jobs.update().where(s.jobs.c.id == first)
                     .values(started_at=utcnow() - timedelta(seconds=100),
                             finished_at=utcnow() - timedelta(seconds=100)))
    assert redeliver(app, after_seconds=60) == 2
    assert first not in queued(app)


def test_young_children_are_not_lost(rig):
    app, parent = rig
    spawn(app, parent, 2)
    queued(app)
    assert redeliver(app, after_seconds=60) == 0


def test_plain_task_children_are_published_again_marked_recovered(rig):
    app, parent = rig
    operation_id = spawn(app, parent, 2, plain=True)
    first = queued(app)
    age(app, operation_id, 120)
    assert redeliver(app, after_seconds=60) == 2
    again = queued_messages(app)
    assert sorted(m.headers["id"] for m in again) == sorted(first)
    assert all(m.headers.get(HEADER_RECOVERED) == 1 for m in again)  # the copy claims its start


def test_a_child_sent_again_too_often_ends_lost_and_its_operation_completes(rig, caplog):
    app, parent = rig
    get_state(app).reload(redeliver_limit=2)
    operation_id = spawn(app, parent, 1)
    queued(app)
    for _ in range(2):
        age(app, operation_id, 120)
        assert redeliver(app, after_seconds=60) == 1
        queued(app)
    age(app, operation_id, 120)
    with caplog.at_level(logging.ERROR, logger="celery_spawn.redelivery"):
        assert redeliver(app, after_seconds=60) == 0
    assert queued(app) == []
    [row] = jobs(app, operation_id)
    assert row["state"] == s.LOST and "sent again 2 times" in row["error"] and row["redeliveries"] == 3
    with get_state(app).store.read() as conn:
        operation = get_state(app).store.get_operation(conn, operation_id)
    assert operation["completed"] and operation["state"] == s.OP_FAILED and operation["children_lost"] == 1


def test_zero_turns_redelivery_off_and_recover_uses_the_setting(rig):
    app, parent = rig
    operation_id = spawn(app, parent, 2)
    queued(app)
    age(app, operation_id, 120)
    assert redeliver(app, after_seconds=0) == 0
    assert get_state(app).settings.redeliver_after == 3600  # an hour by default
    assert recover(app, grace_seconds=0) == 0
    assert recover(app, grace_seconds=0, redeliver_after=60) == 2
    app.conf.spawn_redeliver_after = 30
    get_state(app).reload()
    age(app, operation_id, 120)
    assert redeliver(app) == 0  # the copies recover() sent wait in the queue: nothing is lost
    queued(app)
    assert redeliver(app) == 2


@pytest.mark.parametrize("bad", [-1, "60", True, float("nan"), float("inf")])
def test_bad_limits_are_refused(rig, bad):
    app, _ = rig
    with pytest.raises(ValueError, match="after_seconds"):
        redeliver(app, after_seconds=bad)


def test_children_waiting_behind_a_busy_queue_are_not_lost_however_long_they_wait(rig):
    """A healthy backlog: the children sit in the broker's queue. Nothing is published again."""
    app, parent = rig
    queued(app)  # the in-memory queue is the process's: start empty
    operation_id = spawn(app, parent, 3)  # their messages stay queued
    age(app, operation_id, 120)
    assert redeliver(app, after_seconds=60) == 0
    assert len(queued(app)) == 3  # the originals, and no copy
    age(app, operation_id, 120)
    assert redeliver(app, after_seconds=60) == 3  # drained, and still never started: lost


def start_by(app, job_id: str, worker: str | None, seconds_ago: float = 120) -> None:
    """Record ``job_id`` started by ``worker`` (``nodename/pid``) ``seconds_ago``, its operation quiet since."""
    then = utcnow() - timedelta(seconds=seconds_ago)
    with get_state(app).store.begin() as conn:
        conn.execute(s.jobs.update().where(s.jobs.c.id == job_id)
                     .values(state=s.STARTED, started_at=then, worker=worker))


def one_started_child(app, parent, worker: str) -> dict:
    """Spawn one child (its message drained), dispatched long ago and started by ``worker`` as long ago."""
    operation_id = spawn(app, parent, 1)
    queued(app)
    age(app, operation_id, 120)
    [row] = jobs(app, operation_id)
    start_by(app, row["id"], worker)
    return row


@pytest.fixture
def late_acks(rig):
    app, parent = rig
    for name in ("r.child", "r.plain"):
        app.tasks[name].acks_late = True
    return app, parent


@pytest.mark.parametrize("plain", [False, True], ids=["spawntask", "plain"])
def test_a_started_child_whose_worker_is_gone_is_published_again_once(late_acks, plain, caplog):
    """Its whole worker died while it ran and the broker lost its message (seen on Redis): nothing else
    would ever run it. No worker answers for ``gone@nowhere`` on this broker: its run is gone."""
    app, parent = late_acks
    operation_id = spawn(app, parent, 2, plain=plain)
    queued(app)
    age(app, operation_id, 120)
    orphan, done = (r["id"] for r in jobs(app, operation_id))
    start_by(app, orphan, "gone@nowhere/4242")
    with get_state(app).store.begin() as conn:
        conn.execute(s.jobs.update().where(s.jobs.c.id == done).values(
            state=s.SUCCEEDED, started_at=utcnow() - timedelta(seconds=110),
            finished_at=utcnow() - timedelta(seconds=100)))
    with caplog.at_level(logging.WARNING, logger="celery_spawn.redelivery"):
        assert redeliver(app, after_seconds=60) == 1
    [message] = queued_messages(app)
    assert message.headers["id"] == orphan and message.headers.get(HEADER_RECOVERED) == 1
    assert "the run that started it (gone@nowhere/4242) is gone" in caplog.text
    row = next(r for r in jobs(app, operation_id) if r["id"] == orphan)
    assert row["state"] == s.STARTED and row["worker"] == "gone@nowhere/4242" and row["redeliveries"] == 1
    assert redeliver(app, after_seconds=60) == 0  # leased: not again before another quiet minute
    assert queued(app) == []


@pytest.mark.parametrize("alive", [True, None], ids=["alive", "cannot-tell"])
def test_a_started_child_whose_run_goes_on_or_cannot_be_judged_is_left_alone(late_acks, monkeypatch, alive):
    app, parent = late_acks
    row = one_started_child(app, parent, "busy@host/77")
    asked = []
    liveness = get_state(app).tracker.liveness
    monkeypatch.setattr(liveness, "process_of", lambda node, pid: asked.append((node, pid)) or alive)
    assert redeliver(app, after_seconds=60) == 0
    assert asked == [("busy@host", 77)] and queued(app) == []
    start_by(app, row["id"], None)  # a start recorded outside a worker tells nothing
    assert redeliver(app, after_seconds=60) == 0 and len(asked) == 1


def test_a_started_child_that_does_not_ack_late_ends_lost_with_its_worker(rig, caplog):
    """As in Celery: a task acknowledged on receipt is not run again after its worker died."""
    app, parent = rig
    operation_id = one_started_child(app, parent, "gone@nowhere/4242")["operation_id"]
    with caplog.at_level(logging.ERROR, logger="celery_spawn.redelivery"):
        assert redeliver(app, after_seconds=60) == 0
    assert queued(app) == []
    [row] = jobs(app, operation_id)
    assert row["state"] == s.LOST and "does not ack late" in row["error"]
    with get_state(app).store.read() as conn:
        operation = get_state(app).store.get_operation(conn, operation_id)
    assert operation["completed"] and operation["children_lost"] == 1
