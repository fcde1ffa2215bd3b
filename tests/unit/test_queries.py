"""The read queries on SQLite, PostgreSQL and MariaDB: trees built row by row, answers checked by hand.

Every test runs on each SQL backend (the ``store_url`` fixture). Statement
counts are taken with a ``before_cursor_execute`` listener, so "bounded
whatever the tree size" is measured, not assumed.
"""
from __future__ import annotations

from datetime import timedelta

import pytest
import sqlalchemy as sa
from celery import Celery

from celery_spawn import get_state, install, render
from celery_spawn.store import SpawnStore, direct, queries
from celery_spawn.store import schema as s
from tests.harness import StoreBuilder, counting

NASTY_QUEUE = "q'; DROP TABLE spawn_jobs; --\"`\\"


@pytest.fixture
def store(store_url):
    store = SpawnStore(store_url)
    store.migrate()
    yield store
    store.dispose()


@pytest.fixture
def tree(store):
    """root -> a, b, c (op-root); a -> a.0, a.1 (op-a); a.0 -> a.0.0 (op-a.0); c is pending, b failed."""
    b = StoreBuilder(store)
    b.job("root", task="tests.parent")
    b.operation("op-root", "root", handler="fan", queue="q", total=3, config='{"batch_size": 7}')
    # Inserted out of order: the queries must give spawn order (position), not insertion order.
    b.job("c", "root", operation="op-root", position=2, state="pending", task="tests.child")
    b.job("a", "root", operation="op-root", position=0, task="tests.child")
    b.job("b", "root", operation="op-root", position=1, state="failed", task="tests.child", error="boom")
    b.spawn("a", 2, operation="op-a", handler="nested", op_state="succeeded", finished=b.now + timedelta(seconds=5))
    b.spawn("a.0", 1, operation="op-a.0", handler="nested", queue="other")
    b.depends("c", "b")
    return b.flush()


def ids(nodes):
    return [n["id"] for n in nodes]


# ---- trees ------------------------------------------------------------------------------------
def test_spawn_tree_nests_in_spawn_order(store, tree):
    with store.read() as conn:
        root = queries.spawn_tree(conn, "root")
    assert root["id"] == "root" and root["depth"] == 0 and root["task_name"] == "tests.parent"
    assert ids(root["children"]) == ["a", "b", "c"]
    a, b, c = root["children"]
    assert (a["state"], b["state"], c["state"]) == ("succeeded", "failed", "pending")
    assert a["operation_id"] == "op-root" and a["depth"] == 1 and a["queue"] == "q"
    assert ids(a["children"]) == ["a.0", "a.1"]
    assert ids(a["children"][0]["children"]) == ["a.0.0"]
    assert a["children"][0]["children"][0] == {
        "id": "a.0.0", "task_name": "tests.child", "state": "succeeded", "depth": 3, "queue": "other",
        "operation_id": "op-a.0", "position": 0, "children": []}
    assert "hidden_children" not in a


def test_spawn_tree_max_depth_counts_what_it_cuts(store, tree):
    with store.read() as conn:
        root = queries.spawn_tree(conn, "root", max_depth=1)
        alone = queries.spawn_tree(conn, "root", max_depth=0)
    a, b, c = root["children"]
    assert a["children"] == [] and a["hidden_children"] == 2
    assert "hidden_children" not in b and "hidden_children" not in c
    assert alone["children"] == [] and alone["hidden_children"] == 3


def test_spawn_tree_full_starts_at_the_root(store, tree):
    with store.read() as conn:
        sub = queries.spawn_tree(conn, "a.0")
        full = queries.spawn_tree(conn, "a.0.0", full=True)
        assert queries.spawn_tree(conn, "nope") is None
        assert queries.spawn_tree(conn, "nope", full=True) is None
    assert sub["id"] == "a.0" and ids(sub["children"]) == ["a.0.0"]
    assert full["id"] == "root" and len(full["children"]) == 3


def test_spawn_tree_of_a_top_is_one_range_without_the_other_trees_of_its_workflow(store):
    """Two spawning parents inside one Celery workflow share its root_id: each tree holds only its own jobs."""
    b = StoreBuilder(store)
    b.job("t1", "workflow")  # the workflow's root task itself is not recorded: t1 and t2 are tops
    b.job("t2", "workflow")
    b.spawn("t1", 3)
    b.spawn("t2", 2)
    b.spawn("t1.0", 2)
    b.flush()
    with store.read() as conn:
        conn.exec_driver_sql("SELECT 1")
        with counting(store) as seen:
            t1 = queries.spawn_tree(conn, "t1")
        assert len(seen) == 1
        with counting(store) as seen:
            cut = queries.spawn_tree(conn, "t1", max_depth=1)
        assert len(seen) == 2
        full = queries.spawn_tree(conn, "t1.0.1", full=True)
        sub = queries.spawn_tree(conn, "t1.0")
        t2 = queries.spawn_tree(conn, "t2", max_depth=5)
    assert ids(t1["children"]) == ["t1.0", "t1.1", "t1.2"]
    assert ids(t1["children"][0]["children"]) == ["t1.0.0", "t1.0.1"]
    assert t1["children"][0]["children"][0]["depth"] == 2 and "parent_id" not in t1
    assert full == t1
    assert ids(cut["children"]) == ["t1.0", "t1.1", "t1.2"] and cut["children"][0]["hidden_children"] == 2
    assert sub["id"] == "t1.0" and ids(sub["children"]) == ["t1.0.0", "t1.0.1"]
    assert ids(t2["children"]) == ["t2.0", "t2.1"] and all(not n["children"] for n in t2["children"])


def test_spawn_tree_survives_a_corrupt_parent_cycle(store):
    b = StoreBuilder(store)
    b.job("x", "y")
    b.job("y", "x")  # x -> y -> x: no top, every walk must stop
    b.flush()
    with store.read() as conn:
        tree = queries.spawn_tree(conn, "x")
        full = queries.spawn_tree(conn, "x", full=True)
    assert tree["id"] == "x" and ids(tree["children"]) == ["y"] and tree["children"][0]["children"] == []
    assert full["id"] in ("x", "y") and len(full["children"]) == 1 and full["children"][0]["children"] == []


def test_children_descendants_ancestors(store, tree):
    with store.read() as conn:
        assert ids(queries.children(conn, "root")) == ["a", "b", "c"]
        assert ids(queries.children(conn, "root", state="failed")) == ["b"]
        assert ids(queries.children(conn, "root", state=["failed", "pending"])) == ["b", "c"]
        assert ids(queries.children(conn, "root", depth=2)) == ["a", "b", "c", "a.0", "a.1"]
        assert ids(queries.children(conn, "root", depth=2, limit=4)) == ["a", "b", "c", "a.0"]
        assert queries.children(conn, "a.1") == []
        assert queries.children(conn, "nope") == []
        down = queries.descendants(conn, "root")
        assert ids(down) == ["a", "b", "c", "a.0", "a.1", "a.0.0"]
        assert [d["distance"] for d in down] == [1, 1, 1, 2, 2, 3]
        assert ids(queries.descendants(conn, "root", depth=1)) == ["a", "b", "c"]
        up = queries.ancestors(conn, "a.0.0")
        assert ids(up) == ["a.0", "a", "root"] and [u["distance"] for u in up] == [1, 2, 3]
        assert ids(queries.ancestors(conn, "a.0.0", depth=2)) == ["a.0", "a"]
        assert queries.ancestors(conn, "root") == []
        assert queries.parent(conn, "a.0")["id"] == "a"
        assert queries.parent(conn, "root") is None
    assert "message" not in down[0]
    assert set(queries.JOB_FIELDS) | {"distance"} == set(down[0])


def test_get_job(store, tree):
    with store.read() as conn:
        a = queries.get_job(conn, "a")
        c = queries.get_job(conn, "c")
        assert queries.get_job(conn, "nope") is None
        assert queries.find_kind(conn, "a") == "job"
        assert queries.find_kind(conn, "op-a") == "operation"
        assert queries.find_kind(conn, "nope") is None
    assert a["children_count"] == 2 and a["parent_id"] == "root" and a["root_id"] == "root"
    assert [op["id"] for op in a["operations"]] == ["op-a"] and a["operations"][0]["total"] == 2
    assert a["depends_on"] == []
    assert c["depends_on"] == [{"id": "b", "satisfied": False, "ignore_failure": False}]
    assert c["children_count"] == 0 and c["operations"] == []


# ---- operations -------------------------------------------------------------------------------
def test_get_operation(store, tree):
    with store.read() as conn:
        op = queries.get_operation(conn, "op-root")
        few = queries.get_operation(conn, "op-root", children_limit=2)
        assert queries.get_operation(conn, "nope") is None
    assert op["parent_id"] == "root" and op["handler"] == "fan" and op["total"] == 3
    assert op["config"] == {"batch_size": 7}
    assert op["counts"] == {"succeeded": 1, "failed": 1, "pending": 1}
    assert op["progress"] == {"done": 2, "total": 3, "percent": 66.7}
    assert ids(op["children"]) == ["a", "b", "c"] and op["children_shown"] == 3
    assert op["completed"] is False and op["fail_fast"] is False
    assert ids(few["children"]) == ["a", "b"] and few["children_shown"] == 2


def test_list_operations(store, tree):
    older = StoreBuilder(store, now=tree.now - timedelta(hours=30))
    older.job("old")
    older.spawn("old", 4, queue=NASTY_QUEUE, op_state="succeeded", finished=older.now + timedelta(seconds=9))
    older.flush()
    with store.read() as conn:
        everything = queries.list_operations(conn)
        assert ids(everything)[-1] == "op-old"  # newest first
        assert set(ids(everything)) == {"op-root", "op-a", "op-a.0", "op-old"}
        root = next(op for op in everything if op["id"] == "op-root")
        assert root["counts"] == {"succeeded": 1, "failed": 1, "pending": 1}
        assert root["progress"]["done"] == 2
        assert "config" not in root
        assert len(queries.list_operations(conn, limit=2)) == 2
        assert ids(queries.list_operations(conn, queue=NASTY_QUEUE)) == ["op-old"]
        assert ids(queries.list_operations(conn, queue="other")) == ["op-a.0"]
        assert ids(queries.list_operations(conn, state="succeeded")) == ["op-a", "op-old"]
        recent = queries.list_operations(conn, since=tree.now - timedelta(hours=1))
        assert "op-old" not in ids(recent) and len(recent) == 3
        old = queries.list_operations(conn, queue=NASTY_QUEUE)[0]
        assert old["counts"] == {"succeeded": 4} and old["progress"] == {"done": 4, "total": 4, "percent": 100.0}
        assert conn.execute(sa.select(sa.func.count()).select_from(s.jobs)).scalar() == 12


def test_values_reach_sql_only_as_parameters(store, tree):
    with counting(store) as statements, store.read() as conn:
        queries.list_operations(conn, queue=NASTY_QUEUE)
        queries.stats(conn, queue=NASTY_QUEUE)
        queries.pending(conn, queue=NASTY_QUEUE)
        queries.spawn_tree(conn, NASTY_QUEUE, full=True)
        queries.get_job(conn, NASTY_QUEUE)
    assert statements
    assert not [sql for sql in statements if "DROP" in sql]


# ---- stats ------------------------------------------------------------------------------------
def test_stats(store):
    b = StoreBuilder(store)
    now = b.now
    b.job("p1")
    b.spawn("p1", 4, queue="images", handler="resize", op_state="succeeded", finished=now + timedelta(seconds=10))
    b.job("p2")
    b.spawn("p2", 2, queue="images", handler="resize", states=["succeeded", "failed"], op_state="partially_failed",
            finished=now + timedelta(seconds=4))
    b.job("p3")
    b.spawn("p3", 6, queue="etl", handler="split", states=["started"], op_state="running")
    old = now - timedelta(hours=48)
    b.job("p4", created=old)
    b.spawn("p4", 9, queue="etl", handler="split", op_state="succeeded", created=old, finished=old)
    b.flush()
    with store.read() as conn:
        result = queries.stats(conn, hours=24, now=now + timedelta(minutes=1))
        images = queries.stats(conn, hours=24, queue="images", now=now + timedelta(minutes=1))
        wide = queries.stats(conn, hours=100, now=now + timedelta(minutes=1))
        detailed = queries.stats(conn, hours=24, detailed=True, now=now + timedelta(minutes=1))
        nothing = queries.stats(conn, hours=24, queue="nope")
    assert result["operations"] == 3
    assert result["operations_by_state"] == {"partially_failed": 1, "running": 1, "succeeded": 1}
    assert result["children"] == 12
    assert result["avg_children_per_spawn"] == 4.0 and result["max_children_per_spawn"] == 6
    assert result["success_rate"] == 0.5  # 1 of 2 finished operations
    assert result["children_by_state"] == {"failed": 1, "started": 6, "succeeded": 5}
    assert result["child_success_rate"] == round(5 / 6, 4)
    durations = result["durations"]
    assert durations["operation_avg_seconds"] == pytest.approx(7.0, abs=0.01)
    assert durations["operation_max_seconds"] == pytest.approx(10.0, abs=0.01)
    assert durations["child_avg_seconds"] == pytest.approx(2.0, abs=0.01)
    assert durations["child_max_seconds"] == pytest.approx(2.0, abs=0.01)
    by_queue = {g["queue"]: g for g in result["by_queue"]}
    assert by_queue["images"]["operations"] == 2 and by_queue["images"]["children"] == 6
    assert by_queue["images"]["success_rate"] == 0.5
    assert by_queue["images"]["avg_duration_seconds"] == pytest.approx(7.0, abs=0.01)
    assert by_queue["etl"]["operations"] == 1 and by_queue["etl"]["success_rate"] is None
    assert [g["handler"] for g in result["by_handler"]] == ["resize", "split"]
    assert images["operations"] == 2 and images["children_by_state"] == {"failed": 1, "succeeded": 5}
    assert wide["operations"] == 4 and wide["children"] == 21 and wide["max_children_per_spawn"] == 9
    assert "by_task" not in result
    assert detailed["by_task"] == [{"task_name": "tests.child", "jobs": 12, "succeeded": 5, "failed": 1,
                                    "success_rate": round(5 / 6, 4), "avg_seconds": pytest.approx(2.0, abs=0.01),
                                    "max_seconds": pytest.approx(2.0, abs=0.01)}]
    assert [o["id"] for o in detailed["largest"]] == ["op-p3", "op-p1", "op-p2"]
    assert [o["id"] for o in detailed["slowest"]] == ["op-p1", "op-p2"]
    assert detailed["slowest"][0]["seconds"] == pytest.approx(10.0, abs=0.01)
    assert nothing["operations"] == 0 and nothing["avg_children_per_spawn"] is None
    assert nothing["success_rate"] is None and nothing["by_queue"] == []


def task_rollup_rows(store) -> list[dict]:
    with store.read() as conn:
        return [dict(row) for row in conn.execute(sa.select(s.task_rollups)).mappings()]


ROLLUP_COLUMNS = [*s.CHILD_COUNT_COLUMNS.values(), "children_timed", "children_seconds", "children_max_seconds"]


@pytest.fixture
def tracker(store_url, store):
    """The Tracker of an app on the same store: operations complete through the workers' own path."""
    app = Celery("stats", broker="memory://", set_as_current=False)
    install(app, database_url=store_url)
    yield get_state(app).tracker
    get_state(app).store.dispose()


def rounded(value):
    """A stats result with floats rounded to milliseconds (SQLite's julianday differences are not exact)."""
    if isinstance(value, dict):
        return {k: rounded(v) for k, v in value.items()}
    if isinstance(value, list):
        return [rounded(v) for v in value]
    return round(value, 3) if isinstance(value, float) else value


def rollups(store) -> dict[str, dict]:
    with store.read() as conn:
        rows = conn.execute(sa.select(s.operations.c.id, *(s.operations.c[c] for c in ROLLUP_COLUMNS))).mappings()
        return {row["id"]: {c: queries._num(row[c]) for c in ROLLUP_COLUMNS} for row in rows}


def test_stats_from_rollups_equal_stats_from_the_children(store, tracker):
    """Operations completed by the Tracker carry their children's rollup; stats read it instead of the
    children and answer what counting every child answers, with running operations and operations
    completed without a rollup in the same window."""
    b = StoreBuilder(store)
    now = b.now
    old = now - timedelta(hours=48)

    def spawn(parent, queue, handler, children, *, created=None, op_state="running"):
        """``children``: (state, seconds from start to finish, or None for a child that never started)."""
        created = created or now
        b.job(parent, created=created)
        b.operation(f"op-{parent}", parent, handler=handler, queue=queue, state=op_state, total=len(children),
                    created=created, finished=created + timedelta(seconds=30) if op_state != "running" else None)
        for position, (state, seconds) in enumerate(children):
            started = created + timedelta(seconds=position)
            row = b.job(f"{parent}.{position}", parent, operation=f"op-{parent}", position=position, state=state,
                        task=f"tests.{handler}.{position % 2}", queue=queue, created=created, started=started,
                        finished=started + timedelta(seconds=seconds) if seconds is not None else None)
            if seconds is None:
                row["started_at"] = None
                row["finished_at"] = now if state in s.FINAL_JOB_STATES else None

    spawn("p1", "images", "resize", [("succeeded", 1.5), ("succeeded", 3.25), ("failed", 0.5), ("revoked", 7.125),
                                     ("cancelled", None)])
    spawn("p2", "etl", "split", [("succeeded", 2), ("succeeded", 4.5), ("succeeded", 0.25)])
    spawn("p3", "etl", "split", [])
    spawn("p4", "images", "resize", [("succeeded", 1), ("started", None), ("pending", None), ("held", None),
                                     ("retrying", None), ("dispatched", None), ("failed", 9)])
    spawn("p5", "etl", "split", [("succeeded", 11), ("cancelled", None)], op_state="succeeded")  # no rollup
    spawn("p6", "images", "resize", [("succeeded", 100), ("failed", 50)], created=old)
    b.flush()
    for parent in ("p1", "p2", "p3", "p4", "p6"):
        tracker.check_completion(f"op-{parent}")

    written = rollups(store)
    assert written["op-p1"] == {"children_cancelled": 1, "children_failed": 1, "children_revoked": 1,
                                "children_lost": 0,
                                "children_succeeded": 2, "children_timed": 4,
                                "children_seconds": pytest.approx(12.375, abs=1e-3),
                                "children_max_seconds": pytest.approx(7.125, abs=1e-3)}
    assert written["op-p2"]["children_succeeded"] == 3 and written["op-p2"]["children_timed"] == 3
    assert written["op-p3"] == {**{c: 0 for c in s.CHILD_COUNT_COLUMNS.values()}, "children_timed": 0,
                                "children_seconds": 0, "children_max_seconds": None}
    assert written["op-p6"]["children_failed"] == 1
    assert set(written["op-p4"].values()) == {None}  # still running
    assert set(written["op-p5"].values()) == {None}  # completed without a rollup

    later = now + timedelta(minutes=1)
    calls = {"all": {}, "images": {"queue": "images"}, "etl": {"queue": "etl"}, "wide": {"hours": 100},
             "none": {"queue": "nope"}, "detailed": {"detailed": True},
             "images detailed": {"queue": "images", "detailed": True},
             "wide detailed": {"hours": 100, "detailed": True}}
    with store.read() as conn:
        from_rollups = {name: queries.stats(conn, now=later, **kwargs) for name, kwargs in calls.items()}
    everything = from_rollups["all"]
    assert everything["operations"] == 5 and everything["children"] == 17
    assert everything["children_by_state"] == {"cancelled": 2, "dispatched": 1, "failed": 2, "held": 1,
                                               "pending": 1, "retrying": 1, "revoked": 1, "started": 1,
                                               "succeeded": 7}
    assert everything["child_success_rate"] == round(7 / 12, 4)
    assert everything["durations"]["child_avg_seconds"] == pytest.approx(40.125 / 10, abs=1e-3)
    assert everything["durations"]["child_max_seconds"] == pytest.approx(11, abs=1e-3)
    assert from_rollups["images"]["children_by_state"] == {
        "cancelled": 1, "dispatched": 1, "failed": 2, "held": 1, "pending": 1, "retrying": 1, "revoked": 1,
        "started": 1, "succeeded": 3}
    assert from_rollups["wide"]["durations"]["child_max_seconds"] == pytest.approx(100, abs=1e-3)
    by_task = {row["task_name"]: row for row in from_rollups["detailed"]["by_task"]}
    assert {name: (row["jobs"], row["succeeded"], row["failed"]) for name, row in by_task.items()} == {
        "tests.resize.0": (7, 2, 2), "tests.resize.1": (5, 1, 0), "tests.split.0": (3, 3, 0),
        "tests.split.1": (2, 1, 0)}
    assert by_task["tests.split.1"]["max_seconds"] == pytest.approx(4.5, abs=1e-3)
    task_rollups = task_rollup_rows(store)
    assert {(r["operation_id"], r["task_name"]): r["jobs"] for r in task_rollups} == {
        ("op-p1", "tests.resize.0"): 3, ("op-p1", "tests.resize.1"): 2, ("op-p2", "tests.split.0"): 2,
        ("op-p2", "tests.split.1"): 1, ("op-p6", "tests.resize.0"): 1, ("op-p6", "tests.resize.1"): 1}

    # The same stats from the children alone: without rollups every child is counted.
    with store.begin() as conn:
        conn.execute(s.operations.update().values({c: None for c in ROLLUP_COLUMNS}))
        conn.execute(s.task_rollups.delete())
    with store.read() as conn:
        from_children = {name: queries.stats(conn, now=later, **kwargs) for name, kwargs in calls.items()}
    assert rounded(from_rollups) == rounded(from_children)

    # And the children of a rolled-up operation are not read again: stats stand without them.
    with store.begin() as conn:
        for operation_id, values in written.items():
            conn.execute(s.operations.update().where(s.operations.c.id == operation_id).values(values))
        conn.execute(s.task_rollups.insert(), task_rollups)
        conn.execute(s.jobs.delete().where(s.jobs.c.operation_id.in_(["op-p1", "op-p2", "op-p6"])))
    with store.read() as conn:
        without_children = {name: queries.stats(conn, now=later, **kwargs) for name, kwargs in calls.items()}
    assert rounded(without_children) == rounded(from_rollups)


def test_a_rollup_needs_every_child_final(store, tracker):
    """A completion that counts a child still running (a race the probe normally rules out) writes no rollup."""
    b = StoreBuilder(store)
    b.job("p")
    b.spawn("p", 3, states=["succeeded", "started"])
    b.flush()
    with store.read() as conn:
        counts, rollup = store.tally(conn, "op-p")
    assert counts == {"succeeded": 2, "started": 1} and rollup == {}


# ---- pending ----------------------------------------------------------------------------------
def test_pending(store):
    b = StoreBuilder(store)
    b.job("p")
    b.spawn("p", 5, states=["pending", "held", "dispatched"], queue="work")
    b.job("r")
    b.spawn("r", 3, states=["succeeded"])
    b.job("z", created=b.now - timedelta(minutes=5))
    b.spawn("z", 2, states=["pending"], queue="other", created=b.now - timedelta(minutes=5))
    b.flush()
    with store.read() as conn:
        entries = queries.pending(conn)
        few = queries.pending(conn, jobs_per_operation=1, limit=1)
        work = queries.pending(conn, queue="work")
        assert queries.pending(conn, queue=NASTY_QUEUE) == []
    assert [e["operation_id"] for e in entries] == ["op-z", "op-p"]  # longest waiting first
    p = entries[1]
    assert (p["pending"], p["held"], p["total"], p["handler"]) == (2, 2, 5, "handler")
    assert [j["id"] for j in p["jobs"]] == ["p.0", "p.1", "p.3", "p.4"]
    assert [j["state"] for j in p["jobs"]] == ["pending", "held", "pending", "held"]
    assert len(few) == 1 and few[0]["operation_id"] == "op-z" and [j["id"] for j in few[0]["jobs"]] == ["z.0"]
    assert [e["operation_id"] for e in work] == ["op-p"]


# ---- bad arguments ----------------------------------------------------------------------------
@pytest.mark.parametrize("call", [
    lambda c: queries.list_operations(c, limit=0),
    lambda c: queries.list_operations(c, limit=-1),
    lambda c: queries.list_operations(c, limit=queries.MAX_LIMIT + 1),
    lambda c: queries.list_operations(c, state="bogus"),
    lambda c: queries.children(c, "a", depth=0),
    lambda c: queries.children(c, "a", state="bogus"),
    lambda c: queries.ancestors(c, "a", depth=-1),
    lambda c: queries.spawn_tree(c, "a", max_depth=-1),
    lambda c: queries.stats(c, hours=0),
    lambda c: queries.stats(c, hours=-5),
    lambda c: queries.pending(c, limit=-1),
])
def test_bad_arguments_raise_value_error(store, call):
    with store.read() as conn, pytest.raises(ValueError):
        call(conn)


# ---- size: deep and wide trees, bounded statements ---------------------------------------------
def build_big(store, chain: int, width: int) -> StoreBuilder:
    """root -> `width` children (one operation), the first of which starts a chain `chain` deep."""
    b = StoreBuilder(store)
    b.job("big")
    b.spawn("big", width, prefix="w", states=["succeeded", "pending", "held"])
    parent = "w.0"
    for level in range(chain):
        b.operation(f"op-c{level}", parent, total=1, state="succeeded")
        child = f"c{level}"
        b.job(child, parent, operation=f"op-c{level}", state="succeeded" if level % 2 else "started")
        parent = child
    return b.flush()


def statement_counts(store, job_id: str, leaf: str) -> tuple[dict[str, int], dict[str, object]]:
    counts, results = {}, {}
    with store.read() as conn:
        conn.exec_driver_sql("SELECT 1")  # connect (and BEGIN on SQLite) before counting
        for name, fn in {
            "tree": lambda: queries.spawn_tree(conn, job_id),
            "tree_cut": lambda: queries.spawn_tree(conn, job_id, max_depth=2),
            "tree_full": lambda: queries.spawn_tree(conn, leaf, full=True),
            "children": lambda: queries.children(conn, job_id, depth=3),
            "descendants": lambda: queries.descendants(conn, job_id),
            "ancestors": lambda: queries.ancestors(conn, leaf),
            "job": lambda: queries.get_job(conn, job_id),
            "operation": lambda: queries.get_operation(conn, f"op-{job_id}"),
            "list": lambda: queries.list_operations(conn, limit=100),
            "stats": lambda: queries.stats(conn, detailed=True),
            "pending": lambda: queries.pending(conn),
        }.items():
            with counting(store) as seen:
                results[name] = fn()
            counts[name] = len(seen)
    return counts, results


def test_statement_counts_do_not_grow_with_the_tree(store_url, tmp_path):
    small_store = SpawnStore(store_url)
    small_store.migrate()
    try:
        build_big(small_store, chain=3, width=3)
        small, _ = statement_counts(small_store, "big", "c2")
        with small_store.begin() as conn:
            for table in (s.dependencies, s.jobs, s.operations):
                conn.execute(table.delete())
        build_big(small_store, chain=queries.MAX_LEVELS - 1, width=2_000)
        big, results = statement_counts(small_store, "big", f"c{queries.MAX_LEVELS - 2}")
    finally:
        small_store.dispose()
    assert small == big
    assert big == {"tree": 1, "tree_cut": 2, "tree_full": 2, "children": 1, "descendants": 1, "ancestors": 1,
                   "job": 4, "operation": 3, "list": 2, "stats": 4, "pending": 2}
    # The deep tree is complete: root, 2,000 children, and a chain to the deepest level the store allows.
    tree = results["tree"]
    assert len(tree["children"]) == 2_000
    node, levels = tree, 0
    while node["children"]:
        node = node["children"][0]
        levels += 1
    assert levels == queries.MAX_LEVELS and node["id"] == f"c{queries.MAX_LEVELS - 2}"
    assert len(results["descendants"]) == 2_000 + queries.MAX_LEVELS - 1
    assert len(results["ancestors"]) == queries.MAX_LEVELS
    assert results["ancestors"][-1]["id"] == "big"
    assert results["tree_full"]["id"] == "big"
    assert len(results["children"]) == 2_000 + 2
    assert results["tree_cut"]["children"][0]["children"][0]["hidden_children"] == 1


def test_tree_rows_are_the_flat_rows_spawn_tree_nests(store, tree):
    """``tree_rows`` reads what ``spawn_tree`` nests; the text drawn from either is the same, cut or not."""
    with store.read() as conn:
        flat = queries.tree_rows(conn, "root")
        assert queries.tree_rows(conn, "nope") is None and queries.tree_rows(conn, "nope", full=True) is None
        for args in ({}, {"max_depth": 1}, {"max_depth": 0}, {"full": True}):
            for start in ("root", "a", "a.0.0"):
                found = queries.tree_rows(conn, start, **args)
                nested = queries.spawn_tree(conn, start, **args)
                drawn = "".join(render.tree_text_chunks(found.rows, found.start, found.hidden))
                assert drawn[:-1] == render.tree_text(nested), (start, args)
                written = "".join(render.tree_json_chunks(found.rows, found.start, found.hidden))
                assert written == render.tree_json(nested) + "\n", (start, args)
        cut = queries.tree_rows(conn, "root", max_depth=1)
    assert flat.start == "root" and flat.hidden == {}
    assert all(len(row) == len(queries.TREE_FIELDS) for row in flat.rows)
    by_id = {row[0]: dict(zip(queries.TREE_FIELDS, tuple(row))) for row in flat.rows}
    assert sorted(by_id) == ["a", "a.0", "a.0.0", "a.1", "b", "c", "root"]
    assert by_id["a.0.0"] == {"id": "a.0.0", "parent_id": "a.0", "task_name": "tests.child", "state": "succeeded",
                              "depth": 3, "queue": "other", "operation_id": "op-a.0", "position": 0}
    assert cut.hidden == {"a": 2}


def test_the_direct_read_gives_the_rows_the_store_reads(store, tree, store_url):
    """``store.direct`` (no SQLAlchemy) reads a top's tree as ``tree_rows`` does, cut or not, on every driver;
    a start below the top, an unknown id and a bad depth are left to the store."""
    with store.read() as conn:
        for max_depth in (None, 0, 1, 2, 3, 10_000):
            expected = queries.tree_rows(conn, "root", max_depth=max_depth)
            found = direct.read_tree(store_url, "root", max_depth=max_depth)
            assert found is not None, (store_url, max_depth)  # taken: this is no fallback
            assert found.start == "root" and found.hidden == expected.hidden, max_depth
            assert sorted(map(tuple, found.rows)) == sorted(map(tuple, expected.rows)), max_depth
            assert (list(render.tree_text_chunks(found.rows, found.start, found.hidden))
                    == list(render.tree_text_chunks(expected.rows, expected.start, expected.hidden)))
    for start, max_depth in (("a", None), ("a.0.0", 0), ("nope", None), ("root", -1), ("root", True)):
        assert direct.read_tree(store_url, start, max_depth=max_depth) is None, (start, max_depth)


def test_the_direct_read_binds_what_it_is_given(store, tree, store_url):
    """An id that is SQL reaches the statement as a value: nothing found, nothing dropped."""
    assert direct.read_tree(store_url, "root' OR '1'='1") is None
    assert direct.read_tree(store_url, NASTY_QUEUE) is None
    with store.read() as conn:
        assert len(queries.tree_rows(conn, "root").rows) == 7
