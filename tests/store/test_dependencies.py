"""SpawnStore dependency edges: unknown targets, edges inside an operation, and settling final ones."""
from __future__ import annotations

from celery_spawn.store import schema as s
from tests.store.helpers import ago, edge, edges_of, job, job_row, op_row, operation, seed, states


def test_dependency_problem_names_an_edge_on_an_unknown_job(store):
    seed(store, [op_row("op", total=2), op_row("other", total=1)],
         [job_row("a", "op"), job_row("b", "op", position=1, state=s.HELD), job_row("x", "other", state=s.HELD)],
         [edge("b", "a"), edge("x", "ghost-of-other")])
    with store.read() as conn:
        assert store.dependency_problem(conn, "op") is None  # x's unknown target is another operation's
        assert store.dependency_problem(conn, "other") == ("x", "ghost-of-other")
    seed(store, [], [], [edge("b", "ghost")])
    with store.read() as conn:
        assert store.dependency_problem(conn, "op") == ("b", "ghost")


def test_internal_edges_are_those_between_children_of_the_operation(store):
    seed(store, [op_row("op", total=3), op_row("other", total=1)],
         [job_row("a", "op"), job_row("b", "op", position=1), job_row("c", "op", position=2),
          job_row("x", "other")],
         [edge("b", "a"), edge("c", "b", ignore_failure=True), edge("c", "x"), edge("x", "a"),
          edge("a", "unknown")])
    with store.read() as conn:
        assert sorted(store.internal_edges(conn, "op")) == [("b", "a"), ("c", "b")]
        assert store.internal_edges(conn, "other") == []
        assert store.internal_edges(conn, "none") == []


def test_settle_dependencies_releases_a_child_whose_dependency_already_succeeded(store):
    seed(store, [op_row("earlier", total=1), op_row("op", total=2, created=ago(3600))],
         [job_row("done", "earlier", state=s.SUCCEEDED),
          job_row("h", "op", state=s.HELD, pending_deps=1),
          job_row("h2", "op", position=1, state=s.HELD, pending_deps=2)],
         [edge("h", "done"), edge("h2", "done"), edge("h2", "h")])
    with store.begin() as conn:
        assert store.settle_dependencies(conn, "op", 60) == 1
    assert states(store, "h", "h2") == {"h": s.PENDING, "h2": s.HELD}
    assert job(store, "h")["pending_deps"] == 0 and job(store, "h2")["pending_deps"] == 1
    assert edges_of(store, "h") == {"done": (False, True)}
    assert edges_of(store, "h2") == {"done": (False, True), "h": (False, False)}
    assert operation(store, "op")["updated_at"] > ago(60)  # the releaser holds the lease
    with store.begin() as conn:
        assert store.settle_dependencies(conn, "op", 60) == 0  # nothing left to count off
    assert job(store, "h2")["pending_deps"] == 1


def test_settle_dependencies_cancels_on_a_failed_dependency_and_its_dependents(store):
    seed(store, [op_row("earlier", total=1), op_row("op", total=4)],
         [job_row("bad", "earlier", state=s.FAILED),
          job_row("h", "op", state=s.HELD, pending_deps=1),
          job_row("hh", "op", position=1, state=s.HELD, pending_deps=1),
          job_row("tolerant", "op", position=2, state=s.HELD, pending_deps=1),
          job_row("free", "op", position=3)],
         [edge("h", "bad"), edge("hh", "h"), edge("tolerant", "bad", ignore_failure=True)])
    with store.begin() as conn:
        assert store.settle_dependencies(conn, "op", 60) == 1  # the one that ignores the failure
    assert states(store, "h", "hh", "tolerant", "free") == {
        "h": s.CANCELLED, "hh": s.CANCELLED, "tolerant": s.PENDING, "free": s.PENDING}
    assert job(store, "h")["error"] == "dependency bad failed" and job(store, "h")["finished_at"] is not None
    assert job(store, "hh")["error"] == "dependency bad failed"
    assert edges_of(store, "tolerant") == {"bad": (True, True)}
    assert edges_of(store, "h") == {"bad": (False, False)}


def test_settle_dependencies_leaves_unfinished_dependencies_alone(store):
    seed(store, [op_row("earlier", total=2), op_row("op", total=1)],
         [job_row("running", "earlier", state=s.STARTED), job_row("queued", "earlier", position=1),
          job_row("h", "op", state=s.HELD, pending_deps=2)],
         [edge("h", "running"), edge("h", "queued")])
    with store.begin() as conn:
        assert store.settle_dependencies(conn, "op", 60) == 0
    assert states(store, "h") == {"h": s.HELD} and job(store, "h")["pending_deps"] == 2
    assert edges_of(store, "h") == {"running": (False, False), "queued": (False, False)}


def test_settle_dependencies_with_a_revoked_dependency(store):
    seed(store, [op_row("earlier", total=1), op_row("op", total=1)],
         [job_row("gone", "earlier", state=s.REVOKED), job_row("h", "op", state=s.HELD, pending_deps=1)],
         [edge("h", "gone")])
    with store.begin() as conn:
        assert store.settle_dependencies(conn, "op", 60) == 0
    assert states(store, "h") == {"h": s.CANCELLED} and job(store, "h")["error"] == "dependency gone revoked"
