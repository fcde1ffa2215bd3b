"""The tracking write-behind and the batched job transitions, on real stores."""
from __future__ import annotations

import sys
import threading
import time
from datetime import timedelta
from typing import Any

import pytest
import sqlalchemy as sa
from celery import Celery

from celery_spawn import SpawnManager, SpawnTask, depends_on, get_state, install
from celery_spawn.engine import tracker as tracking
from celery_spawn.engine.publisher import Publisher
from celery_spawn.errors import StoreError
from celery_spawn.handlers import default_operation_id
from celery_spawn.store import schema as s
from celery_spawn.store import utcnow
from celery_spawn.store.dialects import Finish, PostgresDialect, dialect_for
from celery_spawn.engine.tracker import Finished
from celery_spawn.engine.writebehind import FINISH, RETRY, START, Event, WriteBehind, _fold_starts, write_events


@pytest.fixture
def rig(store_url):
    """A spawned operation of five children, recorded and dispatched (messages go to an in-memory broker)."""
    app = Celery("writebehind", broker="memory://", set_as_current=False)
    app.conf.update(task_default_queue="wb-test", broker_connection_retry_on_startup=True)
    manager = SpawnManager()
    install(app, manager, database_url=store_url)

    @app.task(name="w.parent", base=SpawnTask, shared=False)
    def parent(n, chain=False):
        return n

    @app.task(name="w.child", shared=False)
    def child(i):
        return i

    @manager.handler("kids")
    def kids(context):
        previous = None
        for i in range(context.parent.result):
            sig = child.s(i)
            context.freeze(sig)
            if previous is not None and context.parent.kwargs.get("chain"):
                depends_on(sig, previous)
            previous = sig.id
            yield sig

    yield app, parent
    get_state(app).store.dispose()


def _dialect(conn):
    return dialect_for(conn.dialect.name)


def spawn(app, parent, n: int = 5, chain: bool = False) -> tuple[str, list[dict]]:
    result = parent.apply(args=(n,), kwargs={"chain": chain, "_spawn_config": {"handler": "kids"}})
    operation_id = default_operation_id(result.id)
    return operation_id, jobs(app, operation_id)


def jobs(app, operation_id: str) -> list[dict]:
    with get_state(app).store.read() as conn:
        return [dict(r) for r in conn.execute(
            sa.select(s.jobs).where(s.jobs.c.operation_id == operation_id).order_by(s.jobs.c.position)).mappings()]


def operation(app, operation_id: str) -> dict:
    store = get_state(app).store
    with store.read() as conn:
        return store.get_operation(conn, operation_id)


def test_a_batch_of_starts_and_finishes_lands_in_order_and_completes_the_operation(rig):
    app, parent = rig
    operation_id, children = spawn(app, parent)
    ids = [c["id"] for c in children]
    tracker = get_state(app).tracker
    events = [Event(START, job) for job in ids]
    events += [Event(FINISH, job, state=s.SUCCEEDED, operation_id=operation_id) for job in ids[:4]]
    events.append(Event(FINISH, ids[4], state=s.FAILED, error="ValueError: boom", operation_id=operation_id))
    touched = write_events(tracker, events).touched
    assert touched == {operation_id}
    rows = jobs(app, operation_id)
    assert [r["state"] for r in rows] == [s.SUCCEEDED] * 4 + [s.FAILED]
    assert all(r["started_at"] is not None and r["finished_at"] >= r["started_at"] for r in rows)
    assert rows[4]["error"] == "ValueError: boom"
    tracker.check_completion(operation_id)
    op = operation(app, operation_id)
    assert op["completed"] and op["state"] == s.OP_PARTIALLY_FAILED


def test_a_second_finish_of_a_job_changes_nothing(rig):
    app, parent = rig
    operation_id, children = spawn(app, parent, 2)
    job = children[0]["id"]
    store = get_state(app).store
    now = utcnow()
    with store.begin() as conn:
        assert _dialect(conn).finish_jobs(conn, [Finish(job, s.SUCCEEDED, None, now)]) == {job: operation_id}
    with store.begin() as conn:
        assert _dialect(conn).finish_jobs(conn, [Finish(job, s.FAILED, "late", now + timedelta(seconds=1))]) == {}
    row = jobs(app, operation_id)[0]
    assert row["state"] == s.SUCCEEDED and row["error"] is None


def test_each_job_keeps_its_own_times_and_hostile_text_is_data(rig):
    app, parent = rig
    operation_id, children = spawn(app, parent, 3)
    ids = [c["id"] for c in children]
    base = utcnow().replace(microsecond=0)
    store = get_state(app).store
    with store.begin() as conn:
        dialect = _dialect(conn)
        dialect.start_jobs(conn, [(job, base + timedelta(seconds=i)) for i, job in enumerate(ids)], (s.DISPATCHED,))
        dialect.finish_jobs(conn, [
            Finish(ids[0], s.FAILED, "x'); DROP TABLE spawn_jobs; --", base + timedelta(seconds=9)),
            Finish(ids[1], s.SUCCEEDED, None, base + timedelta(seconds=8), base - timedelta(seconds=5))])
    rows = jobs(app, operation_id)
    assert [r["started_at"] for r in rows] == [base + timedelta(seconds=i) for i in range(3)]  # no overwrite
    assert rows[0]["error"] == "x'); DROP TABLE spawn_jobs; --"
    assert rows[1]["finished_at"] == base + timedelta(seconds=8)
    assert rows[2]["state"] == s.STARTED


def test_finishing_a_step_releases_the_next_one_exactly_once(rig):
    app, parent = rig
    operation_id, children = spawn(app, parent, 3, chain=True)
    assert [c["state"] for c in children] == [s.DISPATCHED, s.HELD, s.HELD]
    tracker = get_state(app).tracker
    first, second = children[0]["id"], children[1]["id"]
    won, to_check, released, _ = tracker.finish_batch([Finish(first, s.SUCCEEDED, None, utcnow())])
    assert won == {first: operation_id}
    assert to_check == []  # it just released a child of its own: not complete
    assert released == 1
    assert [c["state"] for c in jobs(app, operation_id)] == [s.SUCCEEDED, s.DISPATCHED, s.HELD]
    assert tracker.finish_batch([Finish(first, s.SUCCEEDED, None, utcnow())]) == ({}, [], 0, [])
    assert jobs(app, operation_id)[2]["pending_deps"] == 1
    # A failure cancels what depended on it.
    won, to_check, *_ = tracker.finish_batch([Finish(second, s.FAILED, "boom", utcnow())])
    assert to_check == [operation_id]
    assert [c["state"] for c in jobs(app, operation_id)] == [s.SUCCEEDED, s.FAILED, s.CANCELLED]


def test_starts_fold_into_the_finish_of_the_same_batch():
    start, finish = Event(START, "a"), Event(FINISH, "a", state=s.SUCCEEDED)
    other = Event(START, "b")
    folded = _fold_starts([start, other, finish])
    assert folded == [other, finish]
    assert finish.started_at == start.at
    retry = [Event(START, "c"), Event(RETRY, "c"), Event(START, "c"), Event(FINISH, "c", state=s.SUCCEEDED)]
    assert [e.kind for e in _fold_starts(retry)] == [START, RETRY, FINISH]


def test_the_thread_writes_in_the_background_and_flush_waits_for_it(rig):
    app, parent = rig
    operation_id, children = spawn(app, parent)
    queue = WriteBehind(get_state(app).tracker)
    for child in children:
        queue.add(Event(START, child["id"]))
        queue.add(Event(FINISH, child["id"], state=s.SUCCEEDED, operation_id=operation_id))
    assert queue.flush(30)
    assert {r["state"] for r in jobs(app, operation_id)} == {s.SUCCEEDED}
    assert operation(app, operation_id)["completed"]  # checked before the thread went idle


class FlakyTracker:
    """Fails its first ``failures`` writes as a store outage would, then records what it was given."""

    def __init__(self, failures: int) -> None:
        self.failures, self.finished, self.checked = failures, [], []
        self.done = threading.Event()

    def start_many(self, starts):
        pass

    def end_spare(self):
        pass

    def finish_batch(self, finishes, **_):
        if self.failures:
            self.failures -= 1
            raise StoreError("spawn store postgresql://u:***@db/x failed: OperationalError: gone")
        self.finished.extend(f.job_id for f in finishes)
        return Finished({f.job_id: "op" for f in finishes}, ["op"], 0)

    def check_completion(self, operation_id):
        self.checked.append(operation_id)
        self.done.set()


def test_a_store_outage_delays_events_and_loses_none(caplog, monkeypatch):
    monkeypatch.setattr("celery_spawn.engine.writebehind.RETRY_DELAYS", (0.01, 0.02))
    tracker = FlakyTracker(failures=3)
    queue = WriteBehind(tracker)
    queue.add(Event(FINISH, "a", state=s.SUCCEEDED))
    assert tracker.done.wait(10)
    assert tracker.finished == ["a"] and tracker.checked == ["op"]
    assert "could not record 1 tracking events" in caplog.text
    assert "***" in caplog.text


def test_a_sleep_that_fails_between_retries_loses_no_event(monkeypatch):
    # libfaketime's clock_nanosleep can answer EINVAL: the writer thread, and its batch, must outlive that
    monkeypatch.setattr("celery_spawn.engine.writebehind.RETRY_DELAYS", (0.01, 0.02))
    real_sleep = time.sleep
    refused = []

    def refusing(seconds):
        if not refused:
            refused.append(seconds)
            raise OSError(22, "Invalid argument")
        real_sleep(seconds)

    monkeypatch.setattr("celery_spawn.engine.writebehind.time.sleep", refusing)
    tracker = FlakyTracker(failures=2)
    queue = WriteBehind(tracker)
    queue.add(Event(FINISH, "a", state=s.SUCCEEDED))
    assert tracker.done.wait(10)
    assert refused and tracker.finished == ["a"] and tracker.checked == ["op"]


def test_busy_writers_gather_bigger_batches(rig):
    app, parent = rig
    operation_id, children = spawn(app, parent, 40)
    batches = []
    tracker = get_state(app).tracker
    real = tracker.finish_batch

    def counting(finishes, **options):  # a slow first write: the rest gathers meanwhile
        batches.append(len(finishes))
        if len(batches) == 1:
            time.sleep(0.2)
        return real(finishes, **options)

    tracker.finish_batch = counting
    queue = WriteBehind(tracker)
    first, *rest = children
    queue.add(Event(FINISH, first["id"], state=s.SUCCEEDED, operation_id=operation_id))
    deadline = time.monotonic() + 10
    while not batches and time.monotonic() < deadline:  # an idle writer writes at once, without waiting for more
        time.sleep(0.001)
    assert batches == [1]
    for child in rest:  # arrive while the first write is still going: they gather
        queue.add(Event(FINISH, child["id"], state=s.SUCCEEDED, operation_id=operation_id))
    assert queue.flush(30)
    assert sum(batches) == 40
    assert len(batches) <= 3, batches


class RecordingTracker:
    """Records batch sizes; each finish releases ``releases`` dependents."""

    def __init__(self, releases: int) -> None:
        self.releases, self.batches = releases, []

    def end_spare(self):
        pass

    def finish_batch(self, finishes, **_):
        self.batches.append(len(finishes))
        time.sleep(0.005)  # a write takes a while: the next events come in meanwhile
        return Finished({f.job_id: "op" for f in finishes}, [], self.releases)


def trickle(queue: WriteBehind, count: int, gap: float) -> None:
    for n in range(count):
        queue.add(Event(FINISH, f"job-{n}", state=s.SUCCEEDED))
        time.sleep(gap)
    assert queue.flush(10)


def test_a_steady_trickle_of_finishes_is_gathered_into_batches():
    """Fewer than BUSY events at a time, but without pause: lingering after each write gathers them."""
    tracker = RecordingTracker(releases=0)
    trickle(WriteBehind(tracker), 60, 0.004)
    assert sum(tracker.batches) == 60
    assert len(tracker.batches) <= 15, tracker.batches


def test_finishes_that_release_the_next_step_are_written_at_once():
    """A chain: each write publishes the next step, so waiting would only add latency to every hop."""
    tracker = RecordingTracker(releases=1)
    trickle(WriteBehind(tracker), 30, 0.004)
    assert sum(tracker.batches) == 30
    assert len(tracker.batches) >= 10, tracker.batches  # no lingering: it would gather these into about 3 batches


def test_the_first_finish_after_a_pause_is_written_at_once(monkeypatch):
    """Events that did not come in during the last write (a new chain, a lone task) wait for nothing."""
    monkeypatch.setattr("celery_spawn.engine.writebehind.LINGER", 5.0)  # a wait would show, however slow the machine
    tracker = RecordingTracker(releases=0)
    queue = WriteBehind(tracker)
    trickle(queue, 1, 0)
    start = time.monotonic()
    trickle(queue, 1, 0)  # within LINGER of the last write, but nothing was flowing
    assert time.monotonic() - start < 2.5
    assert tracker.batches == [1, 1]


def test_a_released_step_is_marked_dispatched_with_the_next_batch_or_when_quiet(rig, monkeypatch):
    monkeypatch.setattr(tracking, "PUBLISH_AHEAD", 0)  # (on PostgreSQL, a small batch's release is published ahead)
    app, parent = rig
    operation_id, children = spawn(app, parent, 3, chain=True)
    tracker = get_state(app).tracker
    first, second, third = (c["id"] for c in children)
    marked_in = []
    real = tracker.store.mark_dispatched_in

    def spy(conn, ids):
        marked_in.append(list(ids))
        return real(conn, ids)

    tracker.store.mark_dispatched_in = spy
    try:
        queue = WriteBehind(tracker)
        queue.add(Event(FINISH, first, state=s.SUCCEEDED, operation_id=operation_id))
        assert queue.flush(10)  # nothing follows: the mark is written once events pause
        assert [c["state"] for c in jobs(app, operation_id)] == [s.SUCCEEDED, s.DISPATCHED, s.HELD]
        assert marked_in == [[second]]
        # Written directly: what a finish publishes is left unmarked, and goes with the next batch.
        written = write_events(tracker, [Event(FINISH, second, state=s.SUCCEEDED, operation_id=operation_id)])
        assert written.unmarked == [third]
        assert [c["state"] for c in jobs(app, operation_id)] == [s.SUCCEEDED, s.SUCCEEDED, s.PENDING]
        later = write_events(tracker, [Event(FINISH, "no-such-job", state=s.SUCCEEDED)], marks=written.unmarked)
        assert later.unmarked == [] and later.touched == set()
        assert [c["state"] for c in jobs(app, operation_id)] == [s.SUCCEEDED, s.SUCCEEDED, s.DISPATCHED]
    finally:
        del tracker.store.mark_dispatched_in


# ---- PostgreSQL: a hop publishes the next step ahead of its write -------------------------------
class _Calls(list):
    spy: Any


def _from_the_tracker() -> bool:
    """Whether the publish under way was asked for by the tracker (a release), not by a spawn."""
    frame = sys._getframe(1)
    while frame is not None:
        if frame.f_code in (tracking.Tracker._publish.__code__, tracking.Tracker._publish_ahead.__code__):
            return True
        frame = frame.f_back
    return False


@pytest.fixture
def published_calls(monkeypatch):
    """Every publish_children call of the tracker: the ids, and their states in the store at that moment."""
    calls = _Calls()
    real = Publisher.publish

    def spy(publisher, rows):
        if not _from_the_tracker():  # the spawn's own publishing is not what these tests watch
            return real(publisher, rows)
        store = get_state(publisher.app).store
        with store.read() as conn:
            states = dict(conn.execute(sa.select(s.jobs.c.id, s.jobs.c.state)
                                       .where(s.jobs.c.id.in_([r["id"] for r in rows]))).all())
        calls.append({"ids": [r["id"] for r in rows], "states_then": states})
        if spy.failures and spy.failures.pop():
            raise ConnectionError("broker down")
        return real(publisher, rows)

    spy.failures = []
    monkeypatch.setattr(Publisher, "publish", spy)
    calls.spy = spy
    return calls


@pytest.mark.parametrize("store_url", ["postgresql"], indirect=True)
def test_a_hop_publishes_the_next_step_before_it_writes(rig, published_calls):
    app, parent = rig
    operation_id, children = spawn(app, parent, 3, chain=True)
    first, second, third = (c["id"] for c in children)
    finished = get_state(app).tracker.finish_batch([Finish(first, s.SUCCEEDED, None, utcnow())], defer_marks=True)
    assert published_calls == [{"ids": [second], "states_then": {second: s.HELD}}]  # before the write committed
    assert finished.won == {first: operation_id} and finished.released == 1
    assert finished.to_check == [] and list(finished.unmarked) == []  # marked by the write itself
    assert [c["state"] for c in jobs(app, operation_id)] == [s.SUCCEEDED, s.DISPATCHED, s.HELD]
    assert jobs(app, operation_id)[1]["dispatched_at"] is not None


@pytest.mark.parametrize("store_url", ["postgresql"], indirect=True)
def test_a_broker_error_ahead_leaves_the_step_to_be_published_after_the_write(rig, published_calls):
    app, parent = rig
    operation_id, children = spawn(app, parent, 3, chain=True)
    first, second, _ = (c["id"] for c in children)
    published_calls.spy.failures.append(True)
    finished = get_state(app).tracker.finish_batch([Finish(first, s.SUCCEEDED, None, utcnow())])
    assert [c["ids"] for c in published_calls] == [[second], [second]]
    assert published_calls[1]["states_then"] == {second: s.PENDING}  # the usual way: released, then published
    assert finished.released == 1
    assert [c["state"] for c in jobs(app, operation_id)] == [s.SUCCEEDED, s.DISPATCHED, s.HELD]


def _fail_the_first_write(monkeypatch, error: Exception) -> list[Exception]:
    """Make the next finishing statement raise ``error`` (after what was published ahead); returns what is left."""
    real = PostgresDialect.succeed_and_release
    failures = [error]

    def flaky(*args, **kwargs):
        if failures:
            raise failures.pop()
        return real(*args, **kwargs)

    monkeypatch.setattr(PostgresDialect, "succeed_and_release", flaky)
    return failures


@pytest.mark.parametrize("store_url", ["postgresql"], indirect=True)
def test_a_write_that_fails_after_publishing_ahead_is_retried_without_publishing_again(rig, published_calls,
                                                                                       monkeypatch):
    app, parent = rig
    operation_id, children = spawn(app, parent, 3, chain=True)
    first, second, _ = (c["id"] for c in children)
    failures = _fail_the_first_write(monkeypatch, StoreError("connection lost"))
    queue = WriteBehind(get_state(app).tracker)
    queue.add(Event(FINISH, first, state=s.SUCCEEDED, operation_id=operation_id))
    assert queue.flush(10)
    assert not failures  # the first attempt failed, after publishing
    assert [c["ids"] for c in published_calls] == [[second]]  # and the retry did not publish it again
    assert [c["state"] for c in jobs(app, operation_id)] == [s.SUCCEEDED, s.DISPATCHED, s.HELD]


@pytest.mark.parametrize("store_url", ["postgresql"], indirect=True)
def test_a_cancel_that_waited_for_a_step_published_ahead_revokes_it(rig, monkeypatch):
    pg = PostgresDialect()
    app, parent = rig
    operation_id, children = spawn(app, parent, 3, chain=True)
    first, second, third = (c["id"] for c in children)
    revoked: list = []
    monkeypatch.setattr(app.control, "revoke", lambda ids, **_: revoked.extend(ids))
    tracker = get_state(app).tracker
    box: dict = {}
    with tracker.store.engine.connect() as conn, conn.begin():
        assert [r["id"] for r in pg.released_by(conn, [first])] == [second]  # locked, being published
        canceller = get_state(app).canceller
        thread = threading.Thread(target=lambda: box.update(result=canceller.cancel(operation_id)), daemon=True)
        thread.start()
        thread.join(0.5)
        assert thread.is_alive(), "the cancel did not wait for the release's locks"
        pg.succeed_and_release(conn, [Finish(first, s.SUCCEEDED, None, utcnow())], published=[second])
    thread.join(10)
    assert box["result"]["cancelled"] == 1  # third; first (running when read) and second are revoked
    assert second in revoked
    assert [c["state"] for c in jobs(app, operation_id)] == [s.SUCCEEDED, s.REVOKED, s.CANCELLED]


def test_publishing_ahead_is_off_in_eager_mode_and_under_green_threads_with_a_blocking_driver(monkeypatch):
    import sys
    import types

    from psycopg2.extensions import set_wait_callback
    from psycopg2.extras import wait_select

    from celery_spawn.engine.tracker import may_publish_ahead as _may_publish_ahead

    app = Celery("ahead", set_as_current=False)
    assert _may_publish_ahead(app)
    app.conf.task_always_eager = True
    assert not _may_publish_ahead(app)
    app.conf.task_always_eager = False
    patched = types.SimpleNamespace(is_module_patched=lambda name: name == "socket")
    monkeypatch.setitem(sys.modules, "gevent.monkey", patched)
    assert not _may_publish_ahead(app)  # a greenlet waiting on a row lock would block the lock's holder
    set_wait_callback(wait_select)  # what psycogreen does: database waits yield to other greenlets
    try:
        assert _may_publish_ahead(app)
    finally:
        set_wait_callback(None)
    monkeypatch.delitem(sys.modules, "gevent.monkey")
    monkeypatch.setitem(sys.modules, "eventlet.patcher", types.SimpleNamespace(is_monkey_patched=lambda name: True))
    assert not _may_publish_ahead(app)


def _wait_for(predicate, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.005)


@pytest.mark.parametrize("store_url", ["postgresql"], indirect=True)
def test_a_lone_start_reads_and_locks_the_release_while_its_job_runs(rig, published_calls, monkeypatch):
    app, parent = rig
    operation_id, children = spawn(app, parent, 3, chain=True)
    first, second, _ = (c["id"] for c in children)
    reads = []
    real_read = PostgresDialect.released_by
    monkeypatch.setattr(PostgresDialect, "released_by", lambda self, conn, ids, *a: reads.append(list(ids))
                        or real_read(self, conn, ids, *a))
    queue = WriteBehind(get_state(app).tracker)
    queue.add(Event(START, first))
    _wait_for(lambda: queue._held is not None)  # read while the job runs
    assert reads == [[first]] and [r["id"] for r in queue._held.rows] == [second]
    queue.add(Event(FINISH, first, state=s.SUCCEEDED, operation_id=operation_id))
    assert queue.flush(10)
    assert reads == [[first]]  # the finish read nothing more
    assert published_calls == [{"ids": [second], "states_then": {second: s.HELD}}]
    rows = jobs(app, operation_id)
    assert [r["state"] for r in rows] == [s.SUCCEEDED, s.DISPATCHED, s.HELD]
    assert rows[0]["started_at"] is not None  # the start, folded into the finish


@pytest.mark.parametrize("store_url", ["postgresql"], indirect=True)
def test_a_held_release_is_let_go_when_the_job_fails_or_its_start_is_written_alone(rig, published_calls):
    app, parent = rig
    operation_id, children = spawn(app, parent, 3, chain=True)
    first = children[0]["id"]
    queue = WriteBehind(get_state(app).tracker)
    queue.add(Event(START, first))
    _wait_for(lambda: queue._held is not None)
    assert queue.flush(10)  # no finish within START_DELAY: the start is written, the locks let go first
    assert queue._held is None
    assert [r["state"] for r in jobs(app, operation_id)] == [s.STARTED, s.HELD, s.HELD]
    other_operation, others = spawn(app, parent, 3, chain=True)
    queue.add(Event(START, others[0]["id"]))
    _wait_for(lambda: queue._held is not None)
    queue.add(Event(FINISH, others[0]["id"], state=s.FAILED, error="boom", operation_id=other_operation))
    assert queue.flush(10)  # the failure lets the locks go, then cancels what depended on it
    assert queue._held is None and published_calls == []
    assert [r["state"] for r in jobs(app, other_operation)] == [s.FAILED, s.CANCELLED, s.CANCELLED]


@pytest.mark.parametrize("store_url", ["postgresql"], indirect=True)
def test_a_hop_reads_the_next_release_on_the_connection_its_finish_kept(rig, monkeypatch):
    """A committed hop begins its next transaction on the same connection, which the next step's read ahead
    in that thread takes instead of checking one out; a thread with no step for it gives it back."""
    from celery_spawn.store import Finish, utcnow

    app, parent = rig
    operation_id, children = spawn(app, parent, 3, chain=True)
    first, second, third = (c["id"] for c in children)
    reads: list = []
    real_read = PostgresDialect.released_by
    monkeypatch.setattr(PostgresDialect, "released_by",
                        lambda self, conn, ids, *a: reads.append((ids[0], conn)) or real_read(self, conn, ids, *a))
    tracker = get_state(app).tracker
    engine = tracker.store.engine
    held = tracker.hold_release(first)
    assert held is not None
    finishing = held.conn
    tracker.finish_batch([Finish(first, s.SUCCEEDED, None, utcnow())], held=held, defer_marks=True)
    assert engine.pool.checkedout() == 1  # kept, its next transaction begun
    held = tracker.hold_release(second)
    assert held is not None and held.conn is finishing and reads[-1] == (second, finishing)
    assert [r["id"] for r in held.rows] == [third]
    tracker.finish_batch([Finish(second, s.SUCCEEDED, None, utcnow())], held=held, defer_marks=True)
    tracker.end_spare()  # no step came for it: back to the pool
    assert engine.pool.checkedout() == 0
    held = tracker.hold_release(third)  # releases nothing: its own connection, given back at once
    assert held is None and engine.pool.checkedout() == 0
    assert [r["state"] for r in jobs(app, operation_id)][:2] == [s.SUCCEEDED, s.SUCCEEDED]


def test_hold_release_needs_postgresql(rig):
    app, parent = rig
    operation_id, children = spawn(app, parent, 3, chain=True)
    tracker = get_state(app).tracker
    held = tracker.hold_release(children[0]["id"])
    try:
        if tracker.store.backend == "postgresql":
            assert held is not None and [r["id"] for r in held.rows] == [children[1]["id"]]
            assert tracker.hold_release(children[2]["id"]) is None  # releases nothing
        else:
            assert held is None
    finally:
        if held is not None:
            held.abandon()


@pytest.mark.parametrize("store_url", ["postgresql"], indirect=True)
def test_a_held_write_that_fails_is_retried_without_publishing_again(rig, published_calls, monkeypatch):
    app, parent = rig
    operation_id, children = spawn(app, parent, 3, chain=True)
    first, second, _ = (c["id"] for c in children)
    failures = _fail_the_first_write(
        monkeypatch, sa.exc.OperationalError("UPDATE ...", {}, Exception("server closed the connection")))
    queue = WriteBehind(get_state(app).tracker)
    queue.add(Event(START, first))
    _wait_for(lambda: queue._held is not None)
    queue.add(Event(FINISH, first, state=s.SUCCEEDED, operation_id=operation_id))
    assert queue.flush(10)
    assert not failures and [c["ids"] for c in published_calls] == [[second]]
    assert [c["state"] for c in jobs(app, operation_id)] == [s.SUCCEEDED, s.DISPATCHED, s.HELD]


# ---- PostgreSQL: a fan-out stops reading ahead what its finishes release -------------------------
def test_release_memory_turns_read_ahead_off_after_quiet_batches_and_on_at_a_release():
    from celery_spawn.engine.writebehind import QUIET_RELEASES, ReleaseMemory

    memory = ReleaseMemory()
    success = [Event(FINISH, "a", state=s.SUCCEEDED, operation_id="fanout")]
    assert memory.expected("fanout") and memory.expected(None) and memory.expected_in(success)
    for _ in range(QUIET_RELEASES):
        memory.learn(success, quiet={"fanout"})
    assert not memory.expected("fanout") and not memory.expected_in(success)
    assert memory.expected("other") and memory.expected(None)
    memory.learn(success, quiet=set())  # a release there: back on
    assert memory.expected("fanout")
    failure = [Event(FINISH, "b", state=s.FAILED, operation_id="other")]
    assert not memory.expected_in(failure)  # a failure releases nothing ahead anyway


def test_release_memory_is_bounded(monkeypatch):
    from celery_spawn.engine import writebehind

    monkeypatch.setattr(writebehind, "REMEMBERED_OPERATIONS", 3)
    memory = writebehind.ReleaseMemory()
    for op in "abcde":
        memory.learn([Event(FINISH, op, state=s.SUCCEEDED, operation_id=op)], quiet={op})
    assert list(memory._quiet) == ["c", "d", "e"]


@pytest.fixture
def read_aheads(monkeypatch):
    """The ids each read-ahead (``released_by``) asked about."""
    reads: list[list[str]] = []
    real = PostgresDialect.released_by
    monkeypatch.setattr(PostgresDialect, "released_by",
                        lambda self, conn, ids, *a: reads.append(list(ids)) or real(self, conn, ids, *a))
    return reads


@pytest.mark.parametrize("store_url", ["postgresql"], indirect=True)
def test_a_fan_out_stops_reading_ahead_and_a_chain_keeps_on(rig, read_aheads, published_calls):
    from celery_spawn.engine.writebehind import QUIET_RELEASES

    app, parent = rig
    fanout, children = spawn(app, parent, QUIET_RELEASES + 3)
    queue = WriteBehind(get_state(app).tracker)
    for child in children:  # one batch each: a lone start, then its finish
        queue.add(Event(START, child["id"], operation_id=fanout))
        _wait_for(lambda: queue._held_for == child["id"] or not queue.releases.expected(fanout))
        queue.add(Event(FINISH, child["id"], state=s.SUCCEEDED, operation_id=fanout))
        assert queue.flush(10)
    # one read each while the job ran (its finish does not read again), then none for what releases nothing
    assert read_aheads == [[child["id"]] for child in children[:QUIET_RELEASES]]
    assert all(r["state"] == s.SUCCEEDED for r in jobs(app, fanout))
    chain, steps = spawn(app, parent, QUIET_RELEASES + 3, chain=True)
    read_aheads.clear()
    for step in steps[:-1]:
        queue.add(Event(START, step["id"], operation_id=chain))
        _wait_for(lambda: queue._held_for == step["id"])
        queue.add(Event(FINISH, step["id"], state=s.SUCCEEDED, operation_id=chain))
        assert queue.flush(10)
    assert read_aheads == [[step["id"]] for step in steps[:-1]]
    assert all(call["states_then"] == {ids: s.HELD for ids in call["ids"]} for call in published_calls)


@pytest.mark.parametrize("store_url", ["postgresql"], indirect=True)
def test_a_finish_in_an_operation_taken_for_quiet_still_releases_its_dependents(rig, read_aheads,
                                                                              published_calls):
    """The memory only decides whether to read ahead: a join after a fan-out is released all the same,
    published after the write instead of before it."""
    from celery_spawn.engine.writebehind import QUIET_RELEASES

    app, parent = rig
    operation_id, children = spawn(app, parent, 3, chain=True)
    first, second, _ = (c["id"] for c in children)
    queue = WriteBehind(get_state(app).tracker)
    queue.releases._quiet[operation_id] = QUIET_RELEASES
    queue.add(Event(START, first, operation_id=operation_id))
    queue.add(Event(FINISH, first, state=s.SUCCEEDED, operation_id=operation_id))
    assert queue.flush(10)
    assert read_aheads == []
    assert published_calls == [{"ids": [second], "states_then": {second: s.PENDING}}]  # after the write
    assert [r["state"] for r in jobs(app, operation_id)] == [s.SUCCEEDED, s.DISPATCHED, s.HELD]
    assert queue.releases.expected(operation_id)  # it released: read ahead again
