"""Every message celery-spawn sends goes through one publisher: patch its seam once, see them all.

A real app publishing to the memory broker, on each SQL store: the children
of a spawn, a dependent released by its dependency's success, a child the
recovery sweep publishes again after a broker failure, and the
``on_complete`` callback all pass through :meth:`Publisher.publish`, and a
header added by :meth:`Publisher.headers` reaches every one of those messages.
"""
from __future__ import annotations

import pytest

from celery_spawn import SpawnConfig, depends_on, recover
from celery_spawn.engine.completion import completion_task_id
from celery_spawn.engine.publisher import Publisher
from celery_spawn.protocol import FAILED, SUCCEEDED
from tests.unit.helpers import age


class Calls(list):
    #: While set, every call fails as with a broker that went away.
    broker_down = False


@pytest.fixture
def seam(monkeypatch):
    """Each call of the one publisher, as the ids it was given; and a header it adds to every message."""
    calls = Calls()
    real = Publisher.publish

    def publish(self, rows):
        calls.append([row["id"] for row in rows])
        if calls.broker_down:
            raise ConnectionError("broker down")
        return real(self, rows)

    monkeypatch.setattr(Publisher, "publish", publish)
    monkeypatch.setattr(Publisher, "headers", lambda self, row: {"seam_saw": row["id"]})
    return calls


def test_spawn_release_sweep_and_callback_all_pass_through_the_one_publisher(publishing_rig, seam):
    rig = publishing_rig
    ids: dict[str, str] = {}

    @rig.handler("seam")
    def handler(context):
        sigs = {name: rig.sig(name) for name in ("free", "first", "second", "third")}
        for name, sig in sigs.items():
            ids[name] = context.freeze(sig)
        depends_on(sigs["second"], ids["first"])
        depends_on(sigs["third"], ids["second"])
        return list(sigs.values())

    config = SpawnConfig(handler="seam").with_on_complete(rig.sig("report")).to_dict()
    result = rig.spawn(config)
    operation_id = rig.operation(result.id)["id"]
    tracker = rig.state.tracker

    # 1. the spawn publishes the children without dependencies
    assert seam == [[ids["free"], ids["first"]]]
    # 2. a dependency's success publishes the dependent it released
    tracker.finish(ids["free"], SUCCEEDED)
    tracker.finish(ids["first"], SUCCEEDED)
    assert seam[-1] == [ids["second"]]
    # 3. a release the broker refused stays pending, and the recovery sweep publishes it
    seam.broker_down = True  # (on PostgreSQL the release is tried ahead of its write, then after it)
    tracker.finish(ids["second"], SUCCEEDED)
    seam.broker_down = False
    assert seam[-1] == [ids["third"]]
    assert {job["id"]: job["state"] for job in rig.jobs(operation_id)}[ids["third"]] == "pending"
    age(rig, operation_id)
    assert recover(rig.app) == 1
    assert seam[-1] == [ids["third"]]
    # 4. the last child's end publishes the on_complete callback
    tracker.finish(ids["third"], FAILED, "boom")
    callback_id = completion_task_id(operation_id)
    assert seam[-1] == [callback_id]

    sent = {message.headers["id"]: message.headers for message in rig.drain()}
    assert sorted(sent) == sorted([ids["free"], ids["first"], ids["second"], ids["third"], callback_id])
    for job_id, headers in sent.items():
        assert headers["seam_saw"] == job_id  # the one place where headers are set reached every message
