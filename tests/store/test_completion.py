"""SpawnStore completion: when an operation may complete, its rollup, and what completing writes."""
from __future__ import annotations

from datetime import datetime, timedelta

import pytest

from celery_spawn.store import schema as s
from tests.store.helpers import ago, job_row, op_row, operation, seed, set_job, set_operation

T = datetime(2024, 3, 4, 5, 6, 7)


def timed(job_id, state, position, seconds, **over):
    """A child of op started at T and finished ``seconds`` later (None: never started)."""
    started = T if seconds is not None else None
    finished = T + timedelta(seconds=seconds or 0) if state in s.FINAL_JOB_STATES else None
    return job_row(job_id, "op", position=position, state=state, started_at=started, finished_at=finished, **over)


@pytest.fixture
def finished_op(store):
    """op: a succeeded 1.5s, b succeeded 3.25s, c failed 0.5s (error boom), d cancelled without a start."""
    seed(store, [op_row("op", total=4)],
         [timed("a", s.SUCCEEDED, 0, 1.5), timed("b", s.SUCCEEDED, 1, 3.25),
          timed("c", s.FAILED, 2, 0.5, error="boom"), timed("d", s.CANCELLED, 3, None, error="dependency c failed")])
    return store


ROLLUP = {"children_cancelled": 1, "children_failed": 1, "children_revoked": 0, "children_succeeded": 2,
          "children_lost": 0, "children_timed": 3}


def test_completion_candidate_of_a_finished_operation(finished_op):
    op, counts, rollup = finished_op.completion_candidate("op")
    assert op["id"] == "op" and op["total"] == 4
    assert counts == {s.SUCCEEDED: 2, s.FAILED: 1, s.CANCELLED: 1}
    assert {k: rollup[k] for k in ROLLUP} == ROLLUP
    assert rollup["children_seconds"] == pytest.approx(5.25, abs=1e-3)
    assert rollup["children_max_seconds"] == pytest.approx(3.25, abs=1e-3)
    assert set(rollup) == set(ROLLUP) | {"children_seconds", "children_max_seconds"}


@pytest.mark.parametrize("state", [s.PENDING, s.HELD, s.DISPATCHED, s.STARTED, s.RETRYING])
def test_completion_candidate_is_none_while_a_child_is_unfinished(finished_op, state):
    seed(finished_op, [], [timed("e", state, 4, None)])
    assert finished_op.completion_candidate("op") == (None, {}, {})


def test_completion_candidate_of_unknown_completed_and_refused_operations(store):
    seed(store, [op_row("done", state=s.OP_SUCCEEDED, total=1), op_row("refused", state=s.OP_FAILED, total=0)],
         [job_row("x", "done", state=s.SUCCEEDED)])
    assert store.completion_candidate("nope") == (None, {}, {})
    op, counts, rollup = store.completion_candidate("done")
    assert op["id"] == "done" and bool(op["completed"]) is True and (counts, rollup) == ({}, {})
    op, counts, rollup = store.completion_candidate("refused")
    assert op["id"] == "refused" and (counts, rollup) == ({}, {})


def test_completion_candidate_waits_for_descendants_when_asked(store):
    seed(store, [op_row("op", total=1, wait_for_descendants=True), op_row("op-a", parent="a", total=1),
                 op_row("op-a0", parent="a0", total=1), op_row("quick", parent="q", total=1)],
         [job_row("a", "op", state=s.SUCCEEDED), job_row("a0", "op-a", parent="a", state=s.SUCCEEDED),
          job_row("a00", "op-a0", parent="a0", state=s.STARTED),
          job_row("q", "op", position=1, state=s.SUCCEEDED), job_row("q0", "quick", parent="q", state=s.STARTED)])
    set_operation(store, "quick", wait_for_descendants=False)
    assert store.completion_candidate("op") == (None, {}, {})  # a grandchild's child is running
    assert store.completion_candidate("quick") == (None, {}, {})  # its own child is running
    set_job(store, "a00", state=s.SUCCEEDED)
    assert store.completion_candidate("op") == (None, {}, {})  # op-a and op-a0 are not complete yet
    set_operation(store, "op-a", completed=True, state=s.OP_SUCCEEDED)
    set_operation(store, "op-a0", completed=True, state=s.OP_SUCCEEDED)
    set_job(store, "q0", state=s.SUCCEEDED)
    set_operation(store, "quick", completed=True, state=s.OP_SUCCEEDED)
    op, counts, _ = store.completion_candidate("op")
    assert op["id"] == "op" and counts == {s.SUCCEEDED: 2}
    set_operation(store, "op", wait_for_descendants=False)
    set_operation(store, "op-a", completed=False, state=s.OP_RUNNING)
    assert store.completion_candidate("op")[1] == {s.SUCCEEDED: 2}  # without waiting, the children suffice


def test_complete_operation_once(finished_op):
    store = finished_op
    _, _, rollup = store.completion_candidate("op")
    assert store.complete_operation("op", s.OP_PARTIALLY_FAILED, rollup, with_callback=True) is True
    assert store.complete_operation("op", s.OP_SUCCEEDED, {}, with_callback=False) is False
    assert store.complete_operation("nope", s.OP_SUCCEEDED, {}, with_callback=False) is False
    got = operation(store, "op")
    assert (got["state"], bool(got["completed"]), got["callback_state"]) == (
        s.OP_PARTIALLY_FAILED, True, s.CALLBACK_PENDING)
    assert got["finished_at"] > ago(60) and got["updated_at"] == got["finished_at"]
    assert {k: got[k] for k in ROLLUP} == ROLLUP
    assert got["children_seconds"] == pytest.approx(5.25, abs=1e-3)
    assert store.completion_candidate("op") == (got, {}, {})


def test_complete_operation_without_a_callback(store):
    seed(store, [op_row("op", total=0)])
    assert store.complete_operation("op", s.OP_SUCCEEDED, {}, with_callback=False) is True
    got = operation(store, "op")
    assert (got["state"], bool(got["completed"]), got["callback_state"]) == (s.OP_SUCCEEDED, True, None)
    assert got["children_succeeded"] is None


def test_parent_operation(store):
    seed(store, [op_row("op", total=1), op_row("op-a", parent="a", total=1), op_row("op-x", parent="gone")],
         [job_row("root", None, parent=None, state=s.STARTED), job_row("a", "op"),
          job_row("a0", "op-a", parent="a")])
    assert store.parent_operation("op-a") == "op"
    assert store.parent_operation("op") is None  # root was not spawned
    assert store.parent_operation("op-x") is None  # its parent job is not recorded
    assert store.parent_operation("nope") is None


def test_child_counts(finished_op):
    assert finished_op.child_counts("op") == {s.SUCCEEDED: 2, s.FAILED: 1, s.CANCELLED: 1}
    seed(finished_op, [], [timed("e", s.STARTED, 4, None)])
    assert finished_op.child_counts("op") == {s.SUCCEEDED: 2, s.FAILED: 1, s.CANCELLED: 1, s.STARTED: 1}
    assert finished_op.child_counts("nope") == {}


def test_summary_rows(finished_op):
    failures, succeeded = finished_op.summary_rows("op", 10)
    assert failures == [{"id": "c", "state": s.FAILED, "error": "boom"},
                        {"id": "d", "state": s.CANCELLED, "error": "dependency c failed"}]
    assert succeeded == ["a", "b"]
    failures, succeeded = finished_op.summary_rows("op", 1)
    assert [f["id"] for f in failures] == ["c"] and succeeded == ["a", "b"]  # one more success: "and more"
    assert finished_op.summary_rows("nope", 5) == ([], [])


def test_set_callback_state(store):
    seed(store, [op_row("op", state=s.OP_SUCCEEDED, created=ago(3600), error="kept", callback_state="pending")])
    store.set_callback_state("op", s.CALLBACK_SENT)
    got = operation(store, "op")
    assert (got["callback_state"], got["error"]) == (s.CALLBACK_SENT, "kept") and got["updated_at"] > ago(60)
    store.set_callback_state("op", s.CALLBACK_FAILED, error="broker down")
    got = operation(store, "op")
    assert (got["callback_state"], got["error"]) == (s.CALLBACK_FAILED, "broker down")


def test_tally(finished_op):
    with finished_op.read() as conn:
        counts, rollup = finished_op.tally(conn, "op")
        assert finished_op.tally(conn, "nope") == ({}, {**{c: 0 for c in s.CHILD_COUNT_COLUMNS.values()},
                                                        "children_timed": 0, "children_seconds": 0.0,
                                                        "children_max_seconds": None})
    assert counts == {s.SUCCEEDED: 2, s.FAILED: 1, s.CANCELLED: 1}
    assert {k: rollup[k] for k in ROLLUP} == ROLLUP
    seed(finished_op, [], [timed("e", s.RETRYING, 4, None)])
    with finished_op.read() as conn:
        assert finished_op.tally(conn, "op") == ({s.SUCCEEDED: 2, s.FAILED: 1, s.CANCELLED: 1, s.RETRYING: 1}, {})
