"""SpawnStore publishing: undispatched pages, dispatch marks, the publish watermark and its undoing."""
from __future__ import annotations

import pytest

from celery_spawn.store import schema as s
from celery_spawn.store.dialects import CHUNK
from tests.store.helpers import ago, edge, job, job_row, op_row, operation, seed, set_operation, states

PAGE_KEYS = {"id", "position", "message", "parent_id", "root_id"}


@pytest.fixture
def mixed(store):
    """op: p0 pending, d1 dispatched, p2 pending, h3 held, p4 pending, e5 dispatched with an edge; other: o0."""
    seed(store, [op_row("op", total=6, created=ago(3600)), op_row("other", total=1)],
         [job_row("p0", "op", position=0), job_row("d1", "op", position=1, state=s.DISPATCHED),
          job_row("p2", "op", position=2), job_row("h3", "op", position=3, state=s.HELD, pending_deps=1),
          job_row("p4", "op", position=4), job_row("e5", "op", position=5, state=s.DISPATCHED),
          job_row("o0", "other")],
         [edge("h3", "d1"), edge("e5", "d1", satisfied=True)])
    return store


def ids(rows):
    return [r["id"] for r in rows]


def test_pending_page_pages_pending_children_by_position(mixed):
    store = mixed
    with store.read() as conn:
        first = store.pending_page(conn, "op", -1, 2)
        second = store.pending_page(conn, "op", first[-1]["position"], 2)
        third = store.pending_page(conn, "op", second[-1]["position"], 2)
        assert store.pending_page(conn, "none", -1, 10) == []
    assert ids(first) == ["p0", "p2"] and ids(second) == ["p4"] and third == []
    assert set(first[0]) == PAGE_KEYS
    assert first[0] == {"id": "p0", "position": 0, "message": '{"id": "p0"}', "parent_id": "root", "root_id": "root"}


def test_pending_page_any_state_pages_every_child(mixed):
    store = mixed
    with store.read() as conn:
        first = store.pending_page(conn, "op", -1, 4, any_state=True)
        rest = store.pending_page(conn, "op", 3, 4, any_state=True)
    assert ids(first) == ["p0", "d1", "p2", "h3"] and ids(rest) == ["p4", "e5"]


def test_mark_dispatched_changes_only_pending_rows_once(mixed):
    store = mixed
    assert store.mark_dispatched([]) == 0
    assert store.mark_dispatched(["p0", "d1", "h3", "p2", "nope"]) == 2
    after = states(store, "p0", "d1", "p2", "h3", "p4")
    assert after == {"p0": s.DISPATCHED, "d1": s.DISPATCHED, "p2": s.DISPATCHED, "h3": s.HELD, "p4": s.PENDING}
    marked_at = job(store, "p0")["dispatched_at"]
    assert marked_at is not None and job(store, "d1")["dispatched_at"] is None
    assert store.mark_dispatched(["p0", "p2"]) == 0  # idempotent
    assert job(store, "p0")["dispatched_at"] == marked_at


def test_mark_dispatched_takes_more_than_a_chunk(store):
    many = [f"m{i:04d}" for i in range(CHUNK + 2)]
    seed(store, [op_row("op", total=len(many))], [job_row(j, "op", position=i) for i, j in enumerate(many)])
    assert store.mark_dispatched(many) == len(many)
    assert set(states(store, *many).values()) == {s.DISPATCHED}


def test_mark_dispatched_in_runs_in_the_callers_transaction(mixed):
    store = mixed
    with pytest.raises(RuntimeError), store.begin() as conn:
        assert store.mark_dispatched_in(conn, ["p0", "d1"]) == 1
        raise RuntimeError("roll back")
    assert states(store, "p0")["p0"] == s.PENDING
    with store.begin() as conn:
        assert store.mark_dispatched_in(conn, ["p0", "p4", "h3"]) == 2
        assert store.mark_dispatched_in(conn, ["p0"]) == 0
    assert states(store, "p0", "p4", "h3") == {"p0": s.DISPATCHED, "p4": s.DISPATCHED, "h3": s.HELD}


def test_unpublished_page_pages_dispatched_children_without_edges(mixed):
    store = mixed
    store.mark_dispatched(["p2", "p4"])
    with store.read() as conn:
        everything = store.unpublished_page(conn, "op", -1, 10)
        after_one = store.unpublished_page(conn, "op", 1, 10)
        one = store.unpublished_page(conn, "op", 1, 1)
        assert store.unpublished_page(conn, "op", 4, 10) == []  # e5 has an edge: its releaser publishes it
    assert ids(everything) == ["d1", "p2", "p4"] and ids(after_one) == ["p2", "p4"] and ids(one) == ["p2"]
    assert set(one[0]) == PAGE_KEYS and one[0]["message"] == '{"id": "p2"}'


def test_advance_watermark_only_moves_forward(mixed):
    store = mixed
    old = operation(store, "op")["updated_at"]
    store.advance_watermark("op", 2)
    moved = operation(store, "op")
    assert moved["published_through"] == 2 and moved["updated_at"] > old
    store.advance_watermark("op", 1)
    store.advance_watermark("op", 2)
    assert operation(store, "op")["published_through"] == 2
    assert operation(store, "op")["updated_at"] == moved["updated_at"]  # no move, no lease refresh
    store.advance_watermark("op", 5)
    assert operation(store, "op")["published_through"] == 5
    assert operation(store, "other")["published_through"] == -1


def test_unpublish_returns_dispatched_children_without_edges_to_pending(mixed):
    store = mixed
    store.mark_dispatched(["p0", "p2", "p4"])
    seed(store, [], [job_row("s6", "op", position=6, state=s.STARTED)])
    set_operation(store, "op", updated_at=ago(3600))
    assert store.unpublish("op", 0) == 3  # d1, p2 and p4; p0 is at the watermark, e5 has an edge, s6 started
    after = states(store, "p0", "d1", "p2", "p4", "e5", "s6", "o0")
    assert after == {"p0": s.DISPATCHED, "d1": s.PENDING, "p2": s.PENDING, "p4": s.PENDING, "e5": s.DISPATCHED,
                     "s6": s.STARTED, "o0": s.PENDING}
    assert job(store, "p2")["dispatched_at"] is None and job(store, "p0")["dispatched_at"] is not None
    closed = operation(store, "op")
    assert closed["published_through"] == 5 and closed["updated_at"] > ago(60)
    assert store.unpublish("op", 0) == 0


def test_touch_operation_refreshes_only_its_lease(mixed):
    store = mixed
    set_operation(store, "other", updated_at=ago(3600))
    before = operation(store, "op")
    store.touch_operation("op")
    after = operation(store, "op")
    assert after["updated_at"] > before["updated_at"] and after["updated_at"] > ago(60)
    assert {k: v for k, v in after.items() if k != "updated_at"} == {
        k: v for k, v in before.items() if k != "updated_at"}
    assert operation(store, "other")["updated_at"] < ago(3000)
