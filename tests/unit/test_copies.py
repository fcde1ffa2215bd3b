"""A copy of a child's message claims the start, whatever the task class, and never runs beside the first."""
from __future__ import annotations

import contextlib
import os
import subprocess
import sys

import pytest
import sqlalchemy as sa
from celery import Celery
from celery.exceptions import Ignore, Reject

from celery_spawn import get_state
from celery_spawn.engine import copies, tracker
from celery_spawn.handlers import default_operation_id
from celery_spawn.hooks import guard_copies
from celery_spawn.protocol import HEADER_DEFERRALS, HEADER_OPERATION, HEADER_RECOVERED
from celery_spawn.store import schema as s
from tests.unit.helpers import fail_publishing, tracked_app

NODE = "w1@host"


@pytest.fixture(params=[False, True], ids=["plain", "spawntask"])
def guarded(request, store_url):
    app, parent, child, runs = tracked_app(store_url, spawned_children=request.param)
    guard_copies(app)
    yield app, parent, child, runs
    get_state(app).store.dispose()


def deliver(child, job, *, redelivered=False, recovered=False, node=NODE, retries=0, headers=None):
    """Run ``child``'s call path for one delivery of ``job``, as the worker's tracer would."""
    headers = {HEADER_OPERATION: job["operation_id"], **({HEADER_RECOVERED: 1} if recovered else {}),
               **(headers or {})}
    child.push_request(id=job["id"], called_directly=False, delivery_info={"redelivered": redelivered},
                       headers=headers, hostname=node, retries=retries, args=(job["position"],), kwargs={},
                       parent_id=job["parent_id"], root_id=job["root_id"])
    copies.entered(job["id"])
    try:
        return child(job["position"])
    except Ignore:
        return "ignored"
    finally:
        copies.left(job["id"])
        child.pop_request()


def sent_again(app, job_id):
    """The messages of ``job_id`` waiting in the memory broker (the others are taken off and dropped)."""
    found = []
    with app.connection_for_read() as conn:
        channel = conn.default_channel
        while (message := channel.basic_get(app.conf.task_default_queue, no_ack=True)) is not None:
            if message.headers.get("id") == job_id:
                found.append(message)
    return found


def spawned(app, parent, n=1):
    result = parent.apply(args=(n,), kwargs={"_spawn_config": {"handler": "kids"}})
    with get_state(app).store.read() as conn:
        return [dict(r) for r in conn.execute(sa.select(s.jobs).where(
            s.jobs.c.operation_id == default_operation_id(result.id)).order_by(s.jobs.c.position)).mappings()]


def set_claim(app, job_id, state, worker):
    with get_state(app).store.begin() as conn:
        conn.execute(s.jobs.update().where(s.jobs.c.id == job_id).values(state=state, worker=worker))


@contextlib.contextmanager
def claimed_by_a_live_process(app, job_id):
    """The job's start claimed by a live process of this worker (a sibling pool process), for the block."""
    sibling = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        set_claim(app, job_id, s.STARTED, f"{NODE}/{sibling.pid}")
        yield sibling.pid
    finally:
        sibling.kill()
        sibling.wait()


def dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_a_copy_of_a_succeeded_child_never_runs(guarded):
    app, parent, child, runs = guarded
    [job] = spawned(app, parent)
    set_claim(app, job["id"], s.SUCCEEDED, f"{NODE}/1")
    assert deliver(child, job, redelivered=True) == "ignored"
    assert deliver(child, job, recovered=True) == "ignored"
    assert runs == []


def test_a_copy_of_a_child_claimed_by_a_live_process_comes_back_later(guarded):
    """The claiming pool process is alive, but idle: its attempt ended in a retry the store has not heard yet
    (the write waits for the store). The copy is neither run nor dropped: it is sent again with a countdown,
    and runs when it comes back to find the retry recorded and no other message left."""
    app, parent, child, runs = guarded
    [job] = spawned(app, parent)
    sent_again(app, job["id"])  # the spawn's own message: taken, as a worker had
    with claimed_by_a_live_process(app, job["id"]) as sibling_pid:
        assert deliver(child, job, redelivered=True) == "ignored"
    assert runs == []
    [again] = sent_again(app, job["id"])
    assert again.headers[HEADER_RECOVERED] and again.headers[HEADER_DEFERRALS] == 1
    assert again.headers["eta"] and again.headers["parent_id"] == job["parent_id"]
    set_claim(app, job["id"], s.RETRYING, f"{NODE}/{sibling_pid}")  # the retry's write landed
    assert deliver(child, job, recovered=True, headers={HEADER_DEFERRALS: 1}) == 1
    assert runs == [0]


def test_a_deferred_copy_is_due_on_the_database_servers_clock(guarded, monkeypatch):
    """From a host whose clock runs ten minutes ahead, a copy sent back for a look in 1 s is due 1 s from
    the server's now, not ten minutes later on every other worker."""
    from datetime import datetime, timezone

    from celery_spawn.store import clock

    app, parent, child, runs = guarded
    [job] = spawned(app, parent)
    sent_again(app, job["id"])
    slept: list[float] = []
    monkeypatch.setattr(clock.time, "sleep", slept.append)
    monkeypatch.setattr(clock.OFFSET, "seconds", -600.0)
    with claimed_by_a_live_process(app, job["id"]):
        assert deliver(child, job, redelivered=True) == "ignored"
    [again] = sent_again(app, job["id"])
    due = datetime.fromisoformat(again.headers["eta"])
    assert -600 < (due - datetime.now(timezone.utc)).total_seconds() < -590
    assert slept == [1]  # due at once by this host's clock: the first look's second is waited out here


def test_a_copy_is_looked_at_less_often_the_longer_the_first_runs(guarded):
    app, parent, child, runs = guarded
    [job] = spawned(app, parent)
    sent_again(app, job["id"])
    with claimed_by_a_live_process(app, job["id"]):
        assert deliver(child, job, recovered=True, headers={HEADER_DEFERRALS: 3}) == "ignored"
        [again] = sent_again(app, job["id"])
        assert again.headers[HEADER_DEFERRALS] == 4
    assert [tracker.defer_countdown(n) for n in (0, 1, 3, 6, 50)] == [1, 2, 8, 60, 60]
    assert tracker.defer_countdown(10, visibility_timeout=30) == 15  # Redis would restore it after 30 s
    assert runs == []


def test_a_copy_goes_back_to_the_broker_when_it_cannot_be_sent_for_a_later_look(guarded, monkeypatch):
    app, parent, child, runs = guarded
    [job] = spawned(app, parent)
    fail_publishing(monkeypatch)
    with claimed_by_a_live_process(app, job["id"]), pytest.raises(Reject) as rejected:
        deliver(child, job, redelivered=True)
    assert rejected.value.requeue
    assert runs == []


def test_a_copy_runs_again_a_child_whose_claiming_process_is_gone(guarded):
    app, parent, child, runs = guarded
    [job] = spawned(app, parent)
    set_claim(app, job["id"], s.STARTED, f"{NODE}/{dead_pid()}")
    assert deliver(child, job, redelivered=True) == 1
    assert runs == [0]
    assert get_state(app).store.claim_of(job["id"]) == (s.STARTED, f"{NODE}/{os.getpid()}")


def answer_stats(app, monkeypatch, answers: dict) -> None:
    """Workers answer ``inspect().stats()`` from ``answers`` (worker name -> its stats); the others are silent."""

    class Inspect:
        def __init__(self, destination, timeout):
            self.node = destination[0]

        def stats(self):
            return {self.node: answers[self.node]} if self.node in answers else None

    monkeypatch.setattr(app.control, "inspect", Inspect)


def test_a_copy_of_a_child_claimed_on_another_worker_asks_that_worker(guarded, monkeypatch):
    app, parent, child, runs = guarded
    [job] = spawned(app, parent)
    set_claim(app, job["id"], s.STARTED, "w2@elsewhere/123")
    answers = {"w2@elsewhere": {"pid": 100, "pool": {"processes": [123, 124]}}}
    answer_stats(app, monkeypatch, answers)
    assert deliver(child, job, recovered=True) == "ignored"  # its process 123 is there: the first still runs
    get_state(app).tracker.liveness._nodes.clear()
    answers.clear()
    assert deliver(child, job, recovered=True) == 1  # silence: that worker is gone, run it here
    assert runs == [0]


def test_a_copy_of_a_child_claimed_by_a_former_instance_of_another_worker_runs(guarded, monkeypatch):
    """The claiming worker was restarted under the same name (systemd, a supervisor): it answers, without the pid."""
    app, parent, child, runs = guarded
    [job] = spawned(app, parent)
    set_claim(app, job["id"], s.STARTED, "w2@elsewhere/123")
    answer_stats(app, monkeypatch, {"w2@elsewhere": {"pid": 200, "pool": {"processes": [201, 202]}}})
    assert deliver(child, job, recovered=True) == 1
    assert runs == [0]
    assert get_state(app).store.claim_of(job["id"]) == (s.STARTED, f"{NODE}/{os.getpid()}")


@pytest.mark.parametrize("stats, alive", [
    ({"pid": 123, "pool": {"max-concurrency": 8}}, True),  # threads, gevent: tasks run in the main process
    ({"pid": 9, "pool": {"processes": [123]}}, True),
    ({"pid": 9, "pool": {"processes": [10]}}, False),
    ({"total": {}}, True),  # no process listed at all: taken at its word that it lives
    (None, False),
])
def test_which_stats_replies_hold_the_claiming_process(stats, alive, monkeypatch):
    liveness = copies.Liveness(app=Celery("liveness", broker="memory://", set_as_current=False))
    answer_stats(liveness.app, monkeypatch, {} if stats is None else {"w2@elsewhere": stats})
    assert liveness.still_runs("w2@elsewhere/123", "j", NODE) is alive


def test_a_copy_goes_back_to_the_broker_while_the_claiming_worker_cannot_be_asked(guarded, monkeypatch):
    """Neither run (the first may go on) nor dropped (the first may be gone, and the copy is the last message)."""
    app, parent, child, runs = guarded
    [job] = spawned(app, parent)
    set_claim(app, job["id"], s.STARTED, "w2@elsewhere/123")

    def unreachable(destination, timeout):
        raise ConnectionResetError(104, "Connection reset by peer")

    monkeypatch.setattr(app.control, "inspect", unreachable)
    with pytest.raises(Reject) as rejected:
        deliver(child, job, redelivered=True)
    assert rejected.value.requeue
    assert runs == []
    assert get_state(app).store.claim_of(job["id"]) == (s.STARTED, "w2@elsewhere/123")
    answer_stats(app, monkeypatch, {})  # reachable now: silence
    assert deliver(child, job, redelivered=True) == 1  # the unknown answer was not cached
    assert runs == [0]


@pytest.fixture()
def spawntask_child(store_url):
    app, parent, child, runs = tracked_app(store_url, spawned_children=True)
    yield app, parent, child, runs
    get_state(app).store.dispose()


def test_a_retry_never_runs_beside_a_copy_that_runs_in_another_process(spawntask_child):
    """A child sent twice (a scheduler's publish whose mark was lost): one message's first attempt waited for
    the store and retried; the other copy started meanwhile. The retry is sent again for a later look, and
    runs only once that copy is gone."""
    app, parent, child, runs = spawntask_child
    [job] = spawned(app, parent)
    sent_again(app, job["id"])
    with claimed_by_a_live_process(app, job["id"]):
        assert deliver(child, job, retries=1) == "ignored"
        [again] = sent_again(app, job["id"])
        assert again.headers[HEADER_RECOVERED] and again.headers["retries"] == 1
        assert runs == []
    assert deliver(child, job, retries=1) == 1  # that run is gone: the retry runs
    assert runs == [0]


def test_a_retry_runs_after_its_own_attempt_or_a_recorded_retry(spawntask_child):
    app, parent, child, runs = spawntask_child
    first, second = spawned(app, parent, 2)
    set_claim(app, first["id"], s.STARTED, f"{NODE}/{os.getpid()}")  # the attempt before, in this process
    assert deliver(child, first, retries=1) == 1
    set_claim(app, second["id"], s.RETRYING, f"{NODE}/{os.getpid() + 1}")
    assert deliver(child, second, retries=3) == 2
    assert runs == [0, 1]


def test_a_retry_of_a_finished_child_never_runs(spawntask_child):
    app, parent, child, runs = spawntask_child
    [job] = spawned(app, parent)
    set_claim(app, job["id"], s.SUCCEEDED, f"{NODE}/{os.getpid()}")
    assert deliver(child, job, retries=1) == "ignored"
    assert runs == []


def test_first_deliveries_do_not_claim_in_the_task_path(store_url):
    app, parent, child, runs = tracked_app(store_url)
    guard_copies(app)
    [job] = spawned(app, parent)
    set_claim(app, job["id"], s.SUCCEEDED, None)  # a first delivery is not checked: no round trip
    assert deliver(child, job) == 1
    assert getattr(child.run, "__spawn_guarded__", False)
    guard_copies(app)  # idempotent: wrapped once
    assert not getattr(child.run.__wrapped__, "__spawn_guarded__", False)
    get_state(app).store.dispose()


def test_the_same_process_tells_a_second_run_of_a_job_from_the_copy_itself():
    liveness = copies.Liveness(app=None)
    me = f"{NODE}/{os.getpid()}"
    copies.entered("j")
    try:
        assert liveness.still_runs(me, "j", NODE) is False  # only the copy itself runs here
        copies.entered("j")
        assert liveness.still_runs(me, "j", NODE) is True  # a threads pool: the first runs beside it
    finally:
        copies.left("j")
        copies.left("j")
    assert copies._running_here == {}
    assert liveness.still_runs(None, "j", NODE) is False  # no claim recorded: it tells nothing
    assert liveness.still_runs("garbage", "j", NODE) is False


def test_a_claim_of_a_process_of_a_former_worker_with_the_same_name_has_ended():
    """A worker restarted under its old name: a pid of the former instance is no process of this one."""
    import signal
    import subprocess

    liveness = copies.Liveness(app=None)
    # a process that is neither this process's child nor its sibling (its shell parent exits at once)
    orphan = int(subprocess.run(["sh", "-c", "sleep 30 >/dev/null 2>&1 & echo $!"], capture_output=True,
                                text=True, check=True).stdout)
    try:
        assert copies._pid_alive(orphan)
        assert liveness.still_runs(f"{NODE}/{orphan}", "j", NODE) is False
    finally:
        os.kill(orphan, signal.SIGKILL)


def test_a_claim_of_a_sibling_pool_process_still_runs():
    """Two processes with the same parent, as two pool processes of one worker: the sibling's run goes on."""
    import multiprocessing

    liveness = copies.Liveness(app=None)
    ctx = multiprocessing.get_context("fork")
    asked = ctx.Queue()

    def ask(sibling_pid: int) -> None:
        asked.put(liveness.still_runs(f"{NODE}/{sibling_pid}", "j", NODE))

    sibling = ctx.Process(target=__import__("time").sleep, args=(30,))
    sibling.start()
    try:
        asker = ctx.Process(target=ask, args=(sibling.pid,))
        asker.start()
        asker.join(10)
        assert asked.get(timeout=5) is True
    finally:
        sibling.kill()
        sibling.join()


@pytest.mark.parametrize("spawntask", [False, True], ids=["plain", "spawntask"])
def test_a_recovered_copy_of_a_run_that_succeeded_before_the_store_heard_is_not_run(store_url, tmp_path, spawntask):
    """The run succeeded (the result backend has it) while the store was out, so the store still says
    started, by this very process: the sweep's copy must not run the body again."""
    from celery import states

    app, parent, child, runs = tracked_app(store_url, backend=f"db+sqlite:///{tmp_path / 'results.sqlite'}",
                                           spawned_children=spawntask)
    guard_copies(app)
    [job] = spawned(app, parent)
    set_claim(app, job["id"], s.STARTED, f"{NODE}/{os.getpid()}")
    app.backend.store_result(job["id"], 0, states.SUCCESS)
    assert deliver(child, job, recovered=True) == "ignored"
    assert runs == []
    assert get_state(app).store.claim_of(job["id"])[0] == s.SUCCEEDED
    get_state(app).store.dispose()


def test_an_attempt_that_could_not_claim_for_the_store_records_no_retry(spawntask_child, monkeypatch):
    """Seed 1605: an attempt waited for the store before claiming and retried; its retry's write reached the
    store after a copy had claimed the start, freed it (``retrying``), and the next message ran the child
    a second time. An attempt that never claimed never started: its retry is not recorded."""
    from celery.exceptions import Retry

    from celery_spawn import hooks
    from celery_spawn.errors import StoreError

    app, parent, child, runs = spawntask_child
    [job] = spawned(app, parent)
    store = get_state(app).store

    def store_out(*args, **kwargs):
        raise StoreError("spawn store failed: connection refused")

    with monkeypatch.context() as patched:
        patched.setattr(store, "claim_start", store_out)
        child.push_request(id=job["id"], called_directly=False, delivery_info={}, hostname=NODE, retries=0,
                           headers={HEADER_OPERATION: job["operation_id"]}, args=(job["position"],), kwargs={},
                           parent_id=job["parent_id"], root_id=job["root_id"])
        try:
            with pytest.raises(Retry):
                child(job["position"])
            waited = child.request
        finally:
            child.pop_request()
    assert runs == []
    set_claim(app, job["id"], s.STARTED, f"{NODE}/{os.getpid() + 1}")  # a copy claimed it meanwhile
    hooks._on_retry(sender=child, request=waited, reason=StoreError("spawn store failed"))
    assert store.claim_of(job["id"]) == (s.STARTED, f"{NODE}/{os.getpid() + 1}")
    waited.spawn_unclaimed = False  # an attempt that had claimed: its retry is recorded
    hooks._on_retry(sender=child, request=waited, reason=ValueError("boom"))
    assert store.claim_of(job["id"])[0] == s.RETRYING


def test_a_child_that_ended_in_this_process_never_runs_here_again(spawntask_child):
    """Seed 1605 again: a copy ran the child and succeeded in this pool process, whose tracking writes were
    waiting for the store; a Celery retry of another message then found the start claimed by this very
    process and took it for its own attempt's. The process knows the body ended: no message runs it again."""
    app, parent, child, runs = spawntask_child
    first, second = spawned(app, parent, 2)
    me = f"{NODE}/{os.getpid()}"
    set_claim(app, first["id"], s.STARTED, me)  # the success not written yet
    set_claim(app, second["id"], s.RETRYING, me)  # a late retry write freed the start
    for job in (first, second):
        copies.finished(job["id"])
    try:
        assert deliver(child, first, retries=2) == "ignored"
        assert deliver(child, first, redelivered=True) == "ignored"
        assert deliver(child, second) == "ignored"
        assert runs == []
    finally:
        for job in (first, second):
            copies._finished_here.pop(job["id"], None)
    assert deliver(child, first, retries=2) == 1  # not known here: its own attempt's claim, taken over
    assert runs == [0]


def test_finished_jobs_are_remembered_up_to_a_bound(monkeypatch):
    monkeypatch.setattr(copies, "_finished_here", __import__("collections").OrderedDict())
    monkeypatch.setattr(copies, "FINISHED_REMEMBERED", 3)
    for job_id in "abcd":
        copies.finished(job_id)
    copies.finished("b")  # seen again: the newest
    copies.finished("e")
    assert list(copies._finished_here) == ["d", "b", "e"]
    assert copies.finished_here("e") and not copies.finished_here("a")


def _claim_then_lose_the_answer(store, monkeypatch):
    """The next claim reaches the store and commits, and its caller sees the connection drop."""
    from celery_spawn.errors import StoreError

    real = store.claim_start

    def committed_then_lost(*args, **kwargs):
        monkeypatch.setattr(store, "claim_start", real)
        real(*args, **kwargs)
        raise StoreError("spawn store failed: OperationalError: server closed the connection unexpectedly")

    monkeypatch.setattr(store, "claim_start", committed_then_lost)


def test_a_claim_whose_answer_was_lost_is_let_go_once_its_attempt_ends(spawntask_child, monkeypatch):
    """The double-outage flake: a claim committed while its process saw the store drop, and that attempt
    retried. The store said ``started`` by a live sibling, so every delivery landing in the other pool
    process was sent back for a later look, as long as none landed in the claimant. Once the attempt has
    ended, its process lets go of the claim it could not confirm: the next delivery runs the child."""
    from celery.exceptions import Retry

    from celery_spawn import hooks

    app, parent, child, runs = spawntask_child
    [job] = spawned(app, parent)
    store = get_state(app).store
    me = f"{NODE}/{os.getpid()}"
    _claim_then_lose_the_answer(store, monkeypatch)
    child.push_request(id=job["id"], called_directly=False, delivery_info={}, hostname=NODE, retries=0,
                       headers={HEADER_OPERATION: job["operation_id"]}, args=(job["position"],), kwargs={},
                       parent_id=job["parent_id"], root_id=job["root_id"])
    copies.entered(job["id"])
    try:
        with pytest.raises(Retry):
            child(job["position"])
        assert store.claim_of(job["id"]) == (s.STARTED, me)  # written, though the attempt never knew
    finally:
        hooks._on_postrun(sender=child, task_id=job["id"], task=child)  # the attempt ends
        child.pop_request()
    assert store.claim_of(job["id"]) == (s.RETRYING, None)
    assert not copies.left_unconfirmed(job["id"])  # let go once
    assert deliver(child, job, retries=1, node="w2@host") == 1  # the retry, wherever it lands, runs
    assert runs == [0]


def test_an_unconfirmed_claim_is_kept_while_a_run_of_the_job_goes_on_here(spawntask_child):
    app, parent, child, runs = spawntask_child
    first, second = spawned(app, parent, 2)
    tracker = get_state(app).tracker
    tracker.worker = me = f"{NODE}/{os.getpid()}"
    set_claim(app, first["id"], s.STARTED, me)
    set_claim(app, second["id"], s.STARTED, f"{NODE}/{os.getpid() + 1}")
    copies.entered(first["id"])  # a later delivery runs it here now: the claim is that run's
    try:
        tracker.free_claim(first["id"])
    finally:
        copies.left(first["id"])
    tracker.free_claim(second["id"])  # another process's claim: never let go from here
    assert get_state(app).store.claim_of(first["id"]) == (s.STARTED, me)
    assert get_state(app).store.claim_of(second["id"]) == (s.STARTED, f"{NODE}/{os.getpid() + 1}")
    tracker.free_claim(first["id"])
    assert get_state(app).store.claim_of(first["id"]) == (s.RETRYING, None)


def test_the_write_behind_lets_an_unconfirmed_claim_go_once_the_store_answers(spawntask_child, monkeypatch):
    from celery_spawn.engine.writebehind import UNCLAIM, Event, WriteBehind
    from celery_spawn.errors import StoreError

    app, parent, child, runs = spawntask_child
    [job] = spawned(app, parent)
    tracker = get_state(app).tracker
    tracker.worker = me = f"{NODE}/{os.getpid()}"
    set_claim(app, job["id"], s.STARTED, me)
    store = get_state(app).store
    real, outages = store.free_claim, [StoreError("spawn store failed: connection refused")]

    def out_once(*args):
        if outages:
            raise outages.pop()
        return real(*args)

    monkeypatch.setattr(store, "free_claim", out_once)
    queue = WriteBehind(tracker)
    queue.add(Event(UNCLAIM, job["id"]))
    assert queue.flush(10)
    assert outages == [] and store.claim_of(job["id"]) == (s.RETRYING, None)


def test_no_run_of_a_job_enters_while_its_claim_is_let_go():
    import threading

    entered = threading.Event()
    with copies.freeing("j") as free:
        assert free
        thread = threading.Thread(target=lambda: (copies.entered("j"), entered.set()), daemon=True)
        thread.start()
        assert not entered.wait(0.2)
    assert entered.wait(5)
    with copies.freeing("j") as free:
        assert not free  # it runs here now
    copies.left("j")
