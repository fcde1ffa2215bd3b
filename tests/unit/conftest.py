"""Fixtures of the unit tests: the shared rig (see :mod:`tests.unit.helpers`) on each store."""
from __future__ import annotations

from typing import Iterator

import pytest

from tests.unit.helpers import Rig


@pytest.fixture
def rig(store_url) -> Iterator[Rig]:
    """A Rig on each SQL backend."""
    made = Rig(store_url)
    yield made
    made.close()


@pytest.fixture
def sqlite_rig(sqlite_url) -> Iterator[Rig]:
    """A Rig on SQLite only, for behaviour that does not depend on the backend."""
    made = Rig(sqlite_url)
    yield made
    made.close()


@pytest.fixture
def broker_rig(sqlite_url) -> Iterator[Rig]:
    """A Rig that really publishes children to the memory broker (the parent still runs in-process)."""
    made = Rig(sqlite_url, eager=False)
    yield made
    made.drain()
    made.close()


@pytest.fixture
def publishing_rig(store_url):
    """A Rig that publishes children to the memory broker (not eager), on each SQL backend."""
    made = Rig(store_url, eager=False)
    yield made
    made.drain()
    made.close()
