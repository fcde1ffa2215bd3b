"""Siblings share their checked, serialised message: each row must still be exactly its own child's.

A handler that yields clones of one signature gets the first child's checks,
JSON and routing for the rest (:func:`~celery_spawn.engine.children.sibling_key`).
These tests hold the reuse to what building each row alone gives.
"""
from __future__ import annotations

import json
from datetime import timedelta

import pytest

from celery_spawn import HandlerError
from celery_spawn.engine.children import sibling_key
from celery_spawn.store import schema as s
from tests.unit.helpers import Rig


def messages_of(rig: Rig, result) -> list[dict]:
    return [json.loads(job["message"]) for job in rig.children_of(result.id)]


def test_clones_of_one_signature_get_their_own_ids_and_the_same_message(broker_rig):
    @broker_rig.handler("clones")
    def clones(context):
        sig = broker_rig.sig("a", 1, flag=True).set(queue="elsewhere", priority=3)
        for _ in range(5):
            yield sig.clone()

    result = broker_rig.spawn({"handler": "clones"})
    jobs = broker_rig.children_of(result.id)
    assert len({job["id"] for job in jobs}) == 5
    assert [job["position"] for job in jobs] == list(range(5))
    assert {(job["queue"], job["priority"], job["state"]) for job in jobs} == {("elsewhere", 3, s.DISPATCHED)}
    (message,) = {job["message"] for job in jobs}
    assert json.loads(message)["args"] == ["a", 1] and json.loads(message)["kwargs"] == {"flag": True}
    assert sorted(m.headers["id"] for m in broker_rig.drain("elsewhere")) == sorted(job["id"] for job in jobs)


@pytest.mark.parametrize("values", [(1, True, 1.0), (0.0, -0.0, 0), ("1", 1, None)])
def test_values_python_calls_equal_keep_their_own_json(broker_rig, values):
    broker_rig.manager.register_handler("alike", lambda context: [broker_rig.sig(v, k=v) for v in values])
    result = broker_rig.spawn({"handler": "alike"})
    assert [(m["args"], m["kwargs"]) for m in messages_of(broker_rig, result)] == [([v], {"k": v}) for v in values]
    texts = [job["message"] for job in broker_rig.children_of(result.id)]
    assert len(set(texts)) == len(values)


def test_dict_keys_that_python_calls_equal_keep_their_own_json():
    assert sibling_key("t", (), {"1": 1}, {}) != sibling_key("t", (), {1: 1}, {})
    assert sibling_key("t", (), {True: 1}, {}) != sibling_key("t", (), {1: 1}, {})


def test_children_with_nested_arguments_keep_their_own(broker_rig):
    broker_rig.manager.register_handler("nested", lambda context: [broker_rig.sig({"n": n}, [n]) for n in (0, 0, 1)])
    result = broker_rig.spawn({"handler": "nested"})
    assert [m["args"] for m in messages_of(broker_rig, result)] == [[{"n": 0}, [0]], [{"n": 0}, [0]], [{"n": 1}, [1]]]
    assert sibling_key("t", ({"n": 0},), {}, {}) is None  # nested: never shared


def test_a_flat_value_changed_in_place_between_children_is_seen(broker_rig):
    @broker_rig.handler("growing")
    def growing(context):
        items: list = []
        for n in range(3):
            items.append(n)
            yield broker_rig.app.signature("unit.child", args=items)  # the same list object every time

    result = broker_rig.spawn({"handler": "growing"})
    assert [m["args"] for m in messages_of(broker_rig, result)] == [[0], [0, 1], [0, 1, 2]]


def test_children_that_differ_only_in_options_keep_their_own_options(broker_rig):
    sig = broker_rig.sig
    broker_rig.manager.register_handler("routed", lambda context: [
        sig(1).set(queue="q1"), sig(1).set(queue="q2"), sig(1).set(queue="q2", priority=5)])
    result = broker_rig.spawn({"handler": "routed"})
    jobs = broker_rig.children_of(result.id)
    assert [(job["queue"], job["priority"]) for job in jobs] == [("q1", None), ("q2", None), ("q2", 5)]
    for queue in ("q1", "q2"):
        broker_rig.drain(queue)


def test_shared_children_are_still_staggered_by_position(broker_rig):
    broker_rig.manager.register_handler("staggered", lambda context: [broker_rig.sig("same") for _ in range(4)])
    result = broker_rig.spawn({"handler": "staggered", "spawn_delay_ms": 1000})
    jobs = broker_rig.children_of(result.id)
    created = jobs[0]["created_at"]
    assert jobs[0]["not_before"] is None and jobs[0]["state"] == s.DISPATCHED
    assert [job["not_before"] - created for job in jobs[1:]] == [timedelta(seconds=n) for n in (1, 2, 3)]
    assert {job["state"] for job in jobs[1:]} == {s.SCHEDULED}


def test_shared_children_with_a_countdown_are_all_due_together(broker_rig):
    broker_rig.manager.register_handler("later", lambda context: [broker_rig.sig("same").set(countdown=60)
                                                                for _ in range(3)])
    result = broker_rig.spawn({"handler": "later"})
    jobs = broker_rig.children_of(result.id)
    assert {job["not_before"] - job["created_at"] for job in jobs} == {timedelta(seconds=60)}
    assert all("countdown" not in json.loads(job["message"])["options"] for job in jobs)


def test_a_repeated_chosen_id_among_clones_is_still_refused(sqlite_rig):
    sqlite_rig.manager.register_handler("repeats", lambda context: [
        sqlite_rig.sig("x").set(task_id="chosen-1"), sqlite_rig.sig("x").set(task_id="chosen-1")])
    result = sqlite_rig.spawn({"handler": "repeats"}, value="v")
    sqlite_rig.assert_refused(result, "v", HandlerError, "child #1 repeats task id chosen-1")
