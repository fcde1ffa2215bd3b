"""Tracking in eager mode on real stores: signals, completion state, callback recovery."""
from __future__ import annotations

from datetime import timedelta

import pytest
import sqlalchemy as sa
from celery import Celery
from celery.canvas import Signature

from celery_spawn import SpawnConfig, SpawnManager, SpawnTask, control, get_state, install, recover, signals
from celery_spawn.handlers import default_operation_id
from celery_spawn.store import schema as s
from celery_spawn.protocol import operation_state as _operation_state
from tests.unit.helpers import tracked_app


@pytest.fixture
def eager(store_url):
    app, parent, _, _ = tracked_app(store_url)
    app.conf.task_always_eager = True
    calls = []

    @app.task(name="t.done", shared=False)
    def done(summary):
        calls.append(summary)
        return summary["operation_id"]

    yield app, parent, done, calls
    get_state(app).store.dispose()


def operation(app, parent_id):
    with get_state(app).store.read() as conn:
        return get_state(app).store.get_operation(conn, default_operation_id(parent_id))


def test_signals_fire_for_recorded_failed_and_completed_spawns(eager):
    app, parent, done, calls = eager
    seen = []
    handlers = [
        (signals.spawn_recorded, lambda sender, result, **kw: seen.append(("recorded", result.operation_id))),
        (signals.spawn_failed, lambda sender, operation_id, exception, **kw: seen.append(("failed", operation_id))),
        (signals.operation_completed,
         lambda sender, operation_id, summary, **kw: seen.append(("completed", summary["state"]))),
    ]
    for signal, handler in handlers:
        signal.connect(handler, weak=False)
    try:
        ok = parent.apply(args=(2,), kwargs={"_spawn_config": {"handler": "kids"}})
        bad = parent.apply(args=(2,), kwargs={"_spawn_config": {"handler": "missing"}})
    finally:
        for signal, handler in handlers:
            signal.disconnect(handler)
    assert ("recorded", default_operation_id(ok.id)) in seen
    assert ("failed", default_operation_id(bad.id)) in seen
    assert ("completed", "succeeded") in seen


def test_on_complete_gets_a_summary_once(eager):
    app, parent, done, calls = eager
    config = SpawnConfig(handler="kids").with_on_complete(done.s()).to_dict()
    result = parent.apply(args=(3,), kwargs={"_spawn_config": config})
    assert result.get() == 3
    assert len(calls) == 1
    summary = calls[0]
    assert summary["operation_id"] == default_operation_id(result.id)
    assert summary["counts"] == {"succeeded": 3}
    assert operation(app, result.id)["callback_state"] == "sent"


@pytest.mark.parametrize("backend", [None, "cache+memory://"], ids=["no-backend", "backend"])
def test_an_eager_summary_carries_the_children_results_without_warnings(store_url, backend, recwarn):
    app, parent, _, _ = tracked_app(store_url, backend=backend)
    app.conf.task_always_eager = True
    calls = []

    @app.task(name="t.done", shared=False)
    def done(summary):
        calls.append(summary)

    try:
        config = SpawnConfig(handler="kids").with_on_complete(done.s()).to_dict()
        assert parent.apply(args=(3,), kwargs={"_spawn_config": config}).get() == 3
    finally:
        get_state(app).store.dispose()
    [summary] = calls
    assert sorted(summary["results"].values()) == [1, 2, 3]  # each child returned i + 1
    assert [str(w.message) for w in recwarn if issubclass(w.category, RuntimeWarning)] == []


def test_an_unpublished_callback_is_recovered(eager, monkeypatch):
    app, parent, done, calls = eager
    original = Signature.apply_async

    def broker_down(self, *args, **kwargs):
        if self.task == "t.done":
            raise ConnectionError("broker unreachable")
        return original(self, *args, **kwargs)

    monkeypatch.setattr(Signature, "apply_async", broker_down)
    config = SpawnConfig(handler="kids").with_on_complete(done.s()).to_dict()
    result = parent.apply(args=(2,), kwargs={"_spawn_config": config})
    assert result.get() == 2
    assert calls == []
    assert operation(app, result.id)["callback_state"] == "pending"
    monkeypatch.undo()
    assert recover(app, grace_seconds=0) == 1
    assert len(calls) == 1 and calls[0]["counts"] == {"succeeded": 2}
    assert operation(app, result.id)["callback_state"] == "sent"
    assert recover(app, grace_seconds=0) == 0
    assert len(calls) == 1


@pytest.fixture
def called_back(store_url):
    """An eager app whose spawn of two children completed and ran its ``on_complete`` once.

    Yields (app, the parent's result, its operation id, the callback's calls, the store)."""
    app, parent, _, _ = tracked_app(store_url, backend="cache+memory://")
    app.conf.update(task_always_eager=True, task_store_eager_result=True)
    calls: list[str] = []

    @app.task(name="t.done", shared=False)
    def done(summary):
        calls.append(summary["operation_id"])

    store = get_state(app).store
    config = SpawnConfig(handler="kids").with_on_complete(done.s()).to_dict()
    result = parent.apply(args=(2,), kwargs={"_spawn_config": config})
    op_id = default_operation_id(result.id)
    assert calls == [op_id]
    yield app, result, op_id, calls, store
    store.dispose()


def test_a_callback_running_when_the_sweep_finds_it_unsent_is_recorded_sent_and_left_running(called_back):
    """Completion published ``on_complete`` but could not record it as sent; its run has started meanwhile.

    The sweep records it as sent and publishes nothing; the run is not ended
    under the feet of the worker running it (a Celery retry of the callback
    frees its claim and runs again, which an ended run would forbid).
    """
    import sqlalchemy as sa

    from celery_spawn.store import schema as s

    app, result, op_id, calls, store = called_back
    with store.begin() as conn:  # as if the sent mark was lost and the callback's run is still going
        conn.execute(sa.update(s.operations).where(s.operations.c.id == op_id)
                     .values(callback_state=s.CALLBACK_PENDING, callback_run=s.CALLBACK_STARTED,
                             callback_worker="elsewhere@host/1"))
    report = control.sweep(app, grace_seconds=0)
    assert report.callbacks == 0 and calls == [op_id]
    row = operation(app, result.id)
    assert row["callback_state"] == "sent"
    assert row["callback_run"] == s.CALLBACK_STARTED and row["callback_worker"] == "elsewhere@host/1"


def test_a_callback_the_backend_saw_retried_is_recorded_sent_and_left_to_its_retry(called_back):
    """Completion published ``on_complete`` and lost its sent mark; the callback's first attempt met the same
    store failure in its claim and retried (the result backend says RETRY).

    The sweep records it as sent and waiting, publishes nothing, and ends
    nothing: the retry's delivery claims it and runs it. (Ended, the retry
    was dropped as a duplicate and the callback never ran.)
    """
    import sqlalchemy as sa
    from celery import states

    from celery_spawn.engine.completion import completion_task_id
    from celery_spawn.store import schema as s

    app, result, op_id, calls, store = called_back
    with store.begin() as conn:  # as if neither the sent mark nor the attempt's claim had been written
        conn.execute(sa.update(s.operations).where(s.operations.c.id == op_id)
                     .values(callback_state=s.CALLBACK_PENDING, callback_run=None, callback_worker=None))
    app.backend.forget(completion_task_id(op_id))  # (a backend keeps a success over a later state)
    app.backend.store_result(completion_task_id(op_id), None, states.RETRY)
    report = control.sweep(app, grace_seconds=0)
    assert report.callbacks == 0 and calls == [op_id]
    row = operation(app, result.id)
    assert row["callback_state"] == "sent" and row["callback_run"] == s.CALLBACK_WAITING
    assert store.claim_callback(op_id, "worker@host/7") is True  # the retry's delivery runs it


@pytest.mark.parametrize("ran", [True, False], ids=["ran", "never-ran"])
def test_a_callback_published_before_the_store_failed_is_not_published_again(store_url, monkeypatch, ran):
    """Completion published ``on_complete``, then could not record it as sent (the store was cut).

    The sweep finds it claimed and unsent. When its run is recorded, or the
    result backend holds the callback's result, it was delivered: recorded as
    sent, not run again. When neither knows anything of it (its message may
    be lost), it is published.
    """
    import sqlalchemy as sa

    from celery_spawn.engine.completion import completion_task_id
    from celery_spawn.errors import StoreError
    from celery_spawn.store import schema as s

    app, parent, _, _ = tracked_app(store_url, backend="cache+memory://")
    app.conf.update(task_always_eager=True, task_store_eager_result=True)
    calls = []

    @app.task(name="t.done", shared=False)
    def done(summary):
        calls.append(summary["operation_id"])
        return summary["operation_id"]

    store = get_state(app).store

    def cut_before_sent(operation_id):
        raise StoreError("spawn store failed: OperationalError: server closed the connection unexpectedly")

    monkeypatch.setattr(store, "callback_published", cut_before_sent)
    try:
        config = SpawnConfig(handler="kids").with_on_complete(done.s()).to_dict()
        result = parent.apply(args=(2,), kwargs={"_spawn_config": config})
        assert result.get() == 2
        op_id = default_operation_id(result.id)
        assert calls == [op_id]
        assert operation(app, result.id)["callback_state"] == "pending"
        assert operation(app, result.id)["callback_run"] == s.CALLBACK_ENDED
        if not ran:  # as if its message had been lost before any worker took it
            app.backend.forget(completion_task_id(op_id))
            with store.begin() as conn:
                conn.execute(sa.update(s.operations).where(s.operations.c.id == op_id).values(callback_run=None))
        monkeypatch.undo()
        report = control.sweep(app, grace_seconds=0)
        assert calls == [op_id] * (1 if ran else 2)
        assert report.callbacks == (0 if ran else 1)
        assert operation(app, result.id)["callback_state"] == "sent"
        assert operation(app, result.id)["callback_run"] == s.CALLBACK_ENDED
        assert recover(app, grace_seconds=0) == 0
        assert len(calls) == (1 if ran else 2)
    finally:
        store.dispose()


def test_an_operation_whose_completion_probe_was_lost_is_completed_by_the_sweep(eager):
    """Every child ended, but the process that recorded the last end died before it probed the operation.

    A redelivered copy of that child finds it final and probes nothing: the
    sweep completes the operation, once, and applies ``on_complete`` once.
    """
    app, parent, done, calls = eager
    config = SpawnConfig(handler="kids").with_on_complete(done.s()).to_dict()
    result = parent.apply(args=(2,), kwargs={"_spawn_config": config})
    op_id = default_operation_id(result.id)
    with get_state(app).store.begin() as conn:  # the children are final; the probe never ran
        conn.execute(s.operations.update().where(s.operations.c.id == op_id)
                     .values(completed=False, state="running", callback_state=None, finished_at=None,
                             updated_at=s.utcnow() - timedelta(hours=1)))
    calls.clear()
    # The children ended a moment ago: their own probe may still come.
    assert control.sweep(app, grace_seconds=60).completed == 0
    assert control.sweep(app, grace_seconds=0).completed == 1
    op = operation(app, result.id)
    assert op["completed"] and op["state"] == "succeeded" and op["callback_state"] == "sent"
    assert [c["operation_id"] for c in calls] == [op_id]
    assert recover(app, grace_seconds=0) == 0
    assert len(calls) == 1


def test_an_empty_spawn_completes_at_once(eager):
    app, parent, done, calls = eager
    config = SpawnConfig(handler="kids").with_on_complete(done.s()).to_dict()
    result = parent.apply(args=(0,), kwargs={"_spawn_config": config})
    assert result.get() == 0
    op = operation(app, result.id)
    assert op["completed"] and op["state"] == "succeeded" and op["total"] == 0
    assert len(calls) == 1 and calls[0]["total"] == 0


@pytest.mark.parametrize("counts, expected", [
    ({"succeeded": 3}, "succeeded"),
    ({"succeeded": 2, "failed": 1}, "partially_failed"),
    ({"failed": 2}, "failed"),
    ({"cancelled": 2, "revoked": 1}, "cancelled"),
    ({"succeeded": 1, "cancelled": 1}, "partially_failed"),
    ({"failed": 1, "cancelled": 3}, "failed"),
])
def test_operation_state_rolls_up(counts, expected):
    assert _operation_state(counts) == expected


@pytest.fixture
def missed_outcomes(store_url):
    """An eager app whose spawn of two plain children ran, with both success writes lost: the children
    ``started`` an hour ago, the operation running. Yields (app, the parent's result)."""
    app = Celery("reconcile", broker="memory://", backend="cache+memory://", set_as_current=False)
    app.conf.update(task_always_eager=True, task_store_eager_result=True)
    manager = SpawnManager()
    state = install(app, manager, database_url=store_url)

    @app.task(name="r.parent", base=SpawnTask, shared=False)
    def parent(n):
        return n

    @app.task(name="r.child", shared=False)
    def child(i):
        return i

    manager.register_handler("kids", lambda context: [child.s(i) for i in range(context.parent.result)])
    result = parent.apply(args=(2,), kwargs={"_spawn_config": {"handler": "kids"}})
    op_id = default_operation_id(result.id)
    with state.store.begin() as conn:
        conn.execute(s.jobs.update().where(s.jobs.c.operation_id == op_id)
                     .values(state="started", created_at=s.utcnow() - timedelta(hours=1)))
        conn.execute(s.operations.update().where(s.operations.c.id == op_id).values(completed=False, state="running"))
    yield app, result
    state.store.dispose()


def test_recovery_applies_outcomes_the_store_missed(missed_outcomes):
    """A success the store never heard of (its write was lost) is read back from the result backend."""
    app, result = missed_outcomes
    # Stored a moment ago: the workers' own writes may still come, so nothing is "missed" yet.
    assert control.sweep(app, grace_seconds=60).filled_in == 0
    assert operation(app, result.id)["state"] == "running"
    assert recover(app, grace_seconds=0) == 2
    assert operation(app, result.id)["completed"] and operation(app, result.id)["state"] == "succeeded"
    assert recover(app, grace_seconds=0) == 0


def test_recovery_applies_an_outcome_dated_ahead_once_it_has_seen_it_for_the_grace(missed_outcomes, monkeypatch):
    """The worker that stored the result has a clock 10 minutes ahead: its ``date_done`` says nothing of its age.

    Before, such an outcome waited the whole skew (10 minutes) before the sweep applied it; now it waits the
    grace, measured by the sweeper's own monotonic clock from when it first saw it.
    """
    from datetime import datetime, timezone

    from celery import states

    import celery_spawn.engine.recovery as recovery

    app, result = missed_outcomes
    ahead = datetime.now(timezone.utc) + timedelta(minutes=10)
    monkeypatch.setattr(app.backend, "get_task_meta",
                        lambda task_id: {"status": states.SUCCESS, "result": 1, "date_done": ahead.isoformat()})
    clock = [1000.0]
    monkeypatch.setattr(recovery.time, "monotonic", lambda: clock[0])
    assert control.sweep(app, grace_seconds=60).filled_in == 0  # first seen now
    clock[0] += 30
    assert control.sweep(app, grace_seconds=60).filled_in == 0  # seen for 30 s of the 60
    assert operation(app, result.id)["state"] == "running"
    clock[0] += 31
    assert control.sweep(app, grace_seconds=60).filled_in == 2  # seen for the grace: applied, not 10 min later
    assert operation(app, result.id)["completed"] and operation(app, result.id)["state"] == "succeeded"


@pytest.fixture
def with_backend(store_url):
    """An app whose children are SpawnTasks, with a real Redis result backend."""
    from tests.harness import REDIS_URL

    app, parent, child, runs = tracked_app(store_url, backend=f"{REDIS_URL}/1", spawned_children=True)
    yield app, parent, child, runs
    get_state(app).store.dispose()


def redeliver(child, job: dict, redelivered: bool = True):
    """Run ``child``'s call path as a worker would for a (re)delivered message of ``job``."""
    from celery.exceptions import Ignore

    from celery_spawn.protocol import HEADER_OPERATION

    child.push_request(id=job["id"], called_directly=False, delivery_info={"redelivered": redelivered},
                       headers={HEADER_OPERATION: job["operation_id"]})
    try:
        return child(job["position"])
    except Ignore:
        return "ignored"
    finally:
        child.pop_request()


def stored_jobs(app, operation_id):
    with get_state(app).store.read() as conn:
        return [dict(r) for r in conn.execute(
            sa.select(s.jobs).where(s.jobs.c.operation_id == operation_id).order_by(s.jobs.c.position)).mappings()]


def test_a_child_redelivered_after_its_success_does_not_run_again(with_backend):
    """The worker died after Celery stored the result, before the store or the ack heard of it."""
    app, parent, child, runs = with_backend
    result = parent.apply(args=(2,), kwargs={"_spawn_config": {"handler": "kids"}})
    operation_id = default_operation_id(result.id)
    first, second = stored_jobs(app, operation_id)
    for job in (first, second):
        get_state(app).tracker.claim_start(job["id"])  # the first run started...
    app.backend.store_result(first["id"], 1, "SUCCESS")  # ...and the first child's result was stored
    try:
        assert redeliver(child, first) == "ignored"
        assert runs == []  # its body did not run a second time
        assert redeliver(child, second) == 2  # no stored result: it runs again (at least once)
        assert runs == [1]
        assert [j["state"] for j in stored_jobs(app, operation_id)] == ["succeeded", "started"]
    finally:
        for job in (first, second):
            app.backend.forget(job["id"])


def test_only_a_redelivery_consults_the_result_backend(with_backend, monkeypatch):
    app, parent, child, runs = with_backend
    result = parent.apply(args=(1,), kwargs={"_spawn_config": {"handler": "kids"}})
    [job] = stored_jobs(app, default_operation_id(result.id))
    asked = []
    monkeypatch.setattr(app.backend, "get_task_meta", lambda task_id, **kw: asked.append(task_id) or {})
    assert redeliver(child, job, redelivered=False) == 1
    assert asked == []
    monkeypatch.setattr(app.backend, "get_task_meta", lambda task_id, **kw: 1 / 0)  # unreachable
    get_state(app).tracker.claim_start(job["id"])
    assert redeliver(child, job) == 1  # it cannot tell: run again rather than lose the child
    assert runs == [0, 0]
