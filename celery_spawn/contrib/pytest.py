"""The testing kit's pytest plugin: a fresh spawn store and an app installed on it, for every test.

Enable it (with Celery's own plugin, which gives ``celery_app`` and ``celery_worker``) in a ``conftest.py``::

    pytest_plugins = ["celery.contrib.pytest", "celery_spawn.contrib.pytest"]

Fixtures:

- ``spawn_store_url``: the store's database URL. A SQLite file in the test's
  ``tmp_path`` unless ``--spawn-store-url`` or the environment variable
  ``CELERY_SPAWN_TEST_DATABASE_URL`` names a database (the option wins); the
  kit empties the spawn tables of such a database before each test.
  In-memory SQLite is refused: a worker's threads and processes would each see
  a database of their own.
- ``spawn_store``: a :class:`~celery_spawn.store.SpawnStore` on that URL, its tables created.
- ``spawn_manager``: the handlers ``spawn_app`` uses; a fresh
  :class:`~celery_spawn.SpawnManager` unless a conftest overrides the fixture
  to return the project's own.
- ``spawn_app``: Celery's ``celery_app`` with spawning installed on that store
  and those handlers, made the current app for the test (so a ``shared_task``
  resolves to it). It is the app ``celery_worker`` runs: ask for ``spawn_app``
  before ``celery_worker`` so the worker starts with spawning installed.

The helpers (``assert_tree``, ``run_spawn_eagerly``, ``spawn_and_wait``,
``fake_context``, ``spawn_tree``) are in :mod:`celery_spawn.contrib.testing`,
and importable from here too.
"""
from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any, Iterator, cast

import pytest

from ..app import install
from ..engine import writebehind
from ..handlers import SpawnManager
from ..store import SpawnStore
from .testing import assert_tree, fake_context, run_spawn_eagerly, spawn_and_wait, spawn_tree

if TYPE_CHECKING:
    from pathlib import Path

    from celery import Celery

__all__ = ["assert_tree", "fake_context", "run_spawn_eagerly", "spawn_and_wait", "spawn_app", "spawn_manager",
           "spawn_store", "spawn_store_url", "spawn_tree"]

#: The environment variable naming the database the kit's stores use (instead of a SQLite file).
ENV_URL = "CELERY_SPAWN_TEST_DATABASE_URL"
#: The command-line option naming it (wins over the environment variable).
OPTION = "--spawn-store-url"
#: The SQLite file each test gets in its ``tmp_path`` by default.
SQLITE_FILE = "spawn.sqlite3"


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.getgroup("celery-spawn").addoption(
        OPTION, dest="spawn_store_url", default=None, metavar="URL",
        help=f"database URL of the spawn store in tests (default: a SQLite file per test; env: {ENV_URL})")


def pytest_configure(config: pytest.Config) -> None:
    configured_url(config)  # refuses an in-memory SQLite URL before any test runs


def in_memory_sqlite(url: str) -> bool:
    """Whether ``url`` is a SQLite database that lives in one connection's memory."""
    if not url.startswith("sqlite"):
        return False
    database = url.split("://", 1)[-1].lstrip("/")
    return database in ("", ":memory:") or database.startswith(("file::memory:", ":memory:")) or "mode=memory" in url


def configured_url(config: pytest.Config) -> str | None:
    """The URL the option or the environment gives, or None (then each test gets a SQLite file)."""
    url = config.getoption("spawn_store_url", default=None) or os.environ.get(ENV_URL) or None
    if url is not None and in_memory_sqlite(url):
        raise pytest.UsageError(
            f"celery-spawn's test store cannot be in-memory SQLite ({url!r}): a worker's threads and "
            f"processes would each get an empty database of their own. Leave {OPTION} and {ENV_URL} unset "
            "for a SQLite file per test, or name a file or a server database.")
    return url


@pytest.fixture
def spawn_store_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """The database URL of this test's spawn store (see the module docstring)."""
    return configured_url(request.config) or f"sqlite:///{tmp_path / SQLITE_FILE}"


@pytest.fixture
def spawn_store(spawn_store_url: str) -> Iterator[SpawnStore]:
    """A fresh spawn store: a new SQLite file, or the configured database with its spawn tables emptied."""
    store = SpawnStore(spawn_store_url)
    store.migrate()
    store.delete_all()
    yield store
    store.dispose()


@pytest.fixture
def spawn_manager() -> SpawnManager:
    """The spawn handlers of ``spawn_app``: override this fixture to return your project's manager."""
    return SpawnManager()


@pytest.fixture
def spawn_app(celery_app: Celery, spawn_manager: SpawnManager, spawn_store: SpawnStore,
              spawn_store_url: str) -> Iterator[Celery]:
    """``celery_app`` with spawning installed on ``spawn_store`` (so ``celery_worker`` runs spawns too).

    It is the current app during the test, so a ``shared_task`` resolves to its task. After the test,
    tracking goes back to writing synchronously if a ``celery_worker`` of the test made it batch.
    """
    from celery import current_app

    previous = cast(Any, current_app)._get_current_object()  # the proxy's app itself
    batching = writebehind.enabled_in_this_process()
    state = install(celery_app, spawn_manager, database_url=spawn_store_url)
    celery_app.set_current()
    yield celery_app
    if not batching:
        writebehind.disable_in_this_process()
    previous.set_current()
    state.store.dispose()
