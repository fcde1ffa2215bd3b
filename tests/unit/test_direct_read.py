"""The tree read without SQLAlchemy (``celery_spawn.store.direct``): which URLs it takes, and what it imports.

Its rows are checked against the store's own read on every backend in
``test_queries.py``; here: the URLs and failures it leaves to the store, and
that ``celery spawn tree`` of a top really runs without importing SQLAlchemy.
"""
from __future__ import annotations

import subprocess
import sys

import psycopg2
import pytest

from celery_spawn.store import SpawnStore, direct
from celery_spawn.store.timeouts import Timeouts
from tests.harness import ROOT, StoreBuilder


@pytest.mark.parametrize("url", [
    "postgresql://postgres@127.0.0.1/spawn?sslmode=require",  # driver arguments: the store applies them
    "postgresql://postgres@127.0.0.1:5432/spawn?options=-csearch_path%3Dother",
    "postgresql+asyncpg://postgres@127.0.0.1/spawn",
    "mysql+pymysql://root@127.0.0.1/spawn",
    "mysql://root@127.0.0.1/spawn?unix_socket=/run/mysqld/mysqld.sock",
    "postgresql://postgres@[::1]:5432/spawn",
    "postgresql://postgres@127.0.0.1/",
    "sqlite://",
    "sqlite:///:memory:",
    "sqlite:///spawn.sqlite3?mode=ro",
    "not a url",
])
def test_urls_it_leaves_to_the_store(url):
    assert direct._connect(url, Timeouts()) is None


def test_a_missing_sqlite_file_is_left_to_the_store_and_not_created(tmp_path):
    missing = tmp_path / "nothing-here.sqlite3"
    assert direct.read_tree(f"sqlite:///{missing}", "root") is None
    assert not missing.exists()


def test_a_server_that_refuses_is_left_to_the_store():
    # Port 9 (discard) is closed here: the connect fails at once, and the store will report it in its words.
    assert direct.read_tree("postgresql://postgres@127.0.0.1:9/spawn", "root") is None
    assert direct.read_tree("mysql://root@127.0.0.1:9/spawn", "root") is None


def test_the_url_reaches_the_driver_decoded_with_the_timeouts(monkeypatch):
    seen: dict = {}
    monkeypatch.setattr(psycopg2, "connect", lambda **kwargs: seen.update(kwargs))
    connect, _style, stream = direct._connect("postgresql+psycopg2://me:p%40ss%2Fw@db.example:6543/spa%20wn",
                                              Timeouts(connect=3, statement=7, lock=2))
    connect()
    assert not stream
    assert seen == {"host": "db.example", "port": 6543, "user": "me", "password": "p@ss/w", "dbname": "spa wn",
                    "connect_timeout": 3, "options": "-c statement_timeout=7000 -c lock_timeout=2000"}


def test_a_bare_postgresql_url_reads_through_psycopg2_and_an_explicit_driver_is_kept():
    import psycopg

    assert direct._postgres_driver("postgresql") is psycopg2
    assert direct._postgres_driver("postgresql+psycopg2") is psycopg2
    assert direct._postgres_driver("postgresql+psycopg") is psycopg


def _tree_command(url: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-X", "importtime", "-m", "celery", "spawn", "tree", *args, "-u", url],
                          cwd=ROOT, capture_output=True, text=True, timeout=120)


def _imported(done: subprocess.CompletedProcess) -> set[str]:
    return {line.rsplit("|", 1)[-1].strip() for line in done.stderr.splitlines() if line.startswith("import time:")}


def test_celery_spawn_tree_of_a_top_runs_without_sqlalchemy(tmp_path):
    url = f"sqlite:///{tmp_path / 'spawn.sqlite3'}"
    store = SpawnStore(url)
    store.migrate()
    built = StoreBuilder(store)
    built.job("root", task="tests.parent")
    built.spawn("root", 3, operation="op-root", handler="fan")
    built.spawn("root.1", 2, operation="op-1", handler="fan", queue="other")
    built.flush()
    store.dispose()

    top = _tree_command(url, "root")
    assert top.returncode == 0, top.stderr[-2000:]
    assert "sqlalchemy" not in _imported(top)
    assert top.stdout.splitlines()[-1] == "6 jobs, 3 levels (succeeded 6)"

    below = _tree_command(url, "root.1")  # not a top: the store walks down parent_id
    assert below.returncode == 0, below.stderr[-2000:]
    assert "sqlalchemy" in _imported(below)
    assert below.stdout.splitlines()[-1] == "3 jobs, 2 levels (succeeded 3)"

    unknown = _tree_command(url, "nope")
    assert unknown.returncode != 0 and "no spawned job has id 'nope'" in unknown.stderr
