"""The publish watermark: children recorded ``dispatched`` are published once, or found again after a crash.

A spawn records its dependency-free children as ``dispatched`` and moves the
operation's ``published_through`` on once per published page. These tests
stop the spawner at each point where a process can die and check what the
store says and what the recovery sweep publishes: nothing is lost, and only
what may not have reached the broker is published again.
"""
from __future__ import annotations

import pytest

from celery_spawn import depends_on, get_state, recover
from celery_spawn.engine import children as children_module
from celery_spawn.engine import outbox as outbox_module
from celery_spawn.engine import spawner as spawner_module
from celery_spawn.engine.publisher import Publisher
from celery_spawn.store import schema as s
from tests.unit.helpers import age


class Crash(BaseException):
    """The process dies here (not an Exception: nothing in the library handles it)."""


@pytest.fixture
def small_pages(monkeypatch):
    """Pages of ``batch_size`` children (2 in these tests) instead of at least 500."""
    monkeypatch.setattr(outbox_module, "MIN_PUBLISH_PAGE", 1)


def spawn_then_crash(rig, monkeypatch, count: int, crash_after_pages: int) -> str:
    """Spawn ``count`` children in pages of 2; the process dies after publishing page ``crash_after_pages``
    (0: right after the commit), before recording that page in the watermark. Returns the operation id."""
    real = Publisher.publish
    pages = []

    def publish_then_die(app, children):
        if len(pages) == crash_after_pages:
            raise Crash()
        pages.append(real(app, children))
        if len(pages) == crash_after_pages:
            raise Crash()
        return pages[-1]

    monkeypatch.setattr(Publisher, "publish", publish_then_die)
    rig.manager.register_handler("many", lambda context: [rig.sig(i) for i in range(count)])
    with pytest.raises(Crash):
        rig.parent.apply(args=("v",), kwargs={"_spawn_config": {"handler": "many", "batch_size": 2}})
    monkeypatch.setattr(Publisher, "publish", real)
    (operation,) = rig.operations()
    return operation["id"]


def ids_of(messages) -> list[str]:
    return [m.headers["id"] for m in messages]


def test_a_finished_spawn_leaves_its_watermark_at_the_last_position(publishing_rig, small_pages):
    rig = publishing_rig
    rig.manager.register_handler("five", lambda context: [rig.sig(i) for i in range(5)])
    result = rig.spawn({"handler": "five", "batch_size": 2})
    operation = rig.operation(result.id)
    assert (operation["total"], operation["published_through"]) == (5, 4)
    children = rig.jobs(operation["id"])
    assert {job["state"] for job in children} == {s.DISPATCHED}
    assert all(job["dispatched_at"] is not None for job in children)
    assert ids_of(rig.drain()) == [job["id"] for job in children]
    age(rig, operation["id"])
    assert rig.state.store.claim_stale_operations(60) == []
    assert recover(rig.app, grace_seconds=0) == 0


def test_a_crash_right_after_the_commit_loses_no_child(publishing_rig, small_pages, monkeypatch):
    rig = publishing_rig
    operation_id = spawn_then_crash(rig, monkeypatch, count=5, crash_after_pages=0)
    assert rig.drain() == []
    operation = rig.operations()[0]
    assert (operation["total"], operation["published_through"]) == (5, -1)
    children = rig.jobs(operation_id)

    assert recover(rig.app) == 0  # within the grace period: the spawner may still be publishing
    age(rig, operation_id)
    assert recover(rig.app) == 5
    assert ids_of(rig.drain()) == [job["id"] for job in children]
    assert rig.operations()[0]["published_through"] == 4
    age(rig, operation_id)
    assert recover(rig.app) == 0
    assert rig.drain() == []


def test_a_crash_mid_publish_republishes_only_past_the_watermark(publishing_rig, small_pages, monkeypatch):
    rig = publishing_rig
    operation_id = spawn_then_crash(rig, monkeypatch, count=7, crash_after_pages=2)
    children = [job["id"] for job in rig.jobs(operation_id)]
    assert ids_of(rig.drain()) == children[:4]  # two pages reached the broker
    assert rig.operations()[0]["published_through"] == 1  # the second page was not recorded

    # One child of the unrecorded page already runs: it certainly was published.
    get_state(rig.app).tracker.claim_start(children[2])
    age(rig, operation_id)
    assert recover(rig.app) == 4
    assert ids_of(rig.drain()) == [children[3], *children[4:]]
    assert rig.operations()[0]["published_through"] == 6


def test_a_redelivered_parent_publishes_what_its_first_run_did_not(publishing_rig, small_pages, monkeypatch):
    rig = publishing_rig
    operation_id = spawn_then_crash(rig, monkeypatch, count=5, crash_after_pages=1)
    parent_id = rig.operations()[0]["parent_id"]
    children = [job["id"] for job in rig.jobs(operation_id)]
    assert ids_of(rig.drain()) == children[:2]
    again = rig.parent.apply(args=("v",), kwargs={"_spawn_config": {"handler": "many", "batch_size": 2}},
                             task_id=parent_id)
    assert again.state == "SUCCESS"
    assert ids_of(rig.drain()) == children  # the first page again: its watermark was never recorded
    assert rig.operations()[0]["published_through"] == 4
    assert len(rig.jobs(operation_id)) == 5


def test_a_broker_failure_puts_the_unpublished_children_back_to_pending(publishing_rig, small_pages, monkeypatch):
    rig = publishing_rig
    real = Publisher.publish
    calls = []

    def second_page_fails(app, children):
        calls.append(len(children))
        if len(calls) == 2:
            raise ConnectionError("broker unreachable")
        return real(app, children)

    monkeypatch.setattr(Publisher, "publish", second_page_fails)
    rig.manager.register_handler("five", lambda context: [rig.sig(i) for i in range(5)])
    result = rig.spawn({"handler": "five", "batch_size": 2})
    assert result.state == "SUCCESS"
    monkeypatch.undo()
    operation = rig.operation(result.id)
    children = rig.jobs(operation["id"])
    assert [job["state"] for job in children] == [s.DISPATCHED] * 2 + [s.PENDING] * 3
    assert [job["dispatched_at"] is None for job in children] == [False] * 2 + [True] * 3
    assert operation["published_through"] == 4  # closed: pending rows say the rest
    assert ids_of(rig.drain()) == [job["id"] for job in children[:2]]
    age(rig, operation["id"])
    assert recover(rig.app) == 3
    assert ids_of(rig.drain()) == [job["id"] for job in children[2:]]
    assert {job["state"] for job in rig.jobs(operation["id"])} == {s.DISPATCHED}


def test_children_with_dependencies_are_left_to_their_release(publishing_rig, small_pages, monkeypatch):
    """A crash before publishing: the sweep publishes the free children, not one a release already published."""
    rig = publishing_rig
    monkeypatch.setattr(outbox_module.Outbox, "publish_pending", lambda *args, **kwargs: 0)

    @rig.handler("chain")
    def chain(context):
        first, free = rig.sig("first"), rig.sig("free")
        context.freeze(first)
        return [first, depends_on(rig.sig("second"), first), free]

    result = rig.spawn({"handler": "chain"})
    monkeypatch.undo()
    first, second, free = rig.children_of(result.id)
    assert (first["state"], second["state"], free["state"]) == (s.DISPATCHED, s.HELD, s.DISPATCHED)
    # The first child ran (its message was published by the crashed spawner before it died) and released the second.
    tracker = get_state(rig.app).tracker
    tracker.claim_start(first["id"])
    tracker.succeeded(first["id"])
    assert ids_of(rig.drain()) == [second["id"]]
    assert rig.children_of(result.id)[1]["state"] == s.DISPATCHED

    age(rig, rig.operation(result.id)["id"])
    assert recover(rig.app) == 1
    assert ids_of(rig.drain()) == [free["id"]]


def test_a_child_depending_only_on_its_parent_is_published(publishing_rig):
    rig = publishing_rig

    @rig.handler("on-parent")
    def on_parent(context):
        return [depends_on(rig.sig(1), context.parent.id), rig.sig(2)]

    result = rig.spawn({"handler": "on-parent"})
    children = rig.children_of(result.id)
    assert [job["state"] for job in children] == [s.DISPATCHED, s.DISPATCHED]
    assert sorted(ids_of(rig.drain())) == sorted(job["id"] for job in children)


@pytest.mark.parametrize("limit,chars", [(3, 1 << 20), (1000, 100)], ids=["count", "size"])
def test_a_spawn_too_big_to_keep_in_memory_pages_its_children_from_the_store(publishing_rig, small_pages,
                                                                              monkeypatch, limit, chars):
    rig = publishing_rig
    monkeypatch.setattr(spawner_module, "EAGER_ID_LIMIT", limit)
    monkeypatch.setattr(children_module, "EAGER_ID_LIMIT", limit)
    monkeypatch.setattr(children_module, "KEEP_MESSAGE_CHARS", chars)
    read = []
    real_page = type(rig.state.store).unpublished_page

    def counted(self, *args, **kwargs):
        read.append(args)
        return real_page(self, *args, **kwargs)

    monkeypatch.setattr(type(rig.state.store), "unpublished_page", counted)
    rig.manager.register_handler("seven", lambda context: [rig.sig(i) for i in range(7)])
    result = rig.spawn({"handler": "seven", "batch_size": 2})
    operation = rig.operation(result.id)
    children = [job["id"] for job in rig.jobs(operation["id"])]
    assert ids_of(rig.drain()) == children
    assert read, "the children were not read back from the store"
    assert operation["published_through"] == 6
    assert list(get_state(rig.app).spawner._child_ids(operation["id"], 7)) == children


def test_a_small_spawn_publishes_from_memory(publishing_rig, small_pages, monkeypatch):
    rig = publishing_rig
    monkeypatch.setattr(type(rig.state.store), "unpublished_page", lambda *args, **kwargs: pytest.fail("read back"))
    rig.manager.register_handler("seven", lambda context: [rig.sig(i) for i in range(7)])
    result = rig.spawn({"handler": "seven", "batch_size": 2})
    children = [job["id"] for job in rig.children_of(result.id)]
    assert ids_of(rig.drain()) == children
    assert rig.operation(result.id)["published_through"] == 6
