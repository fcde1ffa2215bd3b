"""SpawnStore records: operations, job rows and dependency edges (written and read back)."""
from __future__ import annotations

from datetime import datetime

import pytest

from celery_spawn.store import schema as s
from celery_spawn.store.dialects import CHUNK
from tests.store.helpers import ago, edge, edges_of, job, job_row, op_row, operation, seed, states


# ---- operations ---------------------------------------------------------------------------------
def test_insert_operation_and_get_operation_round_trip(store):
    row = op_row("op", total=3, config='{"batch_size": 2}', on_complete='{"task": "cb"}', fail_fast=True)
    with store.begin() as conn:
        store.insert_operation(conn, row)
    with store.read() as conn:
        got = store.get_operation(conn, "op")
        assert store.get_operation(conn, "other") is None
    assert got["id"] == "op" and got["parent_id"] == "root" and got["root_id"] == "root"
    assert got["state"] == s.OP_RUNNING and got["total"] == 3 and got["published_through"] == -1
    assert got["config"] == '{"batch_size": 2}' and got["on_complete"] == '{"task": "cb"}'
    assert bool(got["fail_fast"]) is True and bool(got["completed"]) is False
    assert bool(got["wait_for_descendants"]) is False
    assert got["created_at"] == row["created_at"] and got["finished_at"] is None
    assert got["children_succeeded"] is None and got["children_timed"] is None


def test_insert_operation_runs_in_the_callers_transaction(store):
    with pytest.raises(RuntimeError), store.begin() as conn:
        store.insert_operation(conn, op_row("op"))
        raise RuntimeError("roll back")
    assert operation(store, "op") is None


def test_update_operation_sets_values_and_refreshes_updated_at(store):
    seed(store, [op_row("op", created=ago(3600)), op_row("other", created=ago(3600))])
    before = operation(store, "op")["updated_at"]
    with store.begin() as conn:
        store.update_operation(conn, "op", state=s.OP_FAILED, error="boom")
    got = operation(store, "op")
    assert (got["state"], got["error"]) == (s.OP_FAILED, "boom")
    assert got["updated_at"] > before
    assert operation(store, "other")["state"] == s.OP_RUNNING
    fixed = datetime(2001, 2, 3, 4, 5, 6, 789000)
    with store.begin() as conn:
        store.update_operation(conn, "op", updated_at=fixed)
    assert operation(store, "op")["updated_at"] == fixed


def test_delete_operation_removes_it_with_its_jobs_and_their_edges(store):
    seed(store, [op_row("op", total=2), op_row("keep", total=1)],
         [job_row("a", "op"), job_row("b", "op", position=1), job_row("k", "keep")],
         [edge("b", "a"), edge("k", "a"), edge("a", "outside")])
    with store.begin() as conn:
        store.delete_operation(conn, "op")
    assert operation(store, "op") is None and operation(store, "keep") is not None
    assert states(store, "a", "b", "k") == {"k": s.PENDING}
    assert edges_of(store, "a") == {} and edges_of(store, "b") == {}
    assert edges_of(store, "k") == {"a": (False, False)}  # an edge of another operation's job stays


def test_record_failed_operation_inserts_a_new_one(store):
    store.record_failed_operation(op_row("op", state=s.OP_FAILED, error="SpawnError: no handler"))
    got = operation(store, "op")
    assert (got["state"], got["error"], got["parent_id"]) == (s.OP_FAILED, "SpawnError: no handler", "root")


def test_record_failed_operation_overwrites_its_own_failed_operation(store):
    seed(store, [op_row("op", state=s.OP_FAILED, error="first", config='{"a": 1}')])
    store.record_failed_operation(op_row("op", state=s.OP_FAILED, error="second", config='{"a": 2}'))
    got = operation(store, "op")
    assert (got["state"], got["error"], got["config"]) == (s.OP_FAILED, "second", '{"a": 2}')


def test_record_failed_operation_leaves_a_live_operation_of_the_same_parent(store):
    seed(store, [op_row("op", total=1)])
    store.record_failed_operation(op_row("op", state=s.OP_FAILED, error="late"))
    got = operation(store, "op")
    assert (got["state"], got["error"]) == (s.OP_RUNNING, None)


def test_record_failed_operation_of_another_parent_goes_to_the_fallback_id(store):
    seed(store, [op_row("shared", parent="someone-else", total=1)])
    store.record_failed_operation(op_row("shared", parent="me", state=s.OP_FAILED, error="taken"),
                                  fallback_id="op-me")
    kept, fallback = operation(store, "shared"), operation(store, "op-me")
    assert (kept["parent_id"], kept["state"], kept["error"]) == ("someone-else", s.OP_RUNNING, None)
    assert (fallback["parent_id"], fallback["state"], fallback["error"]) == ("me", s.OP_FAILED, "taken")
    # again: the fallback is this parent's failed operation now, and is overwritten
    store.record_failed_operation(op_row("shared", parent="me", state=s.OP_FAILED, error="again"),
                                  fallback_id="op-me")
    assert operation(store, "op-me")["error"] == "again"
    assert operation(store, "shared")["parent_id"] == "someone-else"


def test_record_failed_operation_of_another_parent_without_a_fallback_changes_nothing(store):
    seed(store, [op_row("shared", parent="someone-else", total=1)])
    store.record_failed_operation(op_row("shared", parent="me", state=s.OP_FAILED, error="taken"))
    got = operation(store, "shared")
    assert (got["parent_id"], got["state"], got["error"]) == ("someone-else", s.OP_RUNNING, None)


# ---- jobs ---------------------------------------------------------------------------------------
def test_ensure_job_inserts_once(store):
    root = job_row("root", None, parent=None, state=s.STARTED, task_name="tests.parent")
    with store.begin() as conn:
        store.ensure_job(conn, root)
        store.ensure_job(conn, {**root, "state": s.SUCCEEDED})  # same transaction
    with store.begin() as conn:
        store.ensure_job(conn, {**root, "task_name": "other"})  # another one
    got = job(store, "root")
    assert (got["state"], got["task_name"], got["parent_id"], got["depth"]) == (s.STARTED, "tests.parent", None, 0)


def test_insert_jobs_writes_every_column(store):
    created = datetime(2024, 5, 6, 7, 8, 9, 123456)
    awkward = 'tab\there\nnew line \\N back\\slash "quote" \'single\' ünïcode'
    rows = [job_row(f"j{i}", "op", position=i, created=created, priority=i or None, pending_deps=i,
                    message=awkward if i == 1 else None, error=None, queue=None if i == 2 else "q")
            for i in range(3)]
    with store.begin() as conn:
        store.insert_jobs(conn, rows)
        store.insert_jobs(conn, [])
    got = [job(store, f"j{i}") for i in range(3)]
    assert [g["position"] for g in got] == [0, 1, 2] and [g["pending_deps"] for g in got] == [0, 1, 2]
    assert got[1]["message"] == awkward and got[0]["message"] is None
    assert [g["priority"] for g in got] == [None, 1, 2] and [g["queue"] for g in got] == ["q", "q", None]
    assert {g["created_at"] for g in got} == {created}
    assert {g["state"] for g in got} == {s.PENDING} and {g["operation_id"] for g in got} == {"op"}


def test_insert_jobs_fills_defaults_and_takes_more_than_a_chunk(store):
    full = job_row("x", "op")
    rows = [{k: v for k, v in {**full, "id": f"x{i:05d}", "position": i}.items()
             if k not in ("retries", "pending_deps", "depth")} for i in range(CHUNK * 2 + 7)]
    with store.begin() as conn:
        store.insert_jobs(conn, rows)
        assert len(store.operation_job_ids(conn, "op")) == CHUNK * 2 + 7
    last = job(store, f"x{CHUNK * 2 + 6:05d}")
    assert (last["retries"], last["pending_deps"], last["depth"]) == (0, 0, 0)


def test_insert_dependencies_writes_edges(store):
    rows = [edge("b", "a"), edge("c", "a", ignore_failure=True), edge("c", "b", satisfied=True)]
    with store.begin() as conn:
        store.insert_dependencies(conn, rows)
        store.insert_dependencies(conn, [])
        store.insert_dependencies(conn, [edge(f"many{i}", "a") for i in range(CHUNK + 1)])
    assert edges_of(store, "b") == {"a": (False, False)}
    assert edges_of(store, "c") == {"a": (True, False), "b": (False, True)}
    assert edges_of(store, f"many{CHUNK}") == {"a": (False, False)}


def test_existing_job_ids_and_job_states(store):
    ids = [f"j{i:04d}" for i in range(CHUNK + 3)]
    seed(store, [], [job_row(j, "op", position=i, state=s.DISPATCHED if i % 2 else s.HELD)
                     for i, j in enumerate(ids)])
    with store.read() as conn:
        assert store.existing_job_ids(conn, [*ids, "nope"]) == set(ids)
        assert store.existing_job_ids(conn, []) == set()
        assert store.existing_job_ids(conn, iter(["j0001", "nope"])) == {"j0001"}
        found = store.job_states(conn, [*ids, "nope"])
        assert store.job_states(conn, []) == {}
    assert len(found) == len(ids) and "nope" not in found
    assert found["j0000"] == s.HELD and found["j0001"] == s.DISPATCHED and found[ids[-1]] == s.HELD


def test_get_job_and_operation_job_ids(store):
    seed(store, [], [job_row("c", "op", position=2), job_row("a", "op", position=0),
                     job_row("b", "op", position=1, state=s.SUCCEEDED), job_row("z", "other")])
    with store.read() as conn:
        assert store.operation_job_ids(conn, "op") == ["a", "b", "c"]
        assert store.operation_job_ids(conn, "none") == []
        got = store.get_job(conn, "b")
        assert store.get_job(conn, "nope") is None
    assert set(got) == {c.name for c in s.jobs.columns}
    assert (got["id"], got["operation_id"], got["position"], got["state"]) == ("b", "op", 1, s.SUCCEEDED)
    assert got["message"] == '{"id": "b"}'

