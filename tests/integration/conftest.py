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


@pytest.fixture(scope="module")
def observed_backend(request, tmp_path_factory):
    """One combination, named by the module's indirect parametrization of this fixture (the observability
    tests run on a few, each with a worker of :mod:`tests.observed_app`)."""
    from tests.harness import make_backend

    made, owner = make_backend(request.param, tmp_path_factory)
    yield made
    if owner is not None:
        owner.__exit__(None, None, None)


@pytest.fixture(scope="module")
def obs_client(observed_backend):
    """The test process's own app on the observed backend (for sending and inspecting)."""
    app = observed_backend.make_app()
    yield app
    get_state(app).store.dispose()
