"""Prepared tracking statements on a real PostgreSQL: prepared once per connection, same results, recoverable."""
from __future__ import annotations

import threading
import time
import uuid
from types import SimpleNamespace

import pytest
import sqlalchemy as sa

from celery_spawn.store import SpawnStore
from celery_spawn.store.prepared import PreparedStatement
from celery_spawn.store import utcnow
from celery_spawn.store.dialects import Finish, PostgresDialect

PG = PostgresDialect()

NAME = "spawn_succeed_and_release"


def _prepared_names(conn) -> set[str]:
    return set(conn.exec_driver_sql("SELECT name FROM pg_prepared_statements").scalars())


def _chain(store: SpawnStore, n: int = 3) -> list[str]:
    """``n`` jobs of operation ``op``, each held behind the one before (the first started)."""
    from celery_spawn.store import schema as s

    ids = [f"step-{uuid.uuid4().hex[:8]}-{i}" for i in range(n)]
    now = utcnow()
    with store.begin() as conn:
        conn.execute(s.operations.insert(), [{"id": ids[0] + "-op", "parent_id": "p", "root_id": "p",
                                               "state": "running", "created_at": now, "updated_at": now}])
        conn.execute(s.jobs.insert(), [
            {"id": job, "parent_id": "p", "root_id": "p", "operation_id": ids[0] + "-op", "task_name": "t", "depth": 1,
             "state": "started" if i == 0 else "held", "pending_deps": 0 if i == 0 else 1,
             "message": f"message-{i}", "created_at": now} for i, job in enumerate(ids)])
        conn.execute(s.dependencies.insert(), [{"job_id": ids[i], "depends_on_id": ids[i - 1]}
                                               for i in range(1, n)])
    return ids


@pytest.fixture
def pg_store(postgres_url):
    store = SpawnStore(postgres_url)
    yield store
    store.dispose()


def test_the_statement_is_prepared_once_per_connection_and_releases_the_next_step(pg_store):
    ids = _chain(pg_store)
    engine = pg_store.engine
    with engine.connect() as conn:
        assert NAME not in _prepared_names(conn)
        conn.rollback()
        with conn.begin():
            won, released = PG.succeed_and_release(conn, [Finish(ids[0], "succeeded", None, utcnow())])
        assert won == {ids[0]: ids[0] + "-op"}
        assert [r["id"] for r in released] == [ids[1]] and released[0]["message"] == "message-1"
        assert NAME in _prepared_names(conn)
        conn.rollback()
        with conn.begin():
            _, released = PG.succeed_and_release(conn, [Finish(ids[1], "succeeded", None, utcnow())], marks=[ids[1]])
        assert [r["id"] for r in released] == [ids[2]]
        with conn.begin():  # a duplicate finish moves nothing and releases nothing
            assert PG.succeed_and_release(conn, [Finish(ids[1], "succeeded", None, utcnow())]) == ({}, [])


def test_a_session_that_lost_the_statement_fails_once_then_prepares_it_again(pg_store):
    ids = _chain(pg_store)
    with pg_store.engine.connect() as conn:
        with conn.begin():
            PG.succeed_and_release(conn, [Finish(ids[0], "succeeded", None, utcnow())])
        conn.exec_driver_sql("DEALLOCATE ALL")  # what a pooler switching sessions looks like
        conn.commit()
        with pytest.raises(sa.exc.DBAPIError), conn.begin():
            PG.succeed_and_release(conn, [Finish(ids[1], "succeeded", None, utcnow())])
        with conn.begin():
            won, released = PG.succeed_and_release(conn, [Finish(ids[1], "succeeded", None, utcnow())])
        assert list(won) == [ids[1]] and [r["id"] for r in released] == [ids[2]]


def test_turned_off_the_same_statement_runs_unprepared(postgres_url):
    store = SpawnStore(postgres_url, prepared_statements=False)
    try:
        ids = _chain(store)
        with store.begin() as conn:
            won, released = PG.succeed_and_release(conn, [Finish(ids[0], "succeeded", None, utcnow())])
            assert list(won) == [ids[0]] and [r["id"] for r in released] == [ids[1]]
            assert NAME not in _prepared_names(conn)
    finally:
        store.dispose()


def test_parameters_must_match_their_types():
    with pytest.raises(ValueError, match="types were given"):
        PreparedStatement("x", sa.text("SELECT :a, :b"), {"a": "int"})
    with pytest.raises(ValueError, match="placeholder"):
        PreparedStatement("x", sa.text("SELECT :a LIKE 'x%'"), {"a": "text"})
    statement = PreparedStatement("x", sa.text("SELECT CAST(:a AS int)::text, :b, :a"), {"a": "int", "b": "text"})
    assert statement.prepare_sql == "PREPARE x(int, text) AS SELECT CAST($1 AS int)::text, $2, $1"
    assert statement.execute_sql == "EXECUTE x(%s, %s)"



def _lease(store: SpawnStore, operation_id: str):
    from celery_spawn.store import schema as s

    with store.read() as conn:
        return conn.execute(sa.select(s.operations.c.updated_at).where(s.operations.c.id == operation_id)).scalar()


def test_a_release_refreshes_only_an_old_lease(pg_store):
    """A chain's hop does not rewrite its operation's row when the lease is fresh (no dead row per hop)."""
    from datetime import timedelta

    from celery_spawn.store import schema as s

    ids = _chain(pg_store, 4)
    op = ids[0] + "-op"
    old = utcnow() - timedelta(seconds=30)
    with pg_store.begin() as conn:
        conn.execute(s.operations.update().where(s.operations.c.id == op).values(updated_at=old))
    with pg_store.engine.connect() as conn, conn.begin():
        PG.succeed_and_release(conn, [Finish(ids[0], "succeeded", None, utcnow())], grace_seconds=60)
    refreshed = _lease(pg_store, op)
    assert refreshed > old + timedelta(seconds=29)
    with pg_store.engine.connect() as conn, conn.begin():
        _, released = PG.succeed_and_release(conn, [Finish(ids[1], "succeeded", None, utcnow())], grace_seconds=60)
    assert [r["id"] for r in released] == [ids[2]] and _lease(pg_store, op) == refreshed  # fresh: left alone
    with pg_store.engine.connect() as conn, conn.begin():  # no grace: every release refreshes it
        PG.succeed_and_release(conn, [Finish(ids[2], "succeeded", None, utcnow())], grace_seconds=0)
    assert _lease(pg_store, op) > refreshed


def test_lease_before_is_a_tenth_of_the_grace_at_most_a_second():
    from datetime import timedelta

    from celery_spawn.store.dialects import lease_before

    now = utcnow()
    assert lease_before(now, 60) == now - timedelta(seconds=1)
    assert lease_before(now, 5) == now - timedelta(seconds=0.5)
    assert lease_before(now, 0) == now


# ---- publishing a hop's next step ahead of the write ------------------------------------------
def _state(store: SpawnStore, job: str) -> tuple[str, int, object]:
    from celery_spawn.store import schema as s

    with store.read() as conn:
        row = conn.execute(sa.select(s.jobs.c.state, s.jobs.c.pending_deps, s.jobs.c.dispatched_at)
                           .where(s.jobs.c.id == job)).one()
    return tuple(row)


def test_released_by_names_only_the_dependents_whose_every_unmet_edge_is_on_the_finishing_jobs(pg_store):
    from celery_spawn.store import schema as s
    a, b, c = _chain(pg_store, 3)
    x, join = f"x-{uuid.uuid4().hex[:8]}", f"join-{uuid.uuid4().hex[:8]}"
    now = utcnow()
    with pg_store.begin() as conn:  # ``join`` waits on a (finishing) and on x (started elsewhere)
        conn.execute(s.jobs.insert(), [
            {"id": x, "parent_id": "p", "root_id": "p", "task_name": "t", "state": "started", "pending_deps": 0,
             "message": "m", "created_at": now},
            {"id": join, "parent_id": "p", "root_id": "p", "task_name": "t", "state": "held", "pending_deps": 2,
             "message": "m", "created_at": now}])
        conn.execute(s.dependencies.insert(), [{"job_id": join, "depends_on_id": a},
                                               {"job_id": join, "depends_on_id": x}])
    with pg_store.engine.connect() as conn, conn.begin():
        assert [r["id"] for r in PG.released_by(conn, [a])] == [b]
        assert sorted(r["id"] for r in PG.released_by(conn, [a, x])) == sorted([b, join])
        assert PG.released_by(conn, [a], published=[b]) == []  # an earlier attempt published it
        row = PG.released_by(conn, [a])[0]
        assert row == {"id": b, "parent_id": "p", "root_id": "p", "message": "message-1",
                       "operation_id": a + "-op"}
        # b ran before its release was written (it was published ahead): its success releases c all the same
        assert [r["id"] for r in PG.released_by(conn, [b])] == [c]
    with pg_store.engine.connect() as conn, conn.begin():
        PG.succeed_and_release(conn, [Finish(a, "succeeded", None, utcnow())])
        assert PG.released_by(conn, [a]) == []  # a is final: a second finish releases nothing


def test_a_step_published_ahead_is_marked_dispatched_by_the_write_and_not_returned(pg_store):
    a, b, c = _chain(pg_store, 3)
    with pg_store.engine.connect() as conn, conn.begin():
        ahead = [r["id"] for r in PG.released_by(conn, [a])]
        won, released = PG.succeed_and_release(conn, [Finish(a, "succeeded", None, utcnow())], published=ahead)
    assert ahead == [b] and list(won) == [a] and released == []
    state, pending, dispatched_at = _state(pg_store, b)
    assert (state, pending) == ("dispatched", 0) and dispatched_at is not None
    assert _state(pg_store, c)[:2] == ("held", 1)


def _in_thread(target):
    box: dict = {}

    def run():
        try:
            box["result"] = target()
        except BaseException as exc:  # surfaced by the test
            box["error"] = exc

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread, box


def test_the_next_steps_finish_waits_for_the_write_of_the_step_that_published_it(pg_store):
    """Published ahead, a step can finish in another process before its release is committed: its finish
    waits on the row lock of the read, then finishes it and releases the step after it."""
    a, b, c = _chain(pg_store, 3)

    def finish_b():
        with pg_store.engine.connect() as other, other.begin():
            return PG.succeed_and_release(other, [Finish(b, "succeeded", None, utcnow())])

    with pg_store.engine.connect() as conn, conn.begin():
        assert [r["id"] for r in PG.released_by(conn, [a])] == [b]
        thread, box = _in_thread(finish_b)
        thread.join(0.5)
        assert thread.is_alive(), "b's finish did not wait for the transaction that published it"
        PG.succeed_and_release(conn, [Finish(a, "succeeded", None, utcnow())], published=[b])
    thread.join(10)
    assert "error" not in box
    won, released = box["result"]
    assert list(won) == [b] and [r["id"] for r in released] == [c]
    assert _state(pg_store, b)[0] == "succeeded" and _state(pg_store, c)[0] == "pending"


def test_a_duplicate_finish_waits_and_then_publishes_nothing(pg_store):
    a, b, _ = _chain(pg_store, 3)

    def read_again():
        with pg_store.engine.connect() as other, other.begin():
            return PG.released_by(other, [a])

    with pg_store.engine.connect() as conn, conn.begin():
        assert [r["id"] for r in PG.released_by(conn, [a])] == [b]
        thread, box = _in_thread(read_again)
        thread.join(0.5)
        assert thread.is_alive()
        PG.succeed_and_release(conn, [Finish(a, "succeeded", None, utcnow())], published=[b])
    thread.join(10)
    assert box == {"result": []}


def test_a_held_step_that_finishes_in_the_same_batch_as_its_dependency_is_finished_not_released(pg_store):
    a, b, c = _chain(pg_store, 3)
    with pg_store.engine.connect() as conn, conn.begin():
        won, released = PG.succeed_and_release(conn, [Finish(a, "succeeded", None, utcnow()),
                                                      Finish(b, "succeeded", None, utcnow())])
    assert set(won) == {a, b} and [r["id"] for r in released] == [c]
    assert _state(pg_store, b)[0] == "succeeded"


def test_a_dependent_finishing_in_the_same_batch_is_not_published_ahead(pg_store):
    a, b, c = _chain(pg_store, 3)
    with pg_store.engine.connect() as conn, conn.begin():  # b ran already (say, a copy published by hand)
        assert [r["id"] for r in PG.released_by(conn, [a, b])] == [c]


# ---- psycopg (3): it prepares statements itself ---------------------------------------------------
def _psycopg_store(postgres_url: str, **kw) -> SpawnStore:
    from tests.harness import with_driver

    return SpawnStore(with_driver(postgres_url, "psycopg"), **kw)


def test_psycopg_prepares_repeated_statements_itself_and_no_prepare_is_sent(postgres_url):
    """Our ``PREPARE``/``EXECUTE`` is psycopg2's; psycopg (3) auto-prepares after ``prepare_threshold`` runs."""
    store = _psycopg_store(postgres_url)
    try:
        ids = _chain(store, 12)
        with store.engine.connect() as conn:
            raw = conn.connection.dbapi_connection
            assert raw.prepare_threshold is not None
            for i in range(raw.prepare_threshold + 2):
                with conn.begin():
                    won, released = PG.succeed_and_release(conn, [Finish(ids[i], "succeeded", None, utcnow())])
                assert list(won) == [ids[i]] and [r["id"] for r in released] == [ids[i + 1]]
            names = _prepared_names(conn)
            assert NAME not in names
            assert any(name.startswith("_pg3_") for name in names)  # psycopg's own
    finally:
        store.dispose()


def test_psycopg_turned_off_sets_prepare_threshold_none(postgres_url):
    """``spawn_prepared_statements = False`` (PgBouncer in transaction mode): psycopg prepares nothing."""
    store = _psycopg_store(postgres_url, prepared_statements=False)
    try:
        ids = _chain(store, 12)
        with store.engine.connect() as conn:
            assert conn.connection.dbapi_connection.prepare_threshold is None
            for i in range(10):
                with conn.begin():
                    won, _ = PG.succeed_and_release(conn, [Finish(ids[i], "succeeded", None, utcnow())])
                assert list(won) == [ids[i]]
            assert _prepared_names(conn) == set()
    finally:
        store.dispose()


def test_psycopg_prepare_threshold_none_keeps_the_other_connect_args(postgres_url):
    store = _psycopg_store(postgres_url, prepared_statements=False, synchronous_commit=False,
                           engine_options={"connect_args": {"application_name": "spawn-test"}})
    try:
        with store.engine.connect() as conn:
            assert conn.connection.dbapi_connection.prepare_threshold is None
            assert conn.exec_driver_sql("SHOW synchronous_commit").scalar() == "off"
            assert conn.exec_driver_sql("SHOW application_name").scalar() == "spawn-test"
    finally:
        store.dispose()


RELEASED_BY = "spawn_released_by"


def test_the_read_ahead_is_prepared_once_per_connection_and_locks_the_next_step(pg_store):
    ids = _chain(pg_store)
    with pg_store.engine.connect() as conn:
        conn.rollback()
        with conn.begin():
            assert [r["id"] for r in PG.released_by(conn, [ids[0]])] == [ids[1]]
            assert RELEASED_BY in _prepared_names(conn)
            assert PG.released_by(conn, [ids[0]], published=[ids[1]]) == []  # published ahead already
        with conn.begin():
            rows = PG.released_by(conn, [ids[0]])
            assert rows[0]["message"] == "message-1" and rows[0]["operation_id"] == ids[0] + "-op"
            # the finishing row and the dependent stay locked until this transaction ends
            with pg_store.engine.connect() as other, other.begin():
                other.exec_driver_sql("SET LOCAL lock_timeout = '100ms'")
                for job in ids[:2]:
                    with pytest.raises(sa.exc.OperationalError), other.begin_nested():
                        other.exec_driver_sql("SELECT 1 FROM spawn_jobs WHERE id = %s FOR UPDATE", (job,))


def test_the_prepared_read_ahead_keeps_to_the_indexes_in_a_big_store(pg_store):
    """A generic plan (what PostgreSQL may switch to for a prepared statement) reads no table whole."""
    from celery_spawn.store import schema as s

    ids = _chain(pg_store)
    now = utcnow()
    with pg_store.begin() as conn:
        conn.execute(s.jobs.insert(), [
            {"id": f"filler-{uuid.uuid4().hex[:8]}-{i}", "parent_id": "p", "root_id": "p", "operation_id": "filler",
             "task_name": "t", "depth": 1, "state": "held" if i % 2 else "succeeded", "pending_deps": 1,
             "created_at": now} for i in range(20_000)])
        conn.execute(s.dependencies.insert(), [{"job_id": f"filler-edge-{i}", "depends_on_id": f"filler-dep-{i % 500}"}
                                               for i in range(20_000)])
    with pg_store.engine.connect() as conn:
        conn.exec_driver_sql("ANALYZE spawn_jobs")
        conn.exec_driver_sql("ANALYZE spawn_dependencies")
        conn.commit()
        with conn.begin():
            conn.exec_driver_sql("SET LOCAL plan_cache_mode = force_generic_plan")
            assert [r["id"] for r in PG.released_by(conn, [ids[0]])] == [ids[1]]
            plan = conn.exec_driver_sql(f"EXPLAIN EXECUTE {RELEASED_BY}(%s, %s)", ([ids[0]], [])).scalars().all()
    assert not [line for line in plan if "Seq Scan on spawn_" in line], "\n".join(plan)


def _plan_cache_mode(conn) -> str:
    return conn.exec_driver_sql("SHOW plan_cache_mode").scalar()


def _grow_a_young_store(store: SpawnStore) -> None:
    """Migrate a new store (its connections plan anew), then grow it past a YOUNG_ROWS of 50 and analyse it."""
    store.migrate()
    with store.engine.connect() as conn:
        assert _plan_cache_mode(conn) == "force_custom_plan"
    _chain(store, 60)
    with store.engine.connect() as conn:
        conn.exec_driver_sql("ANALYZE spawn_jobs")
        conn.commit()


# A database of its own (``store_url``): the planner's estimates of the module's shared one depend on other tests.
@pytest.mark.parametrize("store_url", ["postgresql"], indirect=True)
def test_a_connection_to_a_young_store_never_caches_a_generic_plan(store_url):
    """A generic plan made while the table is small reads it whole, and keeps doing so as it grows."""
    store = SpawnStore(store_url)
    try:
        store.migrate()
        ids = _chain(store, 12)
        with store.engine.connect() as conn:
            assert _plan_cache_mode(conn) == "force_custom_plan"
            conn.rollback()
            for job in ids[:-1]:  # past the five custom plans after which PostgreSQL may go generic
                with conn.begin():
                    PG.released_by(conn, [job])
                    PG.succeed_and_release(conn, [Finish(job, "succeeded", None, utcnow())])
            plans = conn.exec_driver_sql(
                "SELECT name, generic_plans, custom_plans FROM pg_prepared_statements ORDER BY name").all()
        assert [tuple(p) for p in plans] == [(RELEASED_BY, 0, 11), (NAME, 0, 11)]
    finally:
        store.dispose()


@pytest.mark.parametrize("store_url", ["postgresql"], indirect=True)
def test_a_connection_to_a_grown_store_lets_postgresql_choose(store_url, monkeypatch):
    from celery_spawn.store import prepared

    monkeypatch.setattr(prepared, "YOUNG_ROWS", 50)
    store = SpawnStore(store_url)
    try:
        _grow_a_young_store(store)
        store.dispose()  # a new pool: new connections
        with store.engine.connect() as conn:
            assert _plan_cache_mode(conn) == "auto"
    finally:
        store.dispose()


@pytest.mark.parametrize("store_url", ["postgresql"], indirect=True)
def test_a_young_connection_lets_postgresql_choose_once_the_store_has_grown(store_url, monkeypatch):
    """A pooled connection opened young reads the size again on checkout, once a RECHECK_SECONDS, not only
    when it connects."""
    from celery_spawn.store import prepared

    clock = [1000.0]
    monkeypatch.setattr(prepared, "time", SimpleNamespace(monotonic=lambda: clock[0]))
    monkeypatch.setattr(prepared, "YOUNG_ROWS", 50)
    store = SpawnStore(store_url)
    try:
        _grow_a_young_store(store)
        clock[0] += prepared.RECHECK_SECONDS - 1
        with store.engine.connect() as conn:
            assert _plan_cache_mode(conn) == "force_custom_plan"  # not checked yet
        grown_at = time.time()
        clock[0] += 2
        for _ in range(3):  # (every pooled connection in turn)
            with store.engine.connect() as conn:
                assert conn.connection._connection_record.starttime < grown_at  # one opened while young
                assert _plan_cache_mode(conn) == "auto"
                assert prepared._NEXT_CHECK not in conn.connection._connection_record.info  # it checks no more
    finally:
        store.dispose()


@pytest.mark.parametrize("store_url", ["postgresql"], indirect=True)
def test_a_young_connection_checked_again_while_the_store_is_young_keeps_custom_plans(store_url, monkeypatch):
    from celery_spawn.store import prepared

    clock = [1000.0]
    monkeypatch.setattr(prepared, "time", SimpleNamespace(monotonic=lambda: clock[0]))
    store = SpawnStore(store_url)
    try:
        store.migrate()
        _chain(store, 3)
        for _ in range(3):
            clock[0] += prepared.RECHECK_SECONDS + 1
            with store.engine.connect() as conn:
                assert _plan_cache_mode(conn) == "force_custom_plan"
                next_check = conn.connection._connection_record.info[prepared._NEXT_CHECK]
                assert next_check == clock[0] + prepared.RECHECK_SECONDS  # checked now, and again in a while
                conn.rollback()
    finally:
        store.dispose()
