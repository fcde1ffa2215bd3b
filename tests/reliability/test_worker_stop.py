"""A worker stopped as systemd stops a service: SIGTERM to every process of its group at once.

celery-spawn's background process dies at once (``SIG_DFL``: it keeps nothing a
warm shutdown would save), most likely while it sleeps between two sweeps. The
worker's warm shutdown then stops that process: it must not wait on the dead
one. With a multiprocessing ``Event`` as the stop, it did, until the worker was
killed (here, by the harness after 30 s; under systemd, by ``TimeoutStopSec``).
"""
from __future__ import annotations

import os
import signal
import subprocess
import time

from tests.harness import wait_for
from tests.reliability.helpers import RelBackend, new_queue

#: Seconds an idle worker may take to stop: it takes one or two.
PROMPT = 20


def test_sigterm_to_the_whole_process_group_stops_the_worker_promptly(fresh_postgres, shared_redis,
                                                                        start_worker):
    backend = RelBackend("redis-postgresql", f"{shared_redis}/0", f"{shared_redis}/1", fresh_postgres, new_queue())
    app = backend.make_app()
    for attempt in range(2):
        worker = start_worker(backend, f"stop{attempt}")
        wait_for(lambda: "celery-spawn store" in worker.log(), 30, what="the worker's start")
        assert app.signature("tests.square", args=(attempt + 3,)).delay().get(timeout=30) == (attempt + 3) ** 2
        time.sleep(1.5)  # the background process is asleep between its looks at the store
        began = time.monotonic()
        os.killpg(worker.proc.pid, signal.SIGTERM)
        try:
            worker.proc.wait(PROMPT)
        except subprocess.TimeoutExpired:
            raise AssertionError(f"the worker still runs {PROMPT}s after SIGTERM to its process group\n"
                                 f"{worker.diagnosis()}") from None
        assert time.monotonic() - began < PROMPT
        assert "Warm shutdown" in worker.log()
