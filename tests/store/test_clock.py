"""The store's clock is the database server's: a process whose own clock runs ahead measures its offset on
connecting, and the times it writes and compares are the server's (libfaketime shifts the process's clock)."""
from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest

from celery_spawn.store import utcnow
from celery_spawn.store.clock import offset_seconds
from tests.harness import ROOT, fast_clock_env

PROBE = textwrap.dedent("""
    import sys, time
    from celery_spawn.store import SpawnStore, utcnow
    from celery_spawn.store.clock import offset_seconds
    store = SpawnStore(sys.argv[1])
    with store.read():
        pass
    print(offset_seconds(), utcnow().timestamp(), time.time())
""")


def test_a_process_with_a_fast_clock_writes_the_servers_time(store, store_url):
    if store_url.startswith("sqlite"):
        pytest.skip("SQLite is on this host: its clock is the process's own")
    env = {"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin", **fast_clock_env()}
    probe = subprocess.run([sys.executable, "-c", PROBE, store_url], env=env, capture_output=True, text=True,
                           timeout=60, cwd=ROOT)
    assert probe.returncode == 0, probe.stderr
    offset, store_now, own_now = map(float, probe.stdout.split())
    assert -605 < offset < -595, offset          # the server is 10 minutes behind the process
    assert 595 < own_now - store_now < 605       # and the store's now is the server's


def test_this_process_agrees_with_the_server(store, store_url):
    with store.read():
        pass
    assert abs(offset_seconds()) < 2
    assert utcnow() is not None


MEASURE_ONLY = textwrap.dedent("""
    import sys, time
    from datetime import datetime, timezone
    from celery_spawn.store import SpawnStore
    from celery_spawn.store.clock import offset_seconds, server_eta
    store = SpawnStore(sys.argv[1])
    store.measure_clock()  # what a worker's main process does before its pool forks: no store call after
    eta = server_eta(5)
    print(offset_seconds(), (eta - datetime.now(timezone.utc)).total_seconds())
""")


def test_a_worker_measures_the_servers_clock_before_its_pool_forks(store, store_url):
    """A pool process that never reaches the store (it is out) dates its retries by what its main process
    measured: on a host ten minutes ahead, a retry in 5 s is due 595 s before that host's clock says."""
    if store_url.startswith("sqlite"):
        pytest.skip("SQLite is on this host: its clock is the process's own")
    env = {"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin", **fast_clock_env()}
    probe = subprocess.run([sys.executable, "-c", MEASURE_ONLY, store_url], env=env, capture_output=True,
                           text=True, timeout=60, cwd=ROOT)
    assert probe.returncode == 0, probe.stderr
    offset, eta_in = map(float, probe.stdout.split())
    assert -605 < offset < -595, offset
    assert -600 < eta_in < -590, eta_in


def test_a_store_that_is_out_leaves_the_hosts_clock_within_the_bound(caplog):
    import socket
    import time

    from celery_spawn.store import SpawnStore

    with socket.socket() as sock:  # a port that answers nothing: nobody listens there
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
        sock.listen(1)  # accepts the connection, never answers it: a hung store
        store = SpawnStore(f"postgresql://postgres:secret@127.0.0.1:{port}/nowhere")
        started = time.monotonic()
        with caplog.at_level("INFO", logger="celery_spawn.store.engine"):
            store.measure_clock()
        assert time.monotonic() - started < 10
    assert "could not be read at start" in caplog.text and "secret" not in caplog.text
