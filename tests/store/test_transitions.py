"""SpawnStore job transitions: starts, retries, finishes and the releases and cancels that follow them."""
from __future__ import annotations

from datetime import datetime

import pytest

from celery_spawn.protocol import STARTABLE
from celery_spawn.store import Finish, Finished
from celery_spawn.store import schema as s
from celery_spawn.store.dialects import RELEASED_COLUMNS
from tests.store.helpers import ago, edge, edges_of, job, job_row, op_row, operation, seed, states

AT = datetime(2024, 1, 2, 3, 4, 5, 678901)


def finish(job_id, state=s.SUCCEEDED, error=None, started=None):
    return Finish(job_id, state, error, AT, started)


def finish_and_release(store, *finishes, grace=60.0) -> Finished:
    with store.begin() as conn:
        return store.finish_and_release(conn, list(finishes), grace)


# ---- starts and retries -------------------------------------------------------------------------
def test_claim_start(store):
    seed(store, [op_row("op", total=4)],
         [job_row("d", "op", state=s.DISPATCHED), job_row("f", "op", position=1, state=s.SUCCEEDED),
          job_row("p", "op", position=2), job_row("r", "op", position=3, state=s.RETRYING)])
    assert store.claim_start("d", [s.DISPATCHED, s.RETRYING]) is True
    started = job(store, "d")
    assert started["state"] == s.STARTED and started["started_at"] > ago(60)
    assert store.claim_start("d", [s.DISPATCHED, s.RETRYING]) is False  # started is not startable here
    assert store.claim_start("f", STARTABLE) is False  # final
    assert store.claim_start("p", [s.DISPATCHED]) is False
    assert store.claim_start("r", STARTABLE) is True
    assert store.claim_start("nope", STARTABLE) is None
    assert states(store, "d", "f", "p", "r") == {"d": s.STARTED, "f": s.SUCCEEDED, "p": s.PENDING, "r": s.STARTED}
    assert job(store, "f")["started_at"] is None


def test_job_state(store):
    seed(store, [], [job_row("h", state=s.HELD)])
    assert store.job_state("h") == s.HELD
    assert store.job_state("nope") is None


def test_mark_retrying_counts_retries_and_leaves_final_jobs(store):
    seed(store, [], [job_row("j", state=s.STARTED), job_row("done", position=1, state=s.FAILED, error="real")])
    store.mark_retrying("j", "first")
    store.mark_retrying("j", "second")
    got = job(store, "j")
    assert (got["state"], got["retries"], got["error"]) == (s.RETRYING, 2, "second")
    store.mark_retrying("done", "late")
    store.mark_retrying("nope", "x")
    done = job(store, "done")
    assert (done["state"], done["retries"], done["error"]) == (s.FAILED, 0, "real")


def test_start_jobs_writes_each_jobs_own_time(store):
    seed(store, [], [job_row("a", state=s.DISPATCHED), job_row("b", position=1, state=s.RETRYING),
                     job_row("c", position=2, state=s.SUCCEEDED), job_row("d", position=3, state=s.HELD)])
    other = datetime(2024, 1, 2, 3, 4, 6, 1)
    store.start_jobs([("a", AT), ("b", other), ("c", AT), ("d", AT), ("nope", AT)], [s.DISPATCHED, s.RETRYING])
    assert states(store, "a", "b", "c", "d") == {"a": s.STARTED, "b": s.STARTED, "c": s.SUCCEEDED, "d": s.HELD}
    assert job(store, "a")["started_at"] == AT and job(store, "b")["started_at"] == other
    assert job(store, "c")["started_at"] is None and job(store, "d")["started_at"] is None
    store.start_jobs([], STARTABLE)


# ---- finishes -----------------------------------------------------------------------------------
def test_the_first_finish_wins(store):
    seed(store, [op_row("op", total=2)], [job_row("a", "op", state=s.STARTED, started_at=AT),
                                          job_row("b", "op", position=1, state=s.DISPATCHED)])
    first = finish_and_release(store, finish("a"), finish("b", s.FAILED, "boom", started=AT))
    assert first == Finished({"a": "op", "b": "op"}, [], [])
    second = finish_and_release(store, finish("a", s.FAILED, "late"), finish("b"), finish("nope"))
    assert second == Finished({}, [], [])
    a, b = job(store, "a"), job(store, "b")
    assert (a["state"], a["error"], a["finished_at"], a["started_at"]) == (s.SUCCEEDED, None, AT, AT)
    assert (b["state"], b["error"], b["finished_at"], b["started_at"]) == (s.FAILED, "boom", AT, AT)


def test_a_finish_keeps_a_start_already_written(store):
    seed(store, [], [job_row("a", None, state=s.STARTED, started_at=datetime(2024, 1, 1))])
    won = finish_and_release(store, finish("a", started=AT))
    assert won.won == {"a": None}
    assert job(store, "a")["started_at"] == datetime(2024, 1, 1)


def test_a_success_releases_dependents_whose_last_dependency_it_was(store):
    seed(store, [op_row("op", total=4, created=ago(3600))],
         [job_row("a", "op", state=s.STARTED), job_row("x", "op", position=1, state=s.STARTED),
          job_row("b", "op", position=2, state=s.HELD, pending_deps=1),
          job_row("c", "op", position=3, state=s.HELD, pending_deps=2)],
         [edge("b", "a"), edge("c", "a"), edge("c", "x")])
    done = finish_and_release(store, finish("a"))
    assert done.won == {"a": "op"} and done.to_revoke == []
    assert done.released == [{"id": "b", "parent_id": "root", "root_id": "root", "message": '{"id": "b"}',
                               "operation_id": "op"}]
    assert set(done.released[0]) == set(RELEASED_COLUMNS)
    assert states(store, "b", "c") == {"b": s.PENDING, "c": s.HELD}
    assert (job(store, "b")["pending_deps"], job(store, "c")["pending_deps"]) == (0, 1)
    assert edges_of(store, "c") == {"a": (False, True), "x": (False, False)}
    assert operation(store, "op")["updated_at"] > ago(60)  # lease taken for the released child
    last = finish_and_release(store, finish("x"))
    assert [r["id"] for r in last.released] == ["c"] and states(store, "c") == {"c": s.PENDING}


def test_a_failure_cancels_dependents_level_by_level(store):
    seed(store, [op_row("op", total=6)],
         [job_row("a", "op", state=s.STARTED),
          job_row("b", "op", position=1, state=s.HELD, pending_deps=1),
          job_row("c", "op", position=2, state=s.HELD, pending_deps=1),
          job_row("tolerant", "op", position=3, state=s.HELD, pending_deps=1),
          job_row("after", "op", position=4, state=s.HELD, pending_deps=1),
          job_row("sibling", "op", position=5, state=s.DISPATCHED)],
         [edge("b", "a"), edge("c", "b"), edge("tolerant", "a", ignore_failure=True), edge("after", "tolerant")])
    done = finish_and_release(store, finish("a", s.FAILED, "boom"))
    assert done.won == {"a": "op"} and done.to_revoke == []
    assert [r["id"] for r in done.released] == ["tolerant"]
    assert states(store, "b", "c", "tolerant", "after", "sibling") == {
        "b": s.CANCELLED, "c": s.CANCELLED, "tolerant": s.PENDING, "after": s.HELD, "sibling": s.DISPATCHED}
    assert job(store, "b")["error"] == "dependency a failed" and job(store, "c")["error"] == "dependency a failed"
    assert job(store, "c")["finished_at"] is not None


@pytest.mark.parametrize("ending", [s.REVOKED, s.CANCELLED])
def test_other_endings_cancel_dependents_but_do_not_fail_fast(store, ending):
    seed(store, [op_row("op", total=3, fail_fast=True)],
         [job_row("a", "op", state=s.DISPATCHED), job_row("b", "op", position=1, state=s.HELD, pending_deps=1),
          job_row("c", "op", position=2, state=s.DISPATCHED)],
         [edge("b", "a")])
    done = finish_and_release(store, finish("a", ending))
    assert done == Finished({"a": "op"}, [], [])
    assert states(store, "b", "c") == {"b": s.CANCELLED, "c": s.DISPATCHED}
    assert job(store, "b")["error"] == f"dependency a {ending}"


def test_a_failure_in_a_fail_fast_operation_stops_the_rest(store):
    seed(store, [op_row("op", total=6, fail_fast=True), op_row("calm", total=2)],
         [job_row("a", "op", state=s.STARTED), job_row("run", "op", position=1, state=s.STARTED),
          job_row("out", "op", position=2, state=s.DISPATCHED), job_row("wait", "op", position=3),
          job_row("held", "op", position=4, state=s.HELD, pending_deps=1),
          job_row("ok", "op", position=5, state=s.SUCCEEDED),
          job_row("c1", "calm", state=s.STARTED), job_row("c2", "calm", position=1, state=s.DISPATCHED)],
         [edge("held", "ok", satisfied=False)])
    done = finish_and_release(store, finish("a", s.FAILED, "boom"), finish("c1", s.FAILED, "calm"))
    assert done.won == {"a": "op", "c1": "calm"} and done.released == []
    assert sorted(done.to_revoke) == ["out", "run"]
    assert states(store, "run", "out", "wait", "held", "ok", "c2") == {
        "run": s.STARTED, "out": s.REVOKED, "wait": s.CANCELLED, "held": s.CANCELLED, "ok": s.SUCCEEDED,
        "c2": s.DISPATCHED}  # the running sibling is asked to stop; its own outcome will be recorded
    assert {job(store, j)["error"] for j in ("out", "wait", "held")} == {"fail_fast: sibling a failed"}
    assert job(store, "run")["error"] == "cancel requested: fail_fast: sibling a failed"


# ---- publishing ahead (PostgreSQL) --------------------------------------------------------------
@pytest.fixture
def ahead(store):
    if not store.dialect.reads_releases_ahead:
        pytest.skip(f"{store.backend} does not read releases ahead")
    seed(store, [op_row("op", total=6, created=ago(3600))],
         [job_row("a", "op", state=s.STARTED), job_row("x", "op", position=1, state=s.STARTED),
          job_row("b", "op", position=2, state=s.HELD, pending_deps=1),
          job_row("c", "op", position=3, state=s.HELD, pending_deps=1),
          job_row("two", "op", position=4, state=s.HELD, pending_deps=2),
          job_row("mark", "op", position=5)],
         [edge("b", "a"), edge("c", "a"), edge("two", "a"), edge("two", "x")])
    return store


def test_released_by_reads_what_successes_will_release(ahead):
    store = ahead
    with store.begin() as conn:
        assert sorted(r["id"] for r in store.released_by(conn, ["a"])) == ["b", "c"]
        assert [r["id"] for r in store.released_by(conn, ["a"], published=["b"])] == ["c"]
        both = store.released_by(conn, ["a", "x"])
        assert sorted(r["id"] for r in both) == ["b", "c", "two"]
        assert set(both[0]) == set(RELEASED_COLUMNS)
        assert store.released_by(conn, ["nope"]) == []
    assert states(store, "b", "c", "two") == {"b": s.HELD, "c": s.HELD, "two": s.HELD}  # only read
    finish_and_release(store, finish("a"))
    with store.begin() as conn:
        assert store.released_by(conn, ["a"]) == []  # final already


def test_succeed_and_release_finishes_marks_and_releases_in_one_statement(ahead):
    store = ahead
    with store.begin() as conn:
        done = store.succeed_and_release(conn, [finish("a", started=AT)], ["mark", "a"], 60.0, ["c"])
    assert done.won == {"a": "op"} and done.to_revoke == []
    assert done.released == [{"id": "b", "parent_id": "root", "root_id": "root", "message": '{"id": "b"}',
                               "operation_id": "op"}]
    assert states(store, "a", "b", "c", "two", "mark") == {
        "a": s.SUCCEEDED, "b": s.PENDING, "c": s.DISPATCHED, "two": s.HELD, "mark": s.DISPATCHED}
    a = job(store, "a")
    assert (a["finished_at"], a["started_at"], a["error"]) == (AT, AT, None)
    assert job(store, "c")["dispatched_at"] > ago(60) and job(store, "mark")["dispatched_at"] > ago(60)
    assert job(store, "two")["pending_deps"] == 1 and operation(store, "op")["updated_at"] > ago(60)
    with store.begin() as conn:
        again = store.succeed_and_release(conn, [finish("a")], [], 60.0, [])
    assert again == Finished({}, [], [])
