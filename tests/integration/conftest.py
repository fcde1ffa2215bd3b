"""Fixtures of the integration tests (the backends, workers and client app are in ``tests/conftest.py``)."""
from __future__ import annotations

import pytest

from celery_spawn import get_state
from tests.app import callbacks


@pytest.fixture(scope="module")
def callback_table(client_app):
    """The callbacks table ``tests.record_callback`` writes to, on the client app's store.

    Not autouse: the modules that need it say so with ``pytest.mark.usefixtures("callback_table")``.
    """
    with get_state(client_app).store.begin() as conn:
        callbacks.create(conn, checkfirst=True)
