"""Shared fixtures: store backends, broker combinations and real worker processes."""
from __future__ import annotations

import os
import uuid
from pathlib import Path

import pytest

from tests.harness import (
    COMBINATIONS,
    STORES,
    Worker,
    make_backend,
    throwaway_database,
    throwaway_store,
)

pytest_plugins = ["pytester", "celery.contrib.pytest", "celery_spawn.contrib.pytest"]

ARTIFACTS = Path(os.environ.get("SPAWN_TEST_ARTIFACTS", Path(__file__).resolve().parent.parent / "test-artifacts"))


def pytest_addoption(parser):
    parser.addoption("--run-slow", action="store_true", default=False, help="run the long variants too")


#: The integration modules that also run on ``redis-postgresql-psycopg`` when every combination runs: the
#: paths a worker takes through the driver (COPY, prepared statements, releases, completion). The store suite
#: runs every store call on both drivers; the other integration modules (command line, labels, delays, ...)
#: add nothing on a second driver but minutes. ``SPAWN_TEST_BACKENDS`` (``tox -e psycopg``) runs them all.
PSYCOPG_MODULES = {"test_spawning", "test_workflows", "test_pools"}


def pytest_collection_modifyitems(config, items):
    if not os.environ.get("SPAWN_TEST_BACKENDS"):
        kept, dropped = [], []
        for item in items:
            params = getattr(getattr(item, "callspec", None), "params", {})
            module = item.module.__name__.rsplit(".", 1)[-1] if item.module else ""
            if params.get("backend") == "redis-postgresql-psycopg" and module not in PSYCOPG_MODULES:
                dropped.append(item)
            else:
                kept.append(item)
        if dropped:
            config.hook.pytest_deselected(items=dropped)
            items[:] = kept
    if config.getoption("--run-slow"):
        return
    skip = pytest.mark.skip(reason="long variant: pass --run-slow")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True, scope="session")
def _no_ambient_spawn_settings():
    """Settings from the developer's shell must not leak into test apps."""
    saved = {k: os.environ.pop(k) for k in list(os.environ) if k.startswith("CELERY_SPAWN_")}
    yield
    os.environ.update(saved)


@pytest.fixture(scope="session")
def artifacts() -> Path:
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    return ARTIFACTS


@pytest.fixture
def sqlite_url(tmp_path) -> str:
    return f"sqlite:///{tmp_path / 'spawn.sqlite3'}"


@pytest.fixture(scope="module")
def postgres_url():
    with throwaway_database("postgresql") as url:
        yield url


@pytest.fixture(scope="module")
def mariadb_url():
    with throwaway_database("mysql") as url:
        yield url


@pytest.fixture(params=STORES)
def store_url(request, tmp_path):
    """A fresh store URL on each SQL backend (function scoped: one database per test)."""
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'spawn.sqlite3'}"
        return
    with throwaway_store(request.param) as url:
        yield url


@pytest.fixture(scope="module", params=COMBINATIONS)
def backend(request, tmp_path_factory):
    """Each broker/store combination in turn, with its own database and queue."""
    made, owner = make_backend(request.param, tmp_path_factory)
    yield made
    if owner is not None:
        owner.__exit__(None, None, None)


@pytest.fixture(scope="module")
def worker(backend, tmp_path_factory, artifacts):
    """A real prefork worker (concurrency 2) consuming the backend's queue."""
    log = artifacts / f"worker-{backend.name}-{uuid.uuid4().hex[:6]}.log"
    proc = Worker(backend, log).start()
    yield proc
    proc.stop()


@pytest.fixture(scope="module")
def client_app(backend):
    """The test process's own app on the same backend (for sending and inspecting)."""
    app = backend.make_app()
    yield app
    from celery_spawn import get_state

    get_state(app).store.dispose()
