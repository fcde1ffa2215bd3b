"""The metrics counted in-process: spawns by outcome, children spawned and finished, cancels, the sweep.

These read the client's default registry of this process, where celery-spawn
counts once ``prometheus_client`` is imported; each test compares before and
after, since the registry lives as long as the process.
"""
from __future__ import annotations

import pytest

from celery_spawn import cancel, metrics
from celery_spawn.errors import SpawnLimitExceeded

prometheus = pytest.importorskip("prometheus_client")


def sample(name: str, **labels: str) -> float:
    return prometheus.REGISTRY.get_sample_value(name, labels) or 0.0


class Delta:
    """The change of some samples between the start and now."""

    def __init__(self, *samples: tuple[str, dict]) -> None:
        self.samples = samples
        self.before = [sample(name, **labels) for name, labels in samples]

    def now(self) -> list[float]:
        return [sample(name, **labels) - before for (name, labels), before in zip(self.samples, self.before)]


def test_spawns_children_and_finishes_are_counted(sqlite_rig):
    rig = sqlite_rig
    assert metrics.active() is not None  # prometheus_client is imported: counting is on

    @rig.handler("metered")
    def metered(context):
        return [rig.sig(i) for i in range(3)]

    delta = Delta(("celery_spawn_spawns_total", {"handler": "metered", "outcome": "recorded"}),
                  ("celery_spawn_spawns_total", {"handler": "metered", "outcome": "refused"}),
                  ("celery_spawn_children_spawned_total", {"handler": "metered"}),
                  ("celery_spawn_children_finished_total", {"state": "succeeded"}),
                  ("celery_spawn_spawn_seconds_count", {"handler": "metered"}))
    rig.spawn({"handler": "metered"})
    refused = rig.spawn({"handler": "metered", "max_spawn_count": 2})
    assert refused.get() == "parent-result" and type(rig.failures[-1][1]) is SpawnLimitExceeded
    assert delta.now() == [1, 1, 3, 3, 2]


def test_a_cancel_counts_what_it_cancelled(broker_rig):
    rig = broker_rig

    @rig.handler("chained")
    def chained(context):
        first = rig.sig(1)
        context.freeze(first)
        second = rig.sig(2)
        second.options["depends_on"] = [first.id]
        return [first, second]

    delta = Delta(("celery_spawn_children_finished_total", {"state": "cancelled"}),
                  ("celery_spawn_children_finished_total", {"state": "revoked"}))
    result = rig.spawn({"handler": "chained"})
    cancel(rig.app, result.id)
    assert sum(delta.now()) == 2  # each child counted once, in the state the cancel gave it


def test_the_sweep_counts_stranded_children(sqlite_rig, monkeypatch):
    from tests.unit.helpers import age, fail_publishing

    rig = sqlite_rig
    rig.app.conf.task_always_eager = False

    @rig.handler("stranded")
    def stranded(context):
        return [rig.sig(i) for i in range(2)]

    fail_publishing(monkeypatch)
    result = rig.spawn({"handler": "stranded"})
    monkeypatch.undo()
    rig.app.conf.task_always_eager = True
    age(rig, rig.operation(result.id)["id"])
    delta = Delta(("celery_spawn_sweep_republished_total", {"reason": "stranded"}))
    assert rig.state.sweeper.sweep(grace_seconds=0).published == 2
    assert delta.now() == [2]


def test_dropped_tracking_events_are_counted(monkeypatch, sqlite_rig):
    from celery_spawn.engine import writebehind

    queue = writebehind.WriteBehind(sqlite_rig.state.tracker)
    monkeypatch.setattr(writebehind, "MAX_QUEUED", 0)
    monkeypatch.setattr(queue, "_thread", type("Alive", (), {"is_alive": lambda self: True})())
    delta = Delta(("celery_spawn_tracking_events_dropped_total", {}))
    queue._events.append(writebehind.Event(writebehind.START, "a"))
    queue.add(writebehind.Event(writebehind.START, "b"))
    assert delta.now() == [1]
