"""SpawnStore cancels: the unfinished jobs of a subtree, and what cancelling makes of each."""
from __future__ import annotations

import pytest

from celery_spawn.store import Cancelled, Finish, utcnow
from celery_spawn.store import schema as s
from tests.store.helpers import edge, job, job_row, op_row, seed, states


@pytest.fixture
def nested(store):
    """root spawns op: a (started), b (succeeded), c (pending), d (held);
    a spawns op-a: a0 (dispatched), a1 (failed); a0 spawns op-a0: a00 (retrying), a01 (cancelled)."""
    seed(store,
         [op_row("op", total=4), op_row("op-a", parent="a", total=2), op_row("op-a0", parent="a0", total=2),
          op_row("elsewhere", parent="z", total=1)],
         [job_row("root", None, parent=None, state=s.STARTED),
          job_row("a", "op", state=s.STARTED), job_row("b", "op", position=1, state=s.SUCCEEDED),
          job_row("c", "op", position=2), job_row("d", "op", position=3, state=s.HELD, pending_deps=1),
          job_row("a0", "op-a", parent="a", state=s.DISPATCHED),
          job_row("a1", "op-a", parent="a", position=1, state=s.FAILED),
          job_row("a00", "op-a0", parent="a0", state=s.RETRYING),
          job_row("a01", "op-a0", parent="a0", position=1, state=s.CANCELLED),
          job_row("z0", "elsewhere", parent="z")])
    return store


def unfinished(store, **where):
    with store.read() as conn:
        return sorted(store.unfinished_jobs(conn, **where), key=lambda j: j["id"])


def test_unfinished_jobs_below_an_operation_recurse_over_nested_spawns(nested):
    found = unfinished(nested, operation_id="op")
    assert found == [
        {"id": "a", "state": s.STARTED, "operation_id": "op"},
        {"id": "a0", "state": s.DISPATCHED, "operation_id": "op-a"},
        {"id": "a00", "state": s.RETRYING, "operation_id": "op-a0"},
        {"id": "c", "state": s.PENDING, "operation_id": "op"},
        {"id": "d", "state": s.HELD, "operation_id": "op"},
    ]
    assert [j["id"] for j in unfinished(nested, operation_id="op-a0")] == ["a00"]
    assert unfinished(nested, operation_id="none") == []


def test_unfinished_jobs_below_a_job_leave_the_job_out(nested):
    assert [j["id"] for j in unfinished(nested, below_job="a")] == ["a0", "a00"]
    assert [j["id"] for j in unfinished(nested, below_job="root")] == ["a", "a0", "a00", "c", "d"]
    assert unfinished(nested, below_job="a00") == []
    assert unfinished(nested, below_job="nope") == []


def test_cancel_jobs_cancels_waiting_jobs_revokes_dispatched_ones_and_asks_running_ones_to_stop(nested):
    store = nested
    with store.begin() as conn:
        done = store.cancel_jobs(conn, store.unfinished_jobs(conn, operation_id="op"), "cancelled by test")
    assert isinstance(done, Cancelled)
    assert sorted(done.cancelled) == ["c", "d"] and done.revoked == ["a0"]
    assert sorted(done.requested) == ["a", "a00"] and done.still_running == []
    # a running job keeps its state until its real outcome arrives: a revoke does not stop it
    assert states(store, "a", "a0", "a00", "b", "c", "d", "a1", "z0") == {
        "a": s.STARTED, "a0": s.REVOKED, "a00": s.RETRYING, "c": s.CANCELLED, "d": s.CANCELLED,
        "b": s.SUCCEEDED, "a1": s.FAILED, "z0": s.PENDING}
    for job_id in ("a0", "c"):
        row = job(store, job_id)
        assert row["error"] == "cancelled by test" and row["finished_at"] is not None
    for job_id in ("a", "a00"):
        row = job(store, job_id)
        assert row["error"] == "cancel requested: cancelled by test" and row["finished_at"] is None
    assert job(store, "b")["error"] is None


def test_cancel_jobs_with_terminate_revokes_running_jobs_too(nested):
    store = nested
    with store.begin() as conn:
        done = store.cancel_jobs(conn, store.unfinished_jobs(conn, operation_id="op"), "killed", terminate=True)
    assert sorted(done.cancelled) == ["c", "d"] and sorted(done.revoked) == ["a", "a0", "a00"]
    assert done.requested == [] and done.still_running == []
    assert states(store, "a", "a0", "a00") == {"a": s.REVOKED, "a0": s.REVOKED, "a00": s.REVOKED}


def test_cancel_jobs_store_only_leaves_running_jobs_to_their_workers(nested):
    store = nested
    with store.begin() as conn:
        done = store.cancel_jobs(conn, store.unfinished_jobs(conn, operation_id="op"), "web", store_only=True)
    assert sorted(done.cancelled) == ["c", "d"] and done.revoked == []
    assert sorted(done.still_running) == ["a", "a0", "a00"]
    assert states(store, "a", "a0", "a00", "c", "d") == {
        "a": s.STARTED, "a0": s.DISPATCHED, "a00": s.RETRYING, "c": s.CANCELLED, "d": s.CANCELLED}
    assert job(store, "a0")["error"] is None and job(store, "a0")["finished_at"] is None


def test_cancel_jobs_keeps_the_real_outcome_of_a_job_that_ended_meanwhile(nested):
    store = nested
    with store.begin() as conn:
        stale = store.unfinished_jobs(conn, operation_id="op")
    with store.begin() as conn:
        store.finish_and_release(conn, [Finish(j, s.SUCCEEDED, None, utcnow()) for j in ("a", "c")], 60)
    with store.begin() as conn:
        store.cancel_jobs(conn, stale, "too late")
    assert states(store, "a", "c", "d", "a0") == {"a": s.SUCCEEDED, "c": s.SUCCEEDED, "d": s.CANCELLED,
                                                  "a0": s.REVOKED}
    assert job(store, "a")["error"] is None and job(store, "c")["error"] is None


def test_cancel_jobs_revokes_a_job_dispatched_after_it_was_read(nested):
    """The engine reads the unfinished jobs, then cancels them; a publisher may mark one dispatched between
    the two (nothing locks the rows read on MariaDB's READ COMMITTED). Its message is out: it must come back
    revoked (for the broker), not reported cancelled while it stays dispatched and runs."""
    store = nested
    with store.begin() as conn:
        stale = store.unfinished_jobs(conn, operation_id="op")
    assert store.mark_dispatched(["c"]) == 1  # published between the read and the cancel
    with store.begin() as conn:
        done = store.cancel_jobs(conn, stale, "cancel")
    assert states(store, "c") == {"c": s.REVOKED}
    assert "c" not in done.cancelled and "c" in done.revoked


def test_cancel_jobs_of_nothing(store):
    with store.begin() as conn:
        assert store.cancel_jobs(conn, [], "nothing") == Cancelled([], [], [])
        assert store.cancel_jobs(conn, [], "nothing", store_only=True) == Cancelled([], [], [])


def test_cancel_dependents_level_by_level(store):
    seed(store, [op_row("op", total=7)],
         [job_row("f", "op", state=s.FAILED),
          job_row("l1", "op", position=1, state=s.HELD, pending_deps=1),
          job_row("l1p", "op", position=2, pending_deps=0),
          job_row("l2", "op", position=3, state=s.HELD, pending_deps=1),
          job_row("ignores", "op", position=4, state=s.HELD, pending_deps=1),
          job_row("out", "op", position=5, state=s.DISPATCHED),
          job_row("below_out", "op", position=6, state=s.HELD, pending_deps=1)],
         [edge("l1", "f"), edge("l1p", "f"), edge("l2", "l1"), edge("ignores", "f", ignore_failure=True),
          edge("out", "f"), edge("below_out", "out")])
    with store.begin() as conn:
        cancelled = store.cancel_dependents(conn, ["f"], "dependency f failed")
    assert sorted(cancelled[:2]) == ["l1", "l1p"] and cancelled[2:] == ["l2"]
    assert states(store, "l1", "l1p", "l2", "ignores", "out", "below_out") == {
        "l1": s.CANCELLED, "l1p": s.CANCELLED, "l2": s.CANCELLED, "ignores": s.HELD, "out": s.DISPATCHED,
        "below_out": s.HELD}
    assert {job(store, j)["error"] for j in ("l1", "l1p", "l2")} == {"dependency f failed"}
    with store.begin() as conn:
        assert store.cancel_dependents(conn, ["f"], "again") == []
        assert store.cancel_dependents(conn, [], "none") == []

