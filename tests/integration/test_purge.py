"""Retention on real workers: ``celery spawn purge`` and the ``celery_spawn.purge_expired`` task remove the trees
that finished long ago, whole, and leave running and recent trees alone; on every broker/store combination.

The trees are real spawns; "long ago" is made by moving their finish times back in the store.
"""
from __future__ import annotations

import json
import uuid
from datetime import timedelta

import pytest
import sqlalchemy as sa
from click.testing import CliRunner

from celery_spawn import get_state
from celery_spawn.cli import spawn
from celery_spawn.options import RET_OK, RET_USAGE
from celery_spawn.store import SpawnStore
from celery_spawn.store import schema as s
from tests.harness import StoreBuilder, wait_for
from tests.integration.helpers import TIMEOUT, fails, ok, wait_children, wait_operation_done

pytestmark = pytest.mark.integration


def spawn_numbers(app, values) -> str:
    parent_id = f"purge-{uuid.uuid4().hex[:10]}"
    app.signature("tests.numbers", args=(values,), kwargs={"_spawn_config": {"handler": "numbers"}}
                  ).apply_async(task_id=parent_id)
    wait_children(app, parent_id, len(values))
    wait_operation_done(app, parent_id)
    return parent_id


def age(app, root: str, days: float) -> None:
    """Move a tree's times ``days`` into the past, as if it had finished then."""
    store = get_state(app).store
    with store.begin() as conn:
        for table in (s.operations, s.jobs):
            rows = conn.execute(sa.select(table.c.id, table.c.finished_at, table.c.created_at)
                                .where(table.c.root_id == root)).all()
            for row in rows:
                conn.execute(table.update().where(table.c.id == row.id).values(
                    created_at=row.created_at - timedelta(days=days),
                    finished_at=row.finished_at - timedelta(days=days) if row.finished_at else None))


def count(app, table, root: str) -> int:
    with get_state(app).store.read() as conn:
        return int(conn.execute(sa.select(sa.func.count()).select_from(table).where(table.c.root_id == root)).scalar())


@pytest.fixture(scope="module")
def trees(worker, client_app):
    """An old finished tree, a recent one, and a running one whose times are old too."""
    old, recent = spawn_numbers(client_app, [1, 2, 3]), spawn_numbers(client_app, [4, 5])
    running = f"purge-running-{uuid.uuid4().hex[:8]}"
    client_app.signature("tests.spawner", kwargs={"count": 4, "seconds": 20, "_spawn_config": {"handler": "sleepers"}}
                         ).apply_async(task_id=running)
    wait_children(client_app, running, 4)
    age(client_app, old, 10)
    age(client_app, running, 10)
    return old, recent, running


def test_purge_removes_exactly_the_finished_and_expired_trees(backend, client_app, trees):
    old, recent, running = trees
    dry = json.loads(ok(backend, "purge", "--older-than", "2d", "--dry-run", "--format", "json"))
    assert (dry["dry_run"], dry["trees"], dry["operations"], dry["jobs"]) == (True, 1, 1, 4)
    assert count(client_app, s.jobs, old) == 4

    out = ok(backend, "purge", "--older-than", "2d", "--yes")
    assert out.startswith("purged 1 tree (1 operation, 4 jobs, 0 dependency edges) that finished before ")
    assert count(client_app, s.jobs, old) == 0 and count(client_app, s.operations, old) == 0
    assert count(client_app, s.jobs, recent) == 3 and count(client_app, s.operations, recent) == 1
    assert count(client_app, s.jobs, running) == 5 and count(client_app, s.operations, running) == 1
    assert "would purge 0 trees" in ok(backend, "purge", "--older-than", "2d", "--dry-run")


def test_purge_expired_runs_on_the_worker_with_spawn_expires(backend, client_app, trees):
    _, recent, running = trees
    age(client_app, recent, 40)  # past the default spawn_expires of 30 days
    result = client_app.send_task("celery_spawn.purge_expired").get(timeout=TIMEOUT)
    assert (result["trees"], result["operations"], result["jobs"]) == (1, 1, 3)
    assert count(client_app, s.jobs, recent) == 0
    assert count(client_app, s.jobs, running) == 5
    wait_for(lambda: count(client_app, s.operations, running) == 1, 5, what="the running tree to stay")


def test_purge_refuses_bad_durations(backend):
    for bad in ("soon", "-1d", "1y", "nan"):
        assert "not a duration" in fails(backend, RET_USAGE, "purge", "--older-than", bad)


# ---- in process: output and options --------------------------------------------------------------
@pytest.fixture
def aged_store(sqlite_url):
    store = SpawnStore(sqlite_url)
    store.migrate()
    builder = StoreBuilder(store)
    at = builder.now - timedelta(days=40)
    builder.job("old", created=at, finished=at)
    builder.spawn("old", 3, created=at, finished=at, op_state="succeeded")
    builder.flush()
    store.dispose()
    return sqlite_url


def invoke(*args: str, env: dict | None = None):
    return CliRunner().invoke(spawn, list(args), catch_exceptions=False, env=env)


def test_without_older_than_purge_uses_spawn_expires(aged_store):
    kept = invoke("purge", "-u", aged_store, env={"CELERY_SPAWN_EXPIRES": "0"})
    assert kept.exit_code == RET_OK and "finished trees are kept" in kept.output
    later = invoke("purge", "-u", aged_store, "--dry-run", env={"CELERY_SPAWN_EXPIRES": "45d"})
    assert "would purge 0 trees" in later.output
    due = invoke("purge", "-u", aged_store, "--json", env={"CELERY_SPAWN_EXPIRES": "30d"})
    assert json.loads(due.output)["jobs"] == 4


def test_purge_in_batches_reports_the_total(aged_store):
    result = invoke("purge", "-u", aged_store, "--older-than", str(86_400), "--batch-size", "1", "--yes")
    assert result.exit_code == RET_OK
    assert result.output.startswith("purged 1 tree (1 operation, 4 jobs, 0 dependency edges)")
    assert invoke("purge", "-u", aged_store, "--older-than", "1d", "--batch-size", "0").exit_code == RET_USAGE


def test_purge_pause_ratio_is_checked_and_zero_runs_flat_out(aged_store):
    for bad in ("-1", "nan", "many"):
        refused = CliRunner().invoke(spawn, ["purge", "-u", aged_store, "--older-than", "1d", "--pause-ratio", bad])
        assert refused.exit_code == RET_USAGE and "--pause-ratio" in refused.output
    done = invoke("purge", "-u", aged_store, "--older-than", "1d", "--pause-ratio", "0", "--yes", "--json")
    assert done.exit_code == RET_OK and json.loads(done.output)["jobs"] == 4
