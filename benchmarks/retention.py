"""Purge in a big store: its rate on its own, and what it costs a spawn load running beside it.

The store is the one :mod:`benchmarks.cli_store` builds: trees of a root and 99
children created evenly over the last ``span_hours``, each finished five seconds
after it began. A cutoff that leaves ``jobs`` of them older than it therefore
selects about that many jobs for a purge.

The spawn load, in a process of its own, records a 100-child spawn every ``interval``
seconds through the store calls a worker's spawn makes, in one transaction (the operation, its
parent's row, the children, the operation's total), and times each. It runs
once with no purge and once while a purge runs, for as long as the purge
takes, so both sets of latencies come from the same load against the same store. The load alone runs
first, on the store at rest.
"""
from __future__ import annotations

import multiprocessing
import statistics
import time
import uuid
from dataclasses import dataclass
from datetime import timedelta

from celery_spawn.engine.retention import DEFAULT_PAUSE_RATIO, Purger
from celery_spawn.store import SpawnStore
from celery_spawn.store import schema as s

from . import cli_store

SPAWN_CHILDREN = 100


@dataclass
class PurgeRun:
    jobs: int
    seconds: float

    @property
    def rate(self) -> float:
        return self.jobs / self.seconds if self.seconds else 0.0


@dataclass
class Latencies:
    samples: list[float]

    @property
    def median(self) -> float:
        return statistics.median(self.samples)

    @property
    def p99(self) -> float:
        ordered = sorted(self.samples)
        return ordered[min(len(ordered) - 1, int(len(ordered) * 0.99))]


def older_than_for(store_jobs: int, tree_size: int, span_hours: float, jobs: int, already: int = 0) -> timedelta:
    """The age beyond which about ``jobs`` more small-tree jobs lie, past the ``already`` oldest ones."""
    small_jobs = max(1, store_jobs - tree_size)
    share = min(1.0, (already + jobs) / small_jobs)
    return timedelta(hours=span_hours * (1 - share))


def purge(store: SpawnStore, older_than: timedelta, batch_size: int,
          pause_ratio: float = DEFAULT_PAUSE_RATIO) -> PurgeRun:
    begin = time.perf_counter()
    report = Purger(store).purge(older_than, batch_size=batch_size, pause_ratio=pause_ratio)
    return PurgeRun(report.jobs, time.perf_counter() - begin)


class SpawnLoad:
    """A steady spawn load in a process of its own: one recorded 100-child spawn per ``interval``.

    A process, as the workers that spawn are: a thread beside the purge would measure the GIL the two
    share, not the database. The samples come back when the load stops.
    """

    def __init__(self, store: SpawnStore, interval: float = 0.02) -> None:
        context = multiprocessing.get_context("spawn")
        self.samples: list[float] = []
        self._stop = context.Event()
        self._ready = context.Event()
        self._results, sender = context.Pipe(duplex=False)
        self._process = context.Process(target=_spawn_loop, name="spawn-load", daemon=True,
                                         args=(store.holder.url.render_as_string(hide_password=False), interval,
                                               self._ready, self._stop, sender))

    def __enter__(self) -> SpawnLoad:
        self._process.start()
        if not self._ready.wait(120):
            self._process.kill()
            raise RuntimeError("the spawn load did not start")
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self.samples = self._results.recv()
        self._process.join()


def _spawn_loop(url: str, interval: float, ready, stop, results) -> None:
    store = SpawnStore(url)
    spawn_once(store)  # connected and warm before the timing starts
    samples: list[float] = []
    ready.set()
    next_at = time.perf_counter()
    while not stop.is_set():
        begin = time.perf_counter()
        spawn_once(store)
        samples.append(time.perf_counter() - begin)
        next_at += interval
        stop.wait(max(0.0, next_at - time.perf_counter()))
    results.send(samples)
    store.dispose()


def spawn_once(store: SpawnStore) -> None:
    """One spawn's store calls: the operation, its parent's row, 100 children and the operation's total."""
    now = s.utcnow()
    parent = f"load-{uuid.uuid4().hex}"
    operation = f"op-{parent}"
    rng = cli_store.random.Random(parent)
    children = [cli_store.job_row(f"{parent}.{i}", parent, parent, operation, i, 1, "bench.load", "load",
                                  s.PENDING, now, rng) for i in range(SPAWN_CHILDREN)]
    with store.begin() as conn:
        store.insert_operation(conn, cli_store.op_row(operation, parent, parent, 0, "load", "load", children, now))
        store.ensure_job(conn, cli_store.job_row(parent, None, parent, None, 0, 0, "bench.parent", "load",
                                                 s.STARTED, now, rng))
        store.insert_jobs(conn, children)
        store.update_operation(conn, operation, total=SPAWN_CHILDREN, state=s.OP_RUNNING)


def load_for(store: SpawnStore, seconds: float) -> Latencies:
    """The spawn load alone, for ``seconds``."""
    with SpawnLoad(store) as load:
        time.sleep(seconds)
    return Latencies(load.samples)


def purge_under_load(store: SpawnStore, older_than: timedelta, batch_size: int,
                     pause_ratio: float = DEFAULT_PAUSE_RATIO) -> tuple[PurgeRun, Latencies]:
    with SpawnLoad(store) as load:
        time.sleep(0.5)  # the load is steady before the purge begins
        run = purge(store, older_than, batch_size, pause_ratio)
    return run, Latencies(load.samples)
