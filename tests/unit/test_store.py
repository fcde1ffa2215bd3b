"""The SQL lineage store: schema on first use, visible failures without secrets, and the recovery sweep."""
from __future__ import annotations

import logging
import os
from datetime import timedelta

import pytest
import sqlalchemy as sa

from celery_spawn import SpawnTask, StoreError, recover
from celery_spawn.store import SpawnStore
from celery_spawn.store import schema as s
from celery_spawn.store.engine import redact
from celery_spawn.store.migrations import VERSION_TABLE, head_revision
from celery_spawn.store import utcnow
from tests.unit.helpers import Rig, age, fail_publishing

SECRET = "s3cret"


# ---- schema -------------------------------------------------------------------------------------
def test_the_schema_is_created_on_first_use(store_url):
    store = SpawnStore(store_url)
    try:
        inspector = sa.inspect(store.engine)
        tables = set(inspector.get_table_names())
        assert {"spawn_operations", "spawn_jobs", "spawn_dependencies", VERSION_TABLE} <= tables
        job_indexes = {tuple(ix["column_names"]) for ix in inspector.get_indexes("spawn_jobs")}
        assert {("parent_id",), ("root_id", "depth"), ("operation_id", "position"),
                ("operation_id", "state", "started_at", "finished_at"),
                ("state", "created_at", "operation_id")} <= job_indexes
        operation_columns = {column["name"] for column in inspector.get_columns("spawn_operations")}
        assert {*s.CHILD_COUNT_COLUMNS.values(), "children_timed", "children_seconds",
                "children_max_seconds"} <= operation_columns
        with store.engine.connect() as conn:
            assert conn.execute(sa.text(f"SELECT version_num FROM {VERSION_TABLE}")).scalar() == head_revision()
        assert store.migrate() == head_revision()  # again: nothing to do
    finally:
        store.dispose()
    second = SpawnStore(store_url)  # another process finding the tables already there
    try:
        with second.read() as conn:
            assert second.get_operation(conn, "none") is None
    finally:
        second.dispose()


def test_sqlite_creates_its_file_and_folder(tmp_path):
    path = tmp_path / "nested" / "dir" / "spawn.sqlite3"
    store = SpawnStore(f"sqlite:///{path}")
    try:
        store.engine
        assert path.exists()
    finally:
        store.dispose()


def test_without_auto_migrate_an_empty_database_fails_visibly(sqlite_url):
    made = Rig(sqlite_url, auto_migrate=False)
    try:
        made.manager.register_handler("one", lambda context: [made.sig(1)])
        result = made.spawn({"handler": "one"}, value="v")
        assert result.state == "FAILURE" and isinstance(result.result, StoreError)
        assert made.runs == []
    finally:
        made.close()


def test_an_engine_is_made_again_in_a_forked_process(sqlite_url):
    store = SpawnStore(sqlite_url)
    parent_engine = store.engine
    pid = os.fork()
    if pid == 0:  # the child: must not reuse the parent's engine, and must work
        code = 1
        try:
            store.after_fork()
            with store.read() as conn:
                store.get_operation(conn, "x")
            code = 0 if store.engine is not parent_engine else 2
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    assert store.engine is parent_engine
    store.dispose()


def _installed_only(monkeypatch, *drivers: str) -> None:
    """Make ``importlib.util.find_spec`` see only these PostgreSQL drivers."""
    import importlib.util

    real = importlib.util.find_spec

    def find_spec(name, *args, **kwargs):
        if name in ("psycopg", "psycopg2"):
            return real(name, *args, **kwargs) if name in drivers else None
        return real(name, *args, **kwargs)

    monkeypatch.setattr(importlib.util, "find_spec", find_spec)


@pytest.mark.parametrize("installed, picked", [
    (("psycopg", "psycopg2"), "psycopg"),
    (("psycopg",), "psycopg"),
    (("psycopg2",), "psycopg2"),
])
def test_a_plain_postgresql_url_picks_psycopg_when_installed_else_psycopg2(postgres_url, monkeypatch,
                                                                           installed, picked):
    _installed_only(monkeypatch, *installed)
    url = sa.make_url(postgres_url).set(drivername="postgresql").render_as_string(hide_password=False)
    store = SpawnStore(url)
    try:
        assert store.holder.url.drivername == f"postgresql+{picked}"
        with store.read() as conn:
            assert conn.dialect.driver == picked
            assert store.get_operation(conn, "x") is None
    finally:
        store.dispose()


@pytest.mark.parametrize("driver", ["psycopg", "psycopg2"])
def test_an_explicit_driver_is_kept_whatever_is_installed(monkeypatch, driver):
    _installed_only(monkeypatch, "psycopg" if driver == "psycopg2" else "psycopg2")
    store = SpawnStore(f"postgresql+{driver}://u@127.0.0.1:1/x", auto_migrate=False)
    assert store.holder.url.drivername == f"postgresql+{driver}"


def test_a_plain_postgresql_url_with_neither_driver_is_left_as_it_is(monkeypatch):
    _installed_only(monkeypatch)
    store = SpawnStore("postgresql://u@127.0.0.1:1/x", auto_migrate=False)
    assert store.holder.url.drivername == "postgresql"


# ---- visible failures ---------------------------------------------------------------------------
@pytest.mark.parametrize("url", [
    f"postgresql+psycopg2://u:{SECRET}@127.0.0.1:1/x",
    f"mysql+mysqldb://u:{SECRET}@127.0.0.1:1/x",
    f"postgresql://u:{SECRET}@127.0.0.1:1/x",
])
@pytest.mark.parametrize("handler", ["one", "missing"])
def test_an_unreachable_store_fails_the_parent_without_showing_the_password(url, handler, caplog):
    made = Rig(url)
    try:
        made.manager.register_handler("one", lambda context: [made.sig(1)])
        with caplog.at_level(logging.DEBUG):
            result = made.spawn({"handler": handler}, value="v")
        assert result.state == "FAILURE"
        assert isinstance(result.result, StoreError)
        assert "127.0.0.1" in str(result.result)
        assert SECRET not in str(result.result) and SECRET not in repr(result.result)
        assert SECRET not in (result.traceback or "")
        assert SECRET not in caplog.text
        assert SECRET not in made.state.store.safe_url
        assert made.runs == []
        with pytest.raises(StoreError) as raised:
            made.spawn({"handler": handler}, value="v", throw=True)
        assert SECRET not in str(raised.value)
    finally:
        made.close()


@pytest.mark.parametrize("url", [
    f"postgresql+psycopg2://u:{SECRET}@127.0.0.1:1/x",
    f"mysql+mysqldb://u:{SECRET}@127.0.0.1:1/x",
])
def test_a_store_that_cannot_be_migrated_says_why(url):
    """The driver's own reason (refused, too many connections, a lock wait), not only its class name."""
    store = SpawnStore(url)
    with pytest.raises(StoreError) as raised:
        store.migrate()
    text = str(raised.value)
    assert text.startswith("could not migrate the spawn store at ") and "OperationalError: " in text
    assert ("Connection refused" in text or "Can't connect" in text), text
    assert SECRET not in text


def test_redact_hides_passwords():
    assert SECRET not in redact(f"postgresql+psycopg2://user:{SECRET}@db:5432/spawn")
    assert redact("sqlite:///tmp/x.sqlite3") == "sqlite:///tmp/x.sqlite3"
    assert SECRET not in redact(f"::{SECRET}::not a url")


def test_an_invalid_url_is_a_store_error_without_the_url_text():
    with pytest.raises(StoreError) as raised:
        SpawnStore(f"nonsense {SECRET}")
    assert SECRET not in str(raised.value)


def test_a_dropped_table_fails_the_parent(rig):
    rig.manager.register_handler("one", lambda context: [rig.sig(1)])
    assert rig.spawn({"handler": "one"}, value="before").get() == "before"
    with rig.state.store.begin() as conn:
        conn.execute(sa.text("DROP TABLE spawn_jobs"))
    result = rig.spawn({"handler": "one"}, value="after")
    assert result.state == "FAILURE"
    assert isinstance(result.result, StoreError)
    assert "spawn store" in str(result.result)
    assert len(rig.runs) == 1  # only the child of the first spawn


def test_a_store_error_can_retry_the_parent(sqlite_url):
    made = Rig(sqlite_url)
    bodies = []
    try:
        @made.app.task(name="unit.retrying", base=SpawnTask, shared=False, autoretry_for=(StoreError,),
                       max_retries=2, default_retry_delay=0)
        def retrying(value):
            bodies.append(value)
            return value

        made.manager.register_handler("one", lambda context: [made.sig(1)])
        made.state.store.engine  # schema first, then break it
        with made.state.store.begin() as conn:
            conn.execute(sa.text("DROP TABLE spawn_operations"))
        result = made.spawn({"handler": "one"}, value="v", task=retrying)
        assert result.state == "FAILURE" and isinstance(result.result, StoreError)
        assert bodies == ["v"] * 3  # the first run and two retries
    finally:
        made.close()


# ---- store primitives ---------------------------------------------------------------------------
def test_mark_dispatched_and_claims_are_idempotent(publishing_rig, monkeypatch):
    rig = publishing_rig
    store = rig.state.store
    fail_publishing(monkeypatch)
    rig.manager.register_handler("two", lambda context: [rig.sig(1), rig.sig(2)])
    result = rig.spawn({"handler": "two"}, value="v")
    operation = rig.operation(result.id)
    ids = [job["id"] for job in rig.jobs(operation["id"])]

    assert store.claim_stale_operations(grace_seconds=3600) == []
    age(rig, operation["id"])
    assert store.claim_stale_operations(grace_seconds=60) == [operation["id"]]
    assert store.claim_stale_operations(grace_seconds=60) == []  # leased by the first claim

    assert store.mark_dispatched(ids) == 2
    assert store.mark_dispatched(ids) == 0
    assert {job["state"] for job in rig.jobs(operation["id"])} == {s.DISPATCHED}
    age(rig, operation["id"])
    assert store.claim_stale_operations(grace_seconds=60) == []  # nothing pending any more


def test_record_failed_operation_never_overwrites_a_live_operation(rig):
    rig.manager.register_handler("one", lambda context: [rig.sig(1)])
    result = rig.spawn({"handler": "one"}, value="v")
    live = rig.operation(result.id)
    row = dict(live, state=s.OP_FAILED, error="SpawnError: late")
    rig.state.store.record_failed_operation(row)
    assert rig.operation(result.id)["state"] == live["state"] and rig.operation(result.id)["error"] is None


# ---- recovery -----------------------------------------------------------------------------------
def test_recover_publishes_children_stranded_by_a_broker_failure(publishing_rig, monkeypatch):
    rig = publishing_rig
    rig.manager.register_handler("three", lambda context: [rig.sig(i) for i in range(3)])
    fail_publishing(monkeypatch)
    result = rig.spawn({"handler": "three"}, value="v")
    assert result.state == "SUCCESS" and result.get() == "v"
    monkeypatch.undo()
    operation = rig.operation(result.id)
    children = rig.jobs(operation["id"])
    assert [job["state"] for job in children] == [s.PENDING] * 3
    assert rig.drain() == []

    assert recover(rig.app) == 0  # still within the grace period
    assert rig.drain() == []

    age(rig, operation["id"])
    assert recover(rig.app) == 3
    messages = rig.drain()
    assert [m.headers["id"] for m in messages] == [job["id"] for job in children]
    assert {m.headers["parent_id"] for m in messages} == {result.id}
    assert {m.headers["root_id"] for m in messages} == {result.id}
    assert {m.headers["spawn_operation"] for m in messages} == {operation["id"]}
    assert [job["state"] for job in rig.jobs(operation["id"])] == [s.DISPATCHED] * 3

    age(rig, operation["id"])
    assert recover(rig.app) == 0
    assert rig.drain() == []


def test_recover_publishes_rows_left_pending_by_a_crash(publishing_rig):
    """A crash between commit and publish: the rows are all there is, as another process would find them."""
    rig = publishing_rig
    store = rig.state.store
    long_ago = utcnow() - timedelta(hours=1)
    operation_id, parent_id = "op-crashed", "parent-crashed"
    with store.begin() as conn:
        store.insert_operation(conn, {
            "id": operation_id, "parent_id": parent_id, "root_id": parent_id, "parent_task": "unit.parent",
            "handler": "h", "queue": None, "depth": 0, "state": s.OP_RUNNING, "total": 3,
            "config": '{"batch_size": 2}', "error": None, "on_complete": None, "wait_for_descendants": False,
            "fail_fast": False, "completed": False, "created_at": long_ago, "updated_at": long_ago,
            "finished_at": None})
        store.insert_jobs(conn, [{
            "id": f"crashed-{i}", "parent_id": parent_id, "root_id": parent_id, "operation_id": operation_id,
            "position": i, "depth": 1, "task_name": "unit.child", "queue": rig.queue, "priority": None,
            "state": s.DISPATCHED if i == 0 else s.PENDING, "pending_deps": 0, "retries": 0,
            "message": f'{{"task": "unit.child", "args": [{i}], "kwargs": {{}}, "options": {{}}}}',
            "created_at": long_ago} for i in range(3)])

    assert recover(rig.app) == 2
    messages = rig.drain()
    assert [m.headers["id"] for m in messages] == ["crashed-1", "crashed-2"]
    assert [m.headers["parent_id"] for m in messages] == [parent_id] * 2
    assert {job["state"] for job in rig.jobs(operation_id)} == {s.DISPATCHED}
    assert recover(rig.app, grace_seconds=0) == 0
    assert rig.drain() == []


def test_one_unreadable_operation_does_not_stop_the_sweep(publishing_rig):
    rig = publishing_rig
    store = rig.state.store
    long_ago = utcnow() - timedelta(hours=1)
    for operation_id, config, when in [("op-poisoned", '{"batch_size": 0}', long_ago - timedelta(minutes=1)),
                                       ("op-healthy", '{"batch_size": 2}', long_ago)]:
        with store.begin() as conn:
            store.insert_operation(conn, {
                "id": operation_id, "parent_id": f"p-{operation_id}", "root_id": f"p-{operation_id}",
                "parent_task": "unit.parent", "handler": "h", "queue": None, "depth": 0, "state": s.OP_RUNNING,
                "total": 1, "config": config, "error": None, "on_complete": None, "wait_for_descendants": False,
                "fail_fast": False, "completed": False, "created_at": when, "updated_at": when, "finished_at": None})
            store.insert_jobs(conn, [{
                "id": f"{operation_id}-0", "parent_id": f"p-{operation_id}", "root_id": f"p-{operation_id}",
                "operation_id": operation_id, "position": 0, "depth": 1, "task_name": "unit.child",
                "queue": rig.queue, "priority": None, "state": s.PENDING, "pending_deps": 0, "retries": 0,
                "message": '{"task": "unit.child", "args": [1], "kwargs": {}, "options": {}}', "created_at": when}])
    recover(rig.app)
    assert [m.headers["id"] for m in rig.drain()][-1:] == ["op-healthy-0"]
    assert rig.jobs("op-healthy")[0]["state"] == s.DISPATCHED


def test_recover_honours_the_grace_setting(sqlite_url, monkeypatch):
    made = Rig(sqlite_url, eager=False, recovery_grace=0)
    try:
        made.manager.register_handler("one", lambda context: [made.sig(1)])
        fail_publishing(monkeypatch)
        made.spawn({"handler": "one"}, value="v")
        monkeypatch.undo()
        assert recover(made.app, grace_seconds=3600) == 0
        assert recover(made.app) == 1
        assert len(made.drain()) == 1
    finally:
        made.close()


def test_recover_leaves_held_children_and_failed_operations_alone(publishing_rig, monkeypatch):
    rig = publishing_rig
    from celery_spawn import depends_on

    @rig.handler("held")
    def held(context):
        first = rig.sig("first")
        context.freeze(first)
        return [first, depends_on(rig.sig("second"), first)]

    result = rig.spawn({"handler": "held"}, value="v")
    first, second = rig.children_of(result.id)
    assert (first["state"], second["state"]) == (s.DISPATCHED, s.HELD)
    assert len(rig.drain()) == 1
    refused = rig.spawn({"handler": "missing"}, value="v")
    for operation in rig.operations():
        age(rig, operation["id"])
    assert recover(rig.app, grace_seconds=0) == 0
    assert rig.drain() == []
    assert rig.children_of(result.id)[1]["state"] == s.HELD
    assert rig.operation(refused.id)["state"] == s.OP_FAILED


def test_recover_in_eager_mode_runs_each_stranded_child_once(sqlite_rig, monkeypatch):
    rig = sqlite_rig
    rig.manager.register_handler("two", lambda context: [rig.sig(1), rig.sig(2)])
    fail_publishing(monkeypatch)
    result = rig.spawn({"handler": "two"}, value="v")
    monkeypatch.undo()
    assert rig.runs == []
    age(rig, rig.operation(result.id)["id"])
    assert recover(rig.app) == 2
    assert sorted(args for _, args, _ in rig.runs) == [(1,), (2,)]
    age(rig, rig.operation(result.id)["id"])
    assert recover(rig.app) == 0
    assert len(rig.runs) == 2


@pytest.mark.parametrize("store_url", ["postgresql", "mariadb"], indirect=True)
def test_concurrent_sweepers_skip_an_operation_another_one_holds(publishing_rig, monkeypatch):
    import threading

    rig = publishing_rig
    store = rig.state.store
    rig.manager.register_handler("one", lambda context: [rig.sig(1)])
    fail_publishing(monkeypatch)
    result = rig.spawn({"handler": "one"}, value="v")
    monkeypatch.undo()
    operation_id = rig.operation(result.id)["id"]
    age(rig, operation_id)

    claimed: list = []
    with store.engine.connect() as holder:
        transaction = holder.begin()
        holder.execute(sa.select(s.operations.c.id).where(s.operations.c.id == operation_id).with_for_update())
        sweeper = threading.Thread(target=lambda: claimed.append(store.claim_stale_operations(60)), daemon=True)
        sweeper.start()
        sweeper.join(timeout=5)
        still_waiting = sweeper.is_alive()
        transaction.rollback()
    sweeper.join(timeout=30)
    assert not still_waiting, "a second sweeper waited for the lock instead of skipping the row"
    assert claimed == [[]]
    assert store.claim_stale_operations(60) == [operation_id]
