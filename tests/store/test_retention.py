"""Purging expired trees, on every backend: exactly the finished and expired trees go, whole, with no orphan rows;
running trees, recent trees and trees a live job depends on stay whole."""
from __future__ import annotations

from datetime import timedelta

import pytest
import sqlalchemy as sa

from celery_spawn.engine import retention
from celery_spawn.engine.retention import Purger, purge
from celery_spawn.store import schema as s
from celery_spawn.store import utcnow
from celery_spawn.store.rollups import write_task_rollups
from tests.harness import StoreBuilder

DAY = timedelta(days=1)


def finished_tree(builder: StoreBuilder, root: str, *, age: timedelta, children: int = 3, nested: bool = True) -> None:
    """A root with an operation of ``children``, the first of which spawned two more; all finished ``age`` ago."""
    at = builder.now - age
    builder.job(root, created=at, finished=at)
    kids = builder.spawn(root, children, created=at, finished=at, op_state="succeeded")
    if nested:
        builder.spawn(kids[0], 2, created=at, finished=at, op_state="succeeded")
    builder.depends(kids[1], kids[0], satisfied=True)


def rows_of(store, table, root: str) -> int:
    with store.read() as conn:
        return int(conn.execute(sa.select(sa.func.count()).select_from(table).where(table.c.root_id == root)).scalar())


def edges(store) -> set[tuple[str, str]]:
    with store.read() as conn:
        return {(r.job_id, r.depends_on_id) for r in conn.execute(sa.select(s.dependencies))}


def orphans(store) -> int:
    """Jobs, per-task rollups whose operation is gone, and dependency edges whose jobs are gone."""
    with store.read() as conn:
        lost_rollup = conn.execute(sa.select(sa.func.count()).select_from(s.task_rollups).where(
            ~sa.exists().where(s.operations.c.id == s.task_rollups.c.operation_id))).scalar()
        lost_op = conn.execute(sa.select(sa.func.count()).select_from(s.jobs).where(
            s.jobs.c.operation_id.is_not(None),
            ~sa.exists().where(s.operations.c.id == s.jobs.c.operation_id))).scalar()
        lost_edge = conn.execute(sa.select(sa.func.count()).select_from(s.dependencies).where(
            ~sa.exists().where(s.jobs.c.id == s.dependencies.c.job_id))).scalar()
    return int(lost_op) + int(lost_edge) + int(lost_rollup)


@pytest.fixture
def builder(store):
    made = StoreBuilder(store, now=utcnow().replace(microsecond=0))
    return made


def test_only_the_finished_and_expired_trees_go(store, builder):
    finished_tree(builder, "old-a", age=40 * DAY)
    finished_tree(builder, "old-b", age=31 * DAY, nested=False)
    finished_tree(builder, "recent", age=2 * DAY)
    # an old tree with one child still running, and one with a nested operation still running
    at = builder.now - 40 * DAY
    builder.job("running", created=at, finished=at)
    builder.spawn("running", 2, created=at, finished=at, op_state="succeeded", states=["succeeded", "started"])
    builder.job("nested-running", created=at, finished=at)
    kids = builder.spawn("nested-running", 2, created=at, finished=at, op_state="succeeded")
    builder.spawn(kids[0], 1, created=at, states=["dispatched"])  # op_state running, no finished_at
    builder.flush()
    with store.begin() as conn:  # the complete operations' per-task rollups, as their completion writes them
        write_task_rollups(conn, s.operations.c.root_id.in_(["old-a", "old-b", "recent"]))

    report = Purger(store).purge(30 * DAY)

    assert (report.trees, report.operations, report.jobs) == (2, 3, 10)
    assert report.edges == 2
    for root in ("old-a", "old-b"):
        assert rows_of(store, s.jobs, root) == 0 and rows_of(store, s.operations, root) == 0
    assert rows_of(store, s.jobs, "recent") == 6 and rows_of(store, s.operations, "recent") == 2
    assert rows_of(store, s.jobs, "running") == 3 and rows_of(store, s.jobs, "nested-running") == 4
    assert ("recent.1", "recent.0") in edges(store)
    with store.read() as conn:
        assert {row.operation_id for row in conn.execute(sa.select(s.task_rollups))} == {"op-recent", "op-recent.0"}
    assert orphans(store) == 0


def test_a_tree_a_live_job_depends_on_stays(store, builder):
    finished_tree(builder, "needed", age=40 * DAY, nested=False)
    builder.job("live")
    builder.spawn("live", 1, states=["held"])
    builder.depends("live.0", "needed.2")
    builder.flush()

    assert Purger(store).purge(30 * DAY).trees == 0
    assert rows_of(store, s.jobs, "needed") == 4


def test_a_tree_whose_top_job_is_unfinished_stays(store, builder):
    """Every operation finished long ago, but the job at the top (spawned by no operation) still runs."""
    at = builder.now - 40 * DAY
    builder.job("top", created=at, state="started")
    builder.spawn("top", 2, created=at, finished=at, op_state="succeeded")
    finished_tree(builder, "done", age=40 * DAY, nested=False)
    builder.flush()

    report = Purger(store).purge(30 * DAY)

    assert report.trees == 1
    assert rows_of(store, s.jobs, "top") == 3 and rows_of(store, s.operations, "top") == 1


def test_small_batches_delete_big_trees_whole_in_the_end(store, builder):
    at = builder.now - 40 * DAY
    for root in ("big-1", "big-2"):
        builder.job(root, created=at, finished=at)
        kids = builder.spawn(root, 7, created=at, finished=at, op_state="succeeded")
        builder.spawn(kids[3], 4, created=at, finished=at, op_state="succeeded")
    builder.flush()
    seen = []

    report = Purger(store).purge(30 * DAY, batch_size=3, progress=seen.append)

    assert (report.trees, report.operations, report.jobs) == (2, 4, 24)
    assert all(0 < n <= 3 for n in seen) and sum(seen) == 24
    assert orphans(store) == 0
    with store.read() as conn:
        assert conn.execute(sa.select(sa.func.count()).select_from(s.jobs)).scalar() == 0
        assert conn.execute(sa.select(sa.func.count()).select_from(s.operations)).scalar() == 0


def test_batches_take_whole_trees_and_cut_only_a_tree_bigger_than_a_batch(store, builder):
    at = builder.now - 40 * DAY
    for root in ("a-small", "b-small", "d-small"):  # 1 + 3 + 2 = 6 jobs each
        finished_tree(builder, root, age=40 * DAY)
    builder.job("c-big", created=at, finished=at)  # 1 + 9 + 4 = 14 jobs: bigger than a batch of 8
    kids = builder.spawn("c-big", 9, created=at, finished=at, op_state="succeeded")
    builder.spawn(kids[2], 4, created=at, finished=at, op_state="succeeded")
    builder.job("e-live", created=at, finished=at)  # vetoed inside the page: left whole, the rest goes on
    builder.spawn("e-live", 2, created=at, finished=at, op_state="succeeded", states=["succeeded", "started"])
    finished_tree(builder, "f-small", age=40 * DAY)
    builder.flush()
    roots = ["a-small", "b-small", "c-big", "d-small", "e-live", "f-small"]
    batches = []
    while roots:
        deleted = store.delete_trees(roots, builder.now - 30 * DAY, batch_size=8)
        batches.append((deleted.jobs, deleted.trees))
        roots = deleted.remaining

    assert all(jobs <= 8 for jobs, _ in batches)
    assert sum(jobs for jobs, _ in batches) == 4 * 6 + 14 and sum(trees for _, trees in batches) == 5
    assert (6, 1) in batches  # a small tree goes whole, never cut in two
    assert rows_of(store, s.jobs, "e-live") == 3 and rows_of(store, s.operations, "e-live") == 1
    assert orphans(store) == 0


def test_edges_to_a_purged_tree_from_a_finished_tree_go_with_it(store, builder):
    finished_tree(builder, "old", age=40 * DAY, nested=False)
    at = builder.now - 2 * DAY
    builder.job("later", created=at, finished=at)
    builder.spawn("later", 1, created=at, finished=at, op_state="succeeded")
    builder.depends("later.0", "old.2", satisfied=True)
    builder.flush()

    report = Purger(store).purge(30 * DAY)

    assert (report.trees, report.edges) == (1, 2)
    assert edges(store) == set() and rows_of(store, s.jobs, "later") == 2
    assert orphans(store) == 0


def test_a_dry_run_counts_and_deletes_nothing(store, builder):
    finished_tree(builder, "old", age=40 * DAY)
    builder.flush()
    report = Purger(store).purge(30 * DAY, dry_run=True)
    assert (report.dry_run, report.trees, report.operations, report.jobs) == (True, 1, 2, 6)
    assert rows_of(store, s.jobs, "old") == 6


def test_expires_zero_keeps_everything_and_durations_are_read(store, builder):
    finished_tree(builder, "old", age=40 * DAY)
    builder.flush()
    assert purge(store, 0)["trees"] == 0
    assert purge(store, 30 * 86_400, dry_run=True)["jobs"] == 6
    assert purge(store, 0, "45d")["trees"] == 0
    assert purge(store, 0, "30d")["trees"] == 1
    assert rows_of(store, s.jobs, "old") == 0


def test_a_purge_rests_in_proportion_to_its_work(store, builder, monkeypatch):
    for root in ("old-a", "old-b", "old-c"):
        finished_tree(builder, root, age=40 * DAY)
    builder.flush()
    rests: list[float] = []
    monkeypatch.setattr(retention.time, "sleep", rests.append)

    report = Purger(store).purge(30 * DAY, batch_size=6, pause_ratio=2.0)

    assert report.trees == 3 and orphans(store) == 0
    assert len(rests) == 4  # after the page of roots, and after each of the three batches
    assert all(0 < rest <= retention.MAX_PAUSE for rest in rests)
    rests.clear()
    finished_tree(builder, "old-d", age=40 * DAY)
    builder.flush()
    assert Purger(store).purge(30 * DAY, pause_ratio=0).trees == 1
    assert rests == []  # full speed
    for bad in (-1, float("nan")):
        with pytest.raises(ValueError, match="pause ratio"):
            Purger(store).purge(30 * DAY, pause_ratio=bad)


def test_a_pace_rests_its_ratio_of_each_step_up_to_a_cap():
    now = [0.0]
    rests: list[float] = []

    def work(seconds: float) -> str:
        now[0] += seconds
        return "done"

    pace = retention.Pace(0.5, sleep=rests.append, clock=lambda: now[0])
    assert pace.step(work, 2.0) == "done"
    pace.step(work, 60.0)
    assert rests == [1.0, retention.MAX_PAUSE]
    assert pace.rested == 1.0 + retention.MAX_PAUSE
