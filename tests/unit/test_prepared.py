"""Prepared tracking statements on a real PostgreSQL: prepared once per connection, same results, recoverable."""
from __future__ import annotations

import uuid

import pytest
import sqlalchemy as sa

from celery_spawn.store import SpawnStore
from celery_spawn.store.prepared import PreparedStatement
from celery_spawn.store.sql import utcnow
from celery_spawn.store.transitions import Finish, succeed_and_release_pg

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
            won, released = succeed_and_release_pg(conn, [Finish(ids[0], "succeeded", None, utcnow())])
        assert won == {ids[0]: ids[0] + "-op"}
        assert [r["id"] for r in released] == [ids[1]] and released[0]["message"] == "message-1"
        assert NAME in _prepared_names(conn)
        conn.rollback()
        with conn.begin():
            _, released = succeed_and_release_pg(conn, [Finish(ids[1], "succeeded", None, utcnow())], marks=[ids[1]])
        assert [r["id"] for r in released] == [ids[2]]
        with conn.begin():  # a duplicate finish moves nothing and releases nothing
            assert succeed_and_release_pg(conn, [Finish(ids[1], "succeeded", None, utcnow())]) == ({}, [])


def test_a_session_that_lost_the_statement_fails_once_then_prepares_it_again(pg_store):
    ids = _chain(pg_store)
    with pg_store.engine.connect() as conn:
        with conn.begin():
            succeed_and_release_pg(conn, [Finish(ids[0], "succeeded", None, utcnow())])
        conn.exec_driver_sql("DEALLOCATE ALL")  # what a pooler switching sessions looks like
        conn.commit()
        with pytest.raises(sa.exc.DBAPIError), conn.begin():
            succeed_and_release_pg(conn, [Finish(ids[1], "succeeded", None, utcnow())])
        with conn.begin():
            won, released = succeed_and_release_pg(conn, [Finish(ids[1], "succeeded", None, utcnow())])
        assert list(won) == [ids[1]] and [r["id"] for r in released] == [ids[2]]


def test_turned_off_the_same_statement_runs_unprepared(postgres_url):
    store = SpawnStore(postgres_url, prepared_statements=False)
    try:
        ids = _chain(store)
        with store.begin() as conn:
            won, released = succeed_and_release_pg(conn, [Finish(ids[0], "succeeded", None, utcnow())])
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
        succeed_and_release_pg(conn, [Finish(ids[0], "succeeded", None, utcnow())], grace_seconds=60)
    refreshed = _lease(pg_store, op)
    assert refreshed > old + timedelta(seconds=29)
    with pg_store.engine.connect() as conn, conn.begin():
        _, released = succeed_and_release_pg(conn, [Finish(ids[1], "succeeded", None, utcnow())], grace_seconds=60)
    assert [r["id"] for r in released] == [ids[2]] and _lease(pg_store, op) == refreshed  # fresh: left alone
    with pg_store.engine.connect() as conn, conn.begin():  # no grace: every release refreshes it
        succeed_and_release_pg(conn, [Finish(ids[2], "succeeded", None, utcnow())], grace_seconds=0)
    assert _lease(pg_store, op) > refreshed


def test_lease_before_is_a_tenth_of_the_grace_at_most_a_second():
    from datetime import timedelta

    from celery_spawn.store.transitions import lease_before

    now = utcnow()
    assert lease_before(now, 60) == now - timedelta(seconds=1)
    assert lease_before(now, 5) == now - timedelta(seconds=0.5)
    assert lease_before(now, 0) == now
