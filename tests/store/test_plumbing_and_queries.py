"""SpawnStore plumbing (transactions, errors, schema probes) and the read API of ``store.queries``."""
from __future__ import annotations

from datetime import timedelta

import pytest
import sqlalchemy as sa

from celery_spawn import StoreError
from celery_spawn.store import SpawnStore, queries
from celery_spawn.store import schema as s
from celery_spawn.store.migrations import head_revision
from tests.harness import StoreBuilder
from tests.store.helpers import job_row, op_row, operation, seed


# ---- transactions -------------------------------------------------------------------------------
def test_transaction_and_begun_commit(store):
    conn = store.transaction()
    with store.begun(conn) as same:
        assert same is conn and conn.in_transaction()
        store.insert_operation(conn, op_row("op"))
    assert conn.closed
    assert operation(store, "op")["id"] == "op"


def test_begun_rolls_back_on_an_error(store):
    conn = store.transaction()
    with pytest.raises(RuntimeError), store.begun(conn):
        store.insert_operation(conn, op_row("op"))
        raise RuntimeError("stop")
    assert conn.closed and operation(store, "op") is None


def test_database_errors_come_out_as_store_errors_without_sql(store):
    seed(store, [op_row("op")])
    conn = store.transaction()
    with pytest.raises(StoreError) as raised, store.begun(conn):
        store.insert_operation(conn, op_row("new"))
        conn.execute(s.operations.insert(), [op_row("op")])  # duplicate key
    assert "spawn store" in str(raised.value) and "INSERT" not in str(raised.value)
    assert operation(store, "new") is None
    with pytest.raises(StoreError), store.begin() as conn:
        store.insert_operation(conn, op_row("other"))
        conn.execute(s.operations.insert(), [op_row("other")])
    assert operation(store, "other") is None


def test_insert_operation_says_when_its_id_is_taken(store):
    seed(store, [op_row("op")])
    with store.begin() as conn:
        assert store.insert_operation(conn, op_row("fresh")) is True
        assert store.insert_operation(conn, {**op_row("op"), "parent_id": "someone-else"}) is False
        assert store.operation_owner(conn, "fresh") == op_row("fresh")["parent_id"]
        assert store.operation_owner(conn, "missing") is None
    assert operation(store, "op")["parent_id"] == op_row("op")["parent_id"]


def test_read_sees_committed_rows(store):
    with store.read() as conn:
        assert store.get_job(conn, "j") is None
    seed(store, [], [job_row("j")])
    with store.read() as conn:
        assert store.get_job(conn, "j")["id"] == "j"


# ---- migrations ---------------------------------------------------------------------------------
def test_upgrading_a_0001_store_keeps_its_rows_and_labels_explicit_ids(store_url):
    from celery_spawn.store import migrations

    engine = sa.create_engine(store_url)
    try:
        assert migrations.upgrade(engine, "0001") == "0001"
        columns = {c["name"] for c in sa.inspect(engine).get_columns("spawn_operations")}
        assert "label" not in columns
        base = {"parent_id": "p", "root_id": "p", "depth": 0, "state": "running", "total": 1,
                "wait_for_descendants": False, "fail_fast": False, "completed": False}
        with engine.begin() as conn:
            conn.execute(sa.text(
                "INSERT INTO spawn_operations (id, parent_id, root_id, depth, state, total, config,"
                " wait_for_descendants, fail_fast, completed, created_at, updated_at) VALUES"
                " (:id, :parent_id, :root_id, :depth, :state, :total, :config, :wait_for_descendants,"
                " :fail_fast, :completed, CURRENT_TIMESTAMP, CURRENT_TIMESTAMP)"),
                [{**base, "id": "nightly", "config": '{"operation_id": "nightly", "handler": "h"}'},
                 {**base, "id": "0b6f3c1e-uuid", "parent_id": "q", "config": '{"handler": "h"}'}])
        assert migrations.upgrade(engine) == migrations.head_revision()
        inspector = sa.inspect(engine)
        assert "label" in {c["name"] for c in inspector.get_columns("spawn_operations")}
        assert "not_before" in {c["name"] for c in inspector.get_columns("spawn_jobs")}
        assert "ix_spawn_operations_label_created" in {i["name"] for i in inspector.get_indexes("spawn_operations")}
        assert "ix_spawn_jobs_scheduled_due" in {i["name"] for i in inspector.get_indexes("spawn_jobs")}
        with engine.connect() as conn:
            labels = dict(conn.execute(sa.text("SELECT id, label FROM spawn_operations")).all())
        assert labels == {"nightly": "nightly", "0b6f3c1e-uuid": None}
    finally:
        engine.dispose()


def test_upgrading_a_0003_store_fills_the_task_rollups_of_complete_operations(store_url):
    """0004 adds ``spawn_task_rollups``: the complete operations of an older store get theirs from their
    children, and ``stats --detailed`` reads the same by task before and after."""
    from datetime import datetime, timezone

    from celery_spawn.store import migrations

    engine = sa.create_engine(store_url)
    store = None
    try:
        assert migrations.upgrade(engine, "0003") == "0003"
        created = datetime.now(timezone.utc).replace(tzinfo=None, microsecond=0) - timedelta(minutes=5)
        ops, jobs = [], []
        for op_id, done in (("op-done", True), ("op-running", False)):
            states = ["succeeded", "failed", "succeeded"] if done else ["succeeded", "started", "pending"]
            rollup = {"children_cancelled": 0, "children_failed": 1, "children_revoked": 0, "children_lost": 0,
                      "children_succeeded": 2, "children_timed": 3, "children_seconds": 6.0,
                      "children_max_seconds": 3.0}
            if not done:
                rollup = dict.fromkeys(rollup)
            ops.append({**op_row(op_id, parent=f"p-{op_id}", state="succeeded" if done else "running", total=3),
                        "root_id": f"p-{op_id}", "created_at": created, "updated_at": created,
                        "completed": done, "finished_at": created + timedelta(seconds=9) if done else None,
                        **rollup})
            for position, state in enumerate(states):
                started = created + timedelta(seconds=position)
                jobs.append({**job_row(f"{op_id}.{position}", op_id, parent=f"p-{op_id}", root=f"p-{op_id}",
                                       position=position, state=state),
                             "task_name": f"tests.t{position % 2}", "created_at": created, "started_at": started,
                             "finished_at": started + timedelta(seconds=position + 1)
                             if state in ("succeeded", "failed") else None})
        old_ops = sa.Table("spawn_operations", sa.MetaData(), autoload_with=engine)
        old_jobs = sa.Table("spawn_jobs", sa.MetaData(), autoload_with=engine)
        with engine.begin() as conn:
            conn.execute(old_ops.insert(), [{k: v for k, v in row.items() if k in old_ops.c} for row in ops])
            conn.execute(old_jobs.insert(), [{k: v for k, v in row.items() if k in old_jobs.c} for row in jobs])
        assert migrations.upgrade(engine) == migrations.head_revision()
        with engine.connect() as conn:
            rollups = {(r.operation_id, r.task_name): (r.jobs, r.succeeded, r.failed, r.timed)
                       for r in conn.execute(sa.select(s.task_rollups))}
        assert rollups == {("op-done", "tests.t0"): (2, 2, 0, 2), ("op-done", "tests.t1"): (1, 0, 1, 1)}
        store = SpawnStore(store_url)
        with store.read() as conn:
            upgraded = queries.stats(conn, detailed=True)["by_task"]
        with store.begin() as conn:
            conn.execute(s.task_rollups.delete())
            conn.execute(s.operations.update().values(children_timed=None))
        with store.read() as conn:
            counted = queries.stats(conn, detailed=True)["by_task"]
        assert [(r["task_name"], r["jobs"], r["succeeded"], r["failed"]) for r in upgraded] == [
            ("tests.t0", 4, 3, 0), ("tests.t1", 2, 0, 1)]
        def rounded(rows):  # SQLite's julianday differences are not exact to the microsecond
            return [{k: round(v, 3) if isinstance(v, float) else v for k, v in row.items()} for row in rows]

        assert rounded(upgraded) == rounded(counted)
    finally:
        if store is not None:
            store.dispose()
        engine.dispose()


# ---- schema probes ------------------------------------------------------------------------------
def test_is_missing_file_has_tables_and_revision(store_url):
    fresh = SpawnStore(store_url, auto_migrate=False)
    try:
        assert fresh.is_missing_file() is (fresh.backend == "sqlite")  # nothing created yet
        assert fresh.revision() is None
        assert fresh.has_tables() is False
        assert fresh.migrate() == head_revision()
        assert fresh.is_missing_file() is False
        assert fresh.has_tables() is True
        assert fresh.revision() == head_revision()
    finally:
        fresh.dispose()


def test_has_tables_is_none_for_an_unreachable_store(store_url, tmp_path):
    backend = sa.make_url(store_url).get_backend_name()
    (tmp_path / "a-file").write_text("not a folder")
    url = {"sqlite": f"sqlite:///{tmp_path / 'a-file' / 'x.sqlite3'}",
           "postgresql": "postgresql+psycopg2://u:p@127.0.0.1:1/x",
           "mysql": "mysql+mysqldb://u:p@127.0.0.1:1/x"}[backend]
    unreachable = SpawnStore(url, auto_migrate=False, connect_timeout=2)
    try:
        assert unreachable.has_tables() is None
        assert unreachable.is_missing_file() is (backend == "sqlite")
    finally:
        unreachable.dispose()


# ---- the read API, on one small tree ------------------------------------------------------------
@pytest.fixture
def tree(store):
    """root -> a, b (failed), c (pending, depends on b) in op-root; a -> a.0, a.1 in op-a (succeeded)."""
    b = StoreBuilder(store)
    b.job("root", task="tests.parent")
    b.operation("op-root", "root", handler="fan", total=3, config='{"batch_size": 3}')
    b.job("a", "root", operation="op-root", position=0)
    b.job("b", "root", operation="op-root", position=1, state="failed", error="boom")
    b.job("c", "root", operation="op-root", position=2, state="pending")
    b.spawn("a", 2, operation="op-a", handler="nested", op_state="succeeded", finished=b.now + timedelta(seconds=4))
    b.depends("c", "b")
    return b.flush()


def ids(rows):
    return [r["id"] for r in rows]


def test_list_operations_and_get_operation(store, tree):
    with store.read() as conn:
        listed = queries.list_operations(conn)
        running = queries.list_operations(conn, state=s.OP_RUNNING)
        one = queries.get_operation(conn, "op-root", children_limit=2)
        assert queries.get_operation(conn, "nope") is None
    assert sorted(ids(listed)) == ["op-a", "op-root"] and ids(running) == ["op-root"]
    assert set(listed[0]) == set(queries.OPERATION_FIELDS) | {"counts", "progress"}
    root = next(op for op in listed if op["id"] == "op-root")
    assert root["counts"] == {"succeeded": 1, "failed": 1, "pending": 1}
    assert root["progress"] == {"done": 2, "total": 3, "percent": 66.7}
    assert set(one) == set(queries.OPERATION_FIELDS) | {"config", "on_complete", "counts", "progress", "children",
                                                        "children_shown"}
    assert one["config"] == {"batch_size": 3} and one["on_complete"] is None and one["completed"] is False
    assert ids(one["children"]) == ["a", "b"] and one["children_shown"] == 2
    assert set(one["children"][0]) == set(queries.JOB_FIELDS)


def test_get_job_parent_and_find_kind(store, tree):
    with store.read() as conn:
        a, c = queries.get_job(conn, "a"), queries.get_job(conn, "c")
        assert queries.get_job(conn, "nope") is None
        assert queries.parent(conn, "a.1")["id"] == "a" and queries.parent(conn, "root") is None
        assert set(queries.parent(conn, "a")) == set(queries.JOB_FIELDS)
        kinds = [queries.find_kind(conn, i) for i in ("a.0", "op-a", "nope")]
    assert kinds == ["job", "operation", None]
    assert set(a) == set(queries.JOB_FIELDS) | {"children_count", "operations", "depends_on"}
    assert a["children_count"] == 2 and [(o["id"], o["state"], o["total"]) for o in a["operations"]] == [
        ("op-a", "succeeded", 2)]
    assert c["depends_on"] == [{"id": "b", "satisfied": False, "ignore_failure": False}]


def test_children_descendants_and_ancestors(store, tree):
    with store.read() as conn:
        kids = queries.children(conn, "root")
        failed = queries.children(conn, "root", state="failed")
        down = queries.descendants(conn, "root")
        up = queries.ancestors(conn, "a.1")
    assert ids(kids) == ["a", "b", "c"] and ids(failed) == ["b"]
    assert ids(down) == ["a", "b", "c", "a.0", "a.1"] and [d["distance"] for d in down] == [1, 1, 1, 2, 2]
    assert ids(up) == ["a", "root"] and [u["distance"] for u in up] == [1, 2]
    assert set(down[0]) == set(queries.JOB_FIELDS) | {"distance"}


def test_spawn_tree(store, tree):
    with store.read() as conn:
        whole = queries.spawn_tree(conn, "root")
        cut = queries.spawn_tree(conn, "root", max_depth=1)
        full = queries.spawn_tree(conn, "a.0", full=True)
        assert queries.spawn_tree(conn, "nope") is None
    assert whole["id"] == "root" and ids(whole["children"]) == ["a", "b", "c"]
    assert ids(whole["children"][0]["children"]) == ["a.0", "a.1"]
    assert set(whole) == set(queries.TREE_FIELDS) - {"parent_id"} | {"children"}
    assert cut["children"][0]["children"] == [] and cut["children"][0]["hidden_children"] == 2
    assert full == whole


def test_stats_and_pending(store, tree):
    with store.read() as conn:
        result = queries.stats(conn, hours=1, now=tree.now + timedelta(minutes=1))
        waiting = queries.pending(conn)
    assert result["operations"] == 2 and result["operations_by_state"] == {"running": 1, "succeeded": 1}
    assert result["children"] == 5 and result["children_by_state"] == {"failed": 1, "pending": 1, "succeeded": 3}
    assert result["success_rate"] == 1.0 and result["child_success_rate"] == 0.75
    assert result["durations"]["operation_max_seconds"] == pytest.approx(4.0, abs=0.01)
    assert {g["handler"] for g in result["by_handler"]} == {"fan", "nested"}
    assert [w["operation_id"] for w in waiting] == ["op-root"]
    entry = waiting[0]
    assert (entry["pending"], entry["held"], entry["total"], entry["handler"]) == (1, 0, 3, "fan")
    assert ids(entry["jobs"]) == ["c"] and set(entry["jobs"][0]) == set(queries.JOB_FIELDS)


def test_the_migrations_build_exactly_the_schema_the_code_declares(store):
    from alembic.autogenerate import compare_metadata
    from alembic.runtime.migration import MigrationContext

    with store.engine.connect() as conn:
        diff = compare_metadata(MigrationContext.configure(conn), s.metadata)
    assert [change for change in diff if "alembic_version" not in str(change)] == []


def _migrate_in_a_process(url, results):
    store = SpawnStore(url, auto_migrate=False)
    try:
        results.put(store.migrate())
    except Exception as exc:  # reported to the test
        results.put(repr(exc))
    finally:
        store.dispose()


def test_processes_racing_to_migrate_a_fresh_store_all_succeed(store_url):
    """Every pool process of a fresh worker migrates on first use, at once: MySQL's DDL is not transactional,
    so without the migration lock some saw another's half-made schema and failed."""
    import multiprocessing

    context = multiprocessing.get_context("fork")
    results = context.Queue()
    racers = [context.Process(target=_migrate_in_a_process, args=(store_url, results)) for _ in range(6)]
    for racer in racers:
        racer.start()
    outcomes = sorted(results.get(timeout=120) for _ in racers)
    for racer in racers:
        racer.join(30)
    assert outcomes == [head_revision()] * len(racers)
