"""Job rows written with PostgreSQL COPY arrive exactly as an INSERT would write them."""
from __future__ import annotations

from datetime import datetime

import pytest
import sqlalchemy as sa
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from celery_spawn.errors import StoreError
from celery_spawn.store import SpawnStore
from celery_spawn.store import schema as s
from celery_spawn.store.pgcopy import copy_text, supports_copy
from tests.harness import with_driver

HOSTILE = [
    "", " ", "\\", "\\\\", "\\N", "\\n", "\\.", "\\.\n", "a\tb", "a\nb", "a\r\nb", "\r", "'", '"',
    "''; DROP TABLE x; --",
    "\x01\x02\x7f", "NULL", "null", "é\u00e9\u2028\u2029", "\U0001f600 emoji", "tab\tnew\nline\\back", "\\t\\r",
    "%s %(x)s", "{}", "E'\\x41'", "\b\f\v",
]


def job_row(i: int, text: str, when: datetime) -> dict:
    return {
        "id": f"job-{i}", "parent_id": text[:64] or None, "root_id": "root", "operation_id": "op",
        "position": i, "depth": 1, "task_name": text[:255] or "t", "queue": text[:255],
        "priority": None if i % 2 else i,
        "state": s.PENDING, "pending_deps": 0, "retries": 0, "message": text, "created_at": when,
    }


def _store_on(postgres_url: str, driver: str):
    store = SpawnStore(with_driver(postgres_url, driver))
    store.engine
    yield store
    store.dispose()


@pytest.fixture(scope="module", params=["psycopg2", "psycopg"])
def pg_store(request, postgres_url):
    """The store on each driver whose COPY path differs: psycopg2's ``copy_expert``, psycopg's ``write_row``."""
    yield from _store_on(postgres_url, request.param)


@pytest.fixture(scope="module")
def psycopg2_store(postgres_url):
    yield from _store_on(postgres_url, "psycopg2")


@pytest.fixture(scope="module")
def psycopg3_store(postgres_url):
    yield from _store_on(postgres_url, "psycopg")


def round_trip(store: SpawnStore, rows: list[dict]) -> list[dict]:
    with store.begin() as conn:
        assert supports_copy(conn)
        conn.execute(s.jobs.delete())
        store.insert_jobs(conn, rows)
    with store.read() as conn:
        found = conn.execute(sa.select(s.jobs).order_by(s.jobs.c.position)).mappings().all()
    return [{k: r[k] for k in rows[0]} for r in found]


def test_hostile_strings_and_nulls_arrive_unchanged(pg_store):
    when = datetime(2024, 2, 29, 23, 59, 58, 123456)
    rows = [job_row(i, text, when) for i, text in enumerate(HOSTILE)]
    assert round_trip(pg_store, rows) == rows


def test_defaults_fill_columns_the_rows_leave_out(pg_store):
    row = job_row(0, "x", datetime(2024, 1, 1))
    for key in ("pending_deps", "retries", "depth"):
        del row[key]
    with pg_store.begin() as conn:
        conn.execute(s.jobs.delete())
        pg_store.insert_jobs(conn, [row])
    with pg_store.read() as conn:
        stored = conn.execute(sa.select(s.jobs)).mappings().one()
    assert (stored["pending_deps"], stored["retries"], stored["depth"], stored["dispatched_at"]) == (0, 0, 0, None)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.lists(st.text(st.characters(blacklist_categories=("Cs",), blacklist_characters="\x00")), min_size=1,
                max_size=8))
def test_any_text_round_trips(pg_store, texts):
    when = datetime(2030, 12, 31, 0, 0, 0, 1)
    rows = [job_row(i, text, when) for i, text in enumerate(texts)]
    assert round_trip(pg_store, rows) == rows


def test_a_failed_copy_is_a_store_error_and_rolls_back(pg_store):
    when = datetime(2024, 1, 1)
    with pg_store.begin() as conn:
        conn.execute(s.jobs.delete())
    with pytest.raises(StoreError):
        with pg_store.begin() as conn:
            pg_store.insert_jobs(conn, [job_row(0, "a", when)])
            pg_store.insert_jobs(conn, [job_row(0, "duplicate id", when)])
    with pg_store.read() as conn:
        assert conn.execute(sa.select(sa.func.count()).select_from(s.jobs)).scalar() == 0
    with pg_store.begin() as conn:  # the pool hands out a usable connection afterwards
        pg_store.insert_jobs(conn, [job_row(1, "b", when)])


@pytest.fixture
def wait_callback():
    """A psycopg2 wait callback, as eventlet's patching and psycogreen install one."""
    from psycopg2.extensions import set_wait_callback
    from psycopg2.extras import wait_select

    set_wait_callback(wait_select)
    yield
    set_wait_callback(None)


def test_cooperative_connections_insert_without_copy(psycopg2_store, wait_callback):
    """psycopg2 refuses COPY with a wait callback ("copy_expert cannot be used with an asynchronous callback")."""
    pg_store = psycopg2_store
    when = datetime(2024, 1, 1)
    rows = [job_row(i, text, when) for i, text in enumerate(HOSTILE)]
    with pg_store.begin() as conn:
        assert not supports_copy(conn)
        conn.execute(s.jobs.delete())
        pg_store.insert_jobs(conn, rows)
    with pg_store.read() as conn:
        found = conn.execute(sa.select(s.jobs).order_by(s.jobs.c.position)).mappings().all()
    assert [{k: r[k] for k in rows[0]} for r in found] == rows


def test_copy_text_format():
    assert copy_text(None) == "\\N"
    assert copy_text("\\N") == "\\\\N"
    assert copy_text("a\tb\nc\rd\\") == "a\\tb\\nc\\rd\\\\"
    assert copy_text(True) == "t" and copy_text(False) == "f"
    assert copy_text(7) == "7"
    assert copy_text(datetime(2024, 1, 2, 3, 4, 5, 6)) == "2024-01-02 03:04:05.000006"
    with pytest.raises(TypeError):
        copy_text(object())


def test_psycopg_copies_with_write_row(psycopg3_store, monkeypatch):
    """On psycopg (3) the rows go through ``cursor.copy()`` and ``write_row``, which encodes them."""
    from psycopg import Copy

    written = []
    real = Copy.write_row
    monkeypatch.setattr(Copy, "write_row", lambda self, row: written.append(row) or real(self, row))
    when = datetime(2024, 1, 1)
    rows = [job_row(i, text, when) for i, text in enumerate(HOSTILE)]
    assert round_trip(psycopg3_store, rows) == rows
    assert len(written) == len(rows)


def test_psycopg_writes_binary_rows_with_the_columns_types():
    from sqlalchemy.dialects import postgresql

    from celery_spawn.store.pgcopy import _binary_types

    names = ("id", "position", "message", "created_at", "priority")
    assert _binary_types(s.jobs, names, postgresql.dialect()) == ["varchar", "int4", "text", "timestamp", "int4"]
    for kind in (postgresql.TSVECTOR(), postgresql.MONEY()):  # no binary dumper: text format then
        odd = sa.Table(f"odd_{kind}", sa.MetaData(), sa.Column("id", sa.String(8)), sa.Column("spot", kind))
        assert _binary_types(odd, ("id", "spot"), postgresql.dialect()) is None


def test_psycopg_falls_back_to_text_rows(psycopg3_store, monkeypatch):
    """Where a column's type has no binary dumper, write_row writes text rows (psycopg escapes them)."""
    from celery_spawn.store import pgcopy

    monkeypatch.setattr(pgcopy, "_binary_types", lambda *args: None)
    when = datetime(2024, 2, 29, 23, 59, 58, 123456)
    rows = [job_row(i, text, when) for i, text in enumerate(HOSTILE)]
    assert round_trip(psycopg3_store, rows) == rows
