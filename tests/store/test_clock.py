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
