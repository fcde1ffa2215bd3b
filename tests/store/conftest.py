"""The store contract suite: every test runs on SQLite, PostgreSQL and MariaDB (``store_url``)."""
from __future__ import annotations

import pytest

from celery_spawn.store import SpawnStore


@pytest.fixture
def store(store_url):
    """A migrated store on a fresh database of each backend."""
    made = SpawnStore(store_url)
    made.engine  # auto-migrates
    yield made
    made.dispose()
