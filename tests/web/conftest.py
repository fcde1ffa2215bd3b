"""Fixtures of the web tests: trees a real worker produced (helpers are in :mod:`tests.web.helpers`)."""
from __future__ import annotations

import pytest

from tests.sample_trees import make_sample_trees
from tests.web.helpers import TIMEOUT, stop_main_process


@pytest.fixture(scope="module")
def trees(backend, worker, client_app):
    """Trees a real worker made: a fan-out of 11 chunks, a nested tree of 15 jobs, a refused spawn, a workflow."""
    made = make_sample_trees(client_app, "ds-web", TIMEOUT, workflow=True)
    made.queue = backend.queue
    yield made
    stop_main_process(worker)
