"""Delayed children are held in the store as ``scheduled`` and published by a scheduler when due."""
from __future__ import annotations

from datetime import datetime, timedelta, timezone

import pytest

from celery_spawn import SpawnConfig, cancel
from celery_spawn.engine.children import due_time


def _ids(messages):
    return [message.headers["id"] for message in messages]


def test_spawn_delay_records_children_scheduled_and_sends_nothing_early(publishing_rig):
    rig = publishing_rig
    rig.manager.register_handler("three", lambda context: [rig.sig(i) for i in range(3)])
    parent = rig.spawn(SpawnConfig(handler="three").with_spawn_delay(timedelta(seconds=2)).to_dict(), value=1)
    jobs = rig.jobs(rig.operation(parent.id)["id"])
    assert [job["state"] for job in jobs] == ["dispatched", "scheduled", "scheduled"]
    created = jobs[0]["created_at"]
    assert jobs[0]["not_before"] is None
    assert [(job["not_before"] - created).total_seconds() for job in jobs[1:]] == pytest.approx([2, 4], abs=0.01)
    assert _ids(rig.drain()) == [jobs[0]["id"]]  # the first goes at once; no message waits with a countdown

    scheduler = rig.state.scheduler
    assert scheduler.next_due() == jobs[1]["not_before"]
    assert scheduler.publish_due(now=created + timedelta(seconds=1)) == 0
    assert scheduler.publish_due(now=created + timedelta(seconds=2.5)) == 1
    sent = rig.drain()
    assert _ids(sent) == [jobs[1]["id"]] and sent[0].headers.get("eta") is None
    assert scheduler.publish_due(now=created + timedelta(seconds=2.5)) == 0  # never twice
    assert scheduler.publish_due(now=created + timedelta(seconds=60)) == 1
    assert _ids(rig.drain()) == [jobs[2]["id"]]
    states = {job["id"]: (job["state"], job["dispatched_at"]) for job in rig.jobs(jobs[0]["operation_id"])}
    assert all(state == "dispatched" and at is not None for state, at in states.values())
    assert scheduler.next_due() is None


def test_a_childs_own_countdown_or_eta_is_held_in_the_store_too(publishing_rig):
    rig = publishing_rig
    eta = datetime.now(timezone.utc) + timedelta(hours=1)
    rig.manager.register_handler("own", lambda context: [
        rig.sig(0).set(countdown=30), rig.sig(1).set(eta=eta), rig.sig(2).set(eta=eta.isoformat()), rig.sig(3)])
    parent = rig.spawn({"handler": "own"}, value=1)
    jobs = rig.jobs(rig.operation(parent.id)["id"])
    assert [job["state"] for job in jobs] == ["scheduled", "scheduled", "scheduled", "dispatched"]
    naive_eta = eta.replace(tzinfo=None)
    assert jobs[1]["not_before"] == jobs[2]["not_before"]
    assert abs((jobs[1]["not_before"] - naive_eta).total_seconds()) < 0.01
    assert 29 < (jobs[0]["not_before"] - jobs[0]["created_at"]).total_seconds() <= 30.01
    assert _ids(rig.drain()) == [jobs[3]["id"]]
    for job in jobs[:3]:
        assert '"countdown"' not in job["message"] and '"eta"' not in job["message"]


def test_a_scheduled_child_is_cancelled_without_a_revoke(publishing_rig):
    rig = publishing_rig
    revoked = []
    rig.app.control.revoke = lambda ids, **options: revoked.append(list(ids))
    rig.manager.register_handler("three", lambda context: [rig.sig(i) for i in range(3)])
    parent = rig.spawn(SpawnConfig(handler="three").with_spawn_delay(60).to_dict(), value=1)
    operation_id = rig.operation(parent.id)["id"]
    rig.drain()
    result = cancel(rig.app, operation_id)
    assert result["cancelled"] == 2
    jobs = rig.jobs(operation_id)
    assert [job["state"] for job in jobs] == ["revoked", "cancelled", "cancelled"]
    assert {job_id for batch in revoked for job_id in batch} == {jobs[0]["id"]}  # only the dispatched one
    assert rig.state.scheduler.publish_due(now=datetime.now(timezone.utc).replace(tzinfo=None)
                                           + timedelta(days=1)) == 0
    assert rig.drain() == []


def test_a_failed_publish_leaves_the_page_scheduled(publishing_rig, monkeypatch):
    rig = publishing_rig
    rig.manager.register_handler("two", lambda context: [rig.sig(i) for i in range(2)])
    parent = rig.spawn(SpawnConfig(handler="two").with_spawn_delay(1).to_dict(), value=1)
    operation_id = rig.operation(parent.id)["id"]
    rig.drain()
    later = datetime.now(timezone.utc).replace(tzinfo=None) + timedelta(minutes=1)

    def broker_down(rows):
        raise ConnectionError("broker down")

    monkeypatch.setattr(rig.state.publisher, "publish", broker_down)
    with pytest.raises(ConnectionError):
        rig.state.scheduler.publish_due(now=later)
    assert [job["state"] for job in rig.jobs(operation_id)] == ["dispatched", "scheduled"]
    monkeypatch.undo()
    assert rig.state.scheduler.publish_due(now=later) == 1


def test_two_schedulers_never_take_the_same_due_child(publishing_rig):
    rig = publishing_rig
    store = rig.state.store
    if store.backend == "sqlite":
        pytest.skip("SQLite serialises write transactions: the second caller waits instead of skipping")
    rig.manager.register_handler("three", lambda context: [rig.sig(i) for i in range(3)])
    rig.spawn(SpawnConfig(handler="three").with_spawn_delay(1).to_dict(), value=1)
    later = datetime.now(timezone.utc).replace(tzinfo=None) + timedelta(minutes=1)
    with store.begin() as first:
        held = store.due_scheduled(first, later, 10)
        with store.begin() as second:
            assert store.due_scheduled(second, later, 10) == []  # locked rows are skipped, not waited for
    assert len(held) == 2


def test_eager_mode_keeps_no_child_waiting(rig):
    rig.manager.register_handler("three", lambda context: [rig.sig(i) for i in range(3)])
    parent = rig.spawn(SpawnConfig(handler="three").with_spawn_delay(30).to_dict(), value=1)
    assert [job["state"] for job in rig.jobs(rig.operation(parent.id)["id"])] == ["succeeded"] * 3


def test_a_dependent_child_waits_for_its_dependencies_not_for_its_turn(publishing_rig):
    from celery_spawn import depends_on

    rig = publishing_rig

    @rig.handler("pair")
    def pair(context):
        first = rig.sig("first")
        return [first, depends_on(rig.sig("second"), context.freeze(first))]

    parent = rig.spawn(SpawnConfig(handler="pair").with_spawn_delay(60).to_dict(), value=1)
    jobs = rig.jobs(rig.operation(parent.id)["id"])
    assert [job["state"] for job in jobs] == ["dispatched", "held"]
    assert jobs[1]["not_before"] is None


def test_due_time_rules():
    now = datetime(2026, 1, 1)
    config = SpawnConfig().with_spawn_delay(1.5)
    assert due_time({}, 0, config, now) is None
    assert due_time({}, 2, config, now) == now + timedelta(seconds=3)
    options = {"countdown": 5}
    assert due_time(options, 2, config, now) == now + timedelta(seconds=5) and options == {}
    assert due_time({"countdown": 0}, 2, config, now) is None  # not later than now: sent at once
    assert due_time({"eta": "2025-12-31T00:00:00"}, 0, SpawnConfig(), now) is None
    with pytest.raises(TypeError):
        due_time({"eta": 12}, 0, SpawnConfig(), now)


def test_a_bad_countdown_refuses_the_spawn_naming_the_child(broker_rig):
    rig = broker_rig
    rig.manager.register_handler("bad", lambda context: [rig.sig(0).set(countdown="soon")])
    parent = rig.spawn({"handler": "bad"}, value=1)
    assert parent.state == "SUCCESS"
    assert "child #0" in str(rig.failures[-1][1]) and "countdown" in str(rig.failures[-1][1])
