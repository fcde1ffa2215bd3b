"""The benchmark runner: each case against its plain-Celery baseline, in the same run.

    python -m benchmarks all                 # the full sizes of issue 6 (several minutes)
    python -m benchmarks dispatch hops       # some cases
    python -m benchmarks all --smoke         # tiny sizes (what CI runs)

Needs the local Redis, PostgreSQL and RabbitMQ (MariaDB for ``--mysql``).
Prints a table of medians and ratios (celery-spawn / baseline) and writes the
numbers to ``benchmarks/results.json`` (``--json`` to change).
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import statistics
import subprocess
import sys
import time
import uuid
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable, Iterator

import redis

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tests.harness import throwaway_database, with_driver  # noqa: E402

REDIS_BROKER = "redis://127.0.0.1:6379/9"
AMQP_BROKER = "amqp://guest:guest@127.0.0.1:5672//"

FULL = {"dispatch": 10_000, "e2e": 10_000, "hops": 100, "memory": (100_000, 1_000_000),
        "queries": (10_000_000, 100_000), "purge": 1_000_000}
#: The query case's stores keep 30 days, as ``spawn_expires`` does by default: trees of 100 spread over them.
SPAN_HOURS = 30 * 24
#: Seconds the spawn load runs alone, as the baseline of the purge case (1,500 spawns).
BASELINE_SECONDS = 30.0
SMOKE = {"dispatch": 300, "e2e": 300, "hops": 10, "memory": (2_000, 10_000), "queries": (20_000, 2_000),
         "purge": 2_000}


#: Spawn / ``group`` time to publish the children, per broker. A speed-up that needs a setting off by default
#: does not count toward a target: rows measured with such settings carry none.
DISPATCH_TARGETS = {"redis": 0.12, "rabbitmq": 0.25}
#: Spawn / ``group`` until 10,000 tracked children ran, on ``prefork -c 2``; then at higher concurrency.
E2E_TARGET = 1.0
E2E_CONCURRENCY = {("prefork", 4): 1.05, ("threads", 8): 1.05}


def median_of(rounds: int, fn: Callable[[], float], warmup: int = 1) -> float:
    for _ in range(warmup):
        fn()
    return statistics.median(fn() for _ in range(rounds))


def medians_taking_turns(rounds: int, fns: dict[str, Callable[[], float]], warmup: int = 1) -> dict[str, float]:
    """The median of each function's rounds, the functions taking turns (each warmed up first)."""
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    times: dict[str, list[float]] = {name: [] for name in fns}
    order = list(fns)
    for _ in range(rounds):
        for name in order:
            times[name].append(fns[name]())
        order.reverse()
    return {name: statistics.median(found) for name, found in times.items()}


def installed_drivers() -> list[str]:
    """The PostgreSQL drivers the dispatch case runs on: psycopg2, and psycopg (3) when installed."""
    import importlib.util

    return [driver for driver in ("psycopg2", "psycopg") if importlib.util.find_spec(driver) is not None]


def wait_until(predicate: Callable[[], bool], timeout: float, what: str, interval: float = 0.01) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise TimeoutError(f"benchmark timed out waiting for {what}")
        time.sleep(interval)


class Row:
    """One line of the result table."""

    def __init__(self, case: str, what: str, spawn: float, baseline: float | None, unit: str,
                 target: float | None = None, lower_is_better: bool = True, note: str = "") -> None:
        self.case, self.what, self.spawn, self.baseline, self.unit = case, what, spawn, baseline, unit
        self.target, self.note = target, note
        self.ratio = spawn / baseline if baseline else None
        value = self.ratio if baseline else spawn
        self.met = None if target is None else (value <= target if lower_is_better else value >= target)

    def as_dict(self) -> dict:
        return dict(vars(self))


class Bench:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.sizes = SMOKE if args.smoke else FULL
        self.rounds = 1 if args.smoke else args.rounds
        self.rows: list[Row] = []
        self.counter = redis.Redis.from_url(REDIS_BROKER)
        self.log_dir = ROOT / "test-artifacts"
        self.log_dir.mkdir(exist_ok=True)

    # ---- helpers ---------------------------------------------------------------------------
    def app(self, broker: str, database_url: str, queue: str, dead_queue: str | None = None, fast: bool = False):
        from benchmarks.app import make_app

        return make_app(broker, database_url, queue, dead_queue, fast=fast)

    @contextlib.contextmanager
    def worker(self, broker: str, database_url: str, queue: str, pool: str = "prefork", concurrency: int = 2,
               dead_queue: str | None = None, fast: bool = False):
        env = {k: v for k, v in os.environ.items() if not k.startswith("CELERY_SPAWN_")}
        env.update(SPAWN_BENCH_BROKER=broker, CELERY_SPAWN_DATABASE_URL=database_url, SPAWN_BENCH_QUEUE=queue,
                   SPAWN_BENCH_DEAD_QUEUE=dead_queue or "", SPAWN_BENCH_FAST="1" if fast else "",
                   PYTHONPATH=str(ROOT))
        log = self.log_dir / f"bench-worker-{queue}.log"
        with open(log, "wb") as out:
            proc = subprocess.Popen([sys.executable, "-m", "celery", "-A", "benchmarks.app", "worker", "-P", pool,
                                     "-c", str(concurrency), "-Q", queue, "-l", "INFO", "--without-gossip",
                                     "--without-mingle", "--without-heartbeat"],
                                    cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT)
            try:
                wait_until(lambda: " ready." in log.read_text(errors="replace"), 60, "the worker", 0.1)
                yield proc
            finally:
                proc.terminate()
                try:
                    proc.wait(30)
                except subprocess.TimeoutExpired:
                    proc.kill()

    def operation_done(self, app, parent_id: str) -> bool:
        from celery_spawn import get_state
        from celery_spawn.handlers import default_operation_id

        store = get_state(app).store
        with store.read() as conn:
            op = store.get_operation(conn, default_operation_id(parent_id))
        return bool(op and op["completed"])

    # ---- case 1 ----------------------------------------------------------------------------
    def dispatch(self, pg_url: str) -> None:
        """Per broker: the ``group`` baseline, then a spawn through each installed PostgreSQL driver."""
        n = self.sizes["dispatch"]
        drivers = installed_drivers()
        for label, broker in (("redis", REDIS_BROKER), ("rabbitmq", AMQP_BROKER)):
            queue = f"bench-dispatch-{uuid.uuid4().hex[:6]}"
            apps = {driver: self.app(broker, with_driver(pg_url, driver), queue) for driver in drivers}
            app = apps[drivers[0]]
            noop = app.tasks["bench.noop"]
            count, purge = self._queue_tools(app, broker, queue)

            def group_round() -> float:
                from celery import group

                sigs = [noop.s("unused") for _ in range(n)]
                start = time.perf_counter()
                group(sigs).apply_async()
                wait_until(lambda: count() >= n, 120, "group messages")
                elapsed = time.perf_counter() - start
                purge()
                return elapsed

            def spawn_round(driver: str) -> float:
                parent = apps[driver].tasks["bench.parent"]
                start = time.perf_counter()
                parent.apply(kwargs={"key": "unused", "n": n, "_spawn_config": {
                    "handler": "fanout", "max_spawn_count": n, "batch_size": 1000}})
                wait_until(lambda: count() >= n, 120, "spawned messages")
                elapsed = time.perf_counter() - start
                purge()
                return elapsed

            baseline = median_of(self.rounds, group_round)
            # The drivers take turns round by round, so that a noisy moment falls on both.
            spawned = medians_taking_turns(self.rounds, {d: (lambda d=d: spawn_round(d)) for d in drivers})
            for driver in drivers:
                self.rows.append(Row("1 dispatch", f"{n:,} children, lineage in PostgreSQL/{driver}, {label}",
                                     spawned[driver], baseline, "s", target=DISPATCH_TARGETS.get(label),
                                     note=f"{n / spawned[driver]:,.0f} msg/s vs group {n / baseline:,.0f} msg/s"))
            if len(drivers) > 1:
                self.rows.append(Row("1 dispatch", f"psycopg (3) vs psycopg2, {label}", spawned["psycopg"],
                                     spawned["psycopg2"], "s", target=1.1,
                                     note="the two spawns' ratio to group compared: within 10%"))
            ceiling = median_of(self.rounds, lambda: self._kombu_ceiling(app, queue, n, count, purge))
            fastest = min(spawned.values())
            self.rows.append(Row("1 dispatch", f"kombu Producer.batch ceiling, {label}", fastest, ceiling, "s",
                                 note=f"ceiling {n / ceiling:,.0f} msg/s: the faster spawn reaches "
                                      f"{ceiling / fastest:.0%} of it"))
            self._dispatch_through_worker(label, broker, with_driver(pg_url, drivers[0]), n)

    def _dispatch_through_worker(self, label: str, broker: str, database_url: str, n: int) -> None:
        """What a user waits for: from the parent's ``apply_async`` to the last child message in the broker.

        A real worker takes the parent (its delivery, its start and the handler's
        generator count too) and spawns ``n`` plain children to a queue nobody
        consumes; the baseline sends a ``group`` of the same ``n`` to that queue
        from the client.
        """
        from celery import group

        queue = f"bench-parents-{uuid.uuid4().hex[:6]}"
        out = f"{queue}-out"
        client = self.app(broker, database_url, queue, out)
        noop, parent = client.tasks["bench.noop"], client.tasks["bench.parent"]
        count, purge = self._queue_tools(client, broker, out)

        def timed(send: Callable[[], object]) -> float:
            start = time.perf_counter()
            send()
            wait_until(lambda: count() >= n, 120, "messages in the consumed-by-nobody queue")
            elapsed = time.perf_counter() - start
            purge()
            return elapsed

        def spawn() -> float:
            return timed(lambda: parent.apply_async(kwargs={
                "key": "unused", "n": n, "_spawn_config": {"handler": "stream", "max_spawn_count": n}}))

        def baseline() -> float:
            return timed(lambda: group(noop.signature(("unused",), queue=out) for _ in range(n)).apply_async())

        with self.worker(broker, database_url, queue, dead_queue=out):
            times = medians_taking_turns(self.rounds, {"spawn": spawn, "group": baseline})
        self.rows.append(Row("1 dispatch", f"{n:,} children, parent sent to a worker, {label}",
                             times["spawn"], times["group"], "s",
                             note="the parent's delivery, start and handler included; group sent by the client"))

    def _queue_tools(self, app, broker: str, queue: str):
        if broker.startswith("redis"):
            return (lambda: self.counter.llen(queue)), (lambda: self.counter.delete(queue))
        from kombu import Connection, Queue

        conn = Connection(broker)
        channel = conn.channel()
        Queue(queue, channel=channel).declare()

        def count() -> int:
            return channel.queue_declare(queue, passive=True).message_count

        return count, (lambda: channel.queue_purge(queue))

    def _kombu_ceiling(self, app, queue: str, n: int, count, purge) -> float:
        """Raw kombu: the same number of Celery-protocol messages through Producer.batch()."""
        message = app.amqp.as_task_v2(str(uuid.uuid4()), "bench.noop", ("unused",), {})
        headers, properties, body, _ = message
        start = time.perf_counter()
        with app.producer_or_acquire() as producer, producer.batch(max_size=n):
            for _ in range(n):
                producer.publish(body, routing_key=queue, exchange="", headers=headers, serializer="json",
                                 **{k: v for k, v in properties.items() if k in ("correlation_id",)})
        wait_until(lambda: count() >= n, 120, "kombu messages")
        elapsed = time.perf_counter() - start
        purge()
        return elapsed

    # ---- cases 2 and 3 ----------------------------------------------------------------------
    def _against_worker(self, pg_url: str, fast: bool, baseline_canvas: Callable, spawn_kwargs: dict, n: int,
                        wait_for_tracking: bool, pool: str = "prefork", concurrency: int = 2
                        ) -> tuple[float, float]:
        """Median seconds of (celery-spawn, baseline) until ``n`` counted no-op tasks ran on a real worker
        (``pool``, ``concurrency``)."""
        queue = f"bench-{uuid.uuid4().hex[:6]}"
        app = self.app(REDIS_BROKER, pg_url, queue, fast=fast)
        noop, parent = app.tasks["bench.noop"], app.tasks["bench.parent"]

        def timed_until_counted(send: Callable[[str], object]) -> float:
            key = f"bench:{uuid.uuid4().hex}"
            start = time.perf_counter()
            sent = send(key)
            wait_until(lambda: int(self.counter.get(key) or 0) >= n, 600, f"{n} tasks")
            if wait_for_tracking and sent is not None:
                wait_until(lambda: self.operation_done(app, sent.id), 600, "tracking to finish", 0.05)
            return time.perf_counter() - start

        with self.worker(REDIS_BROKER, pg_url, queue, pool=pool, concurrency=concurrency, fast=fast):
            baseline = median_of(self.rounds, lambda: timed_until_counted(
                lambda key: baseline_canvas(noop, key).apply_async() and None))
            spawned = median_of(self.rounds, lambda: timed_until_counted(
                lambda key: parent.apply_async(kwargs={"key": key, "n": n, "_spawn_config": spawn_kwargs})))
        return spawned, baseline

    def e2e(self, pg_url: str) -> None:
        """Tracked no-op children against a ``group``: on ``prefork -c 2`` in both modes, then with defaults
        at higher concurrency (``prefork -c 4``, ``threads -c 8``)."""
        from celery import group

        n = self.sizes["e2e"]
        runs = [("prefork", 2, False), ("prefork", 2, True), *((pool, c, False) for pool, c in E2E_CONCURRENCY)]
        for pool, concurrency, fast in runs:
            spawned, baseline = self._against_worker(
                pg_url, fast, lambda noop, key: group([noop.s(key) for _ in range(n)]),
                {"handler": "fanout", "max_spawn_count": n, "batch_size": 1000}, n, wait_for_tracking=True,
                pool=pool, concurrency=concurrency)
            if (pool, concurrency) == ("prefork", 2):
                target = None if fast else E2E_TARGET
            else:
                target = E2E_CONCURRENCY[(pool, concurrency)]
            self.rows.append(Row("2 end to end", f"{n:,} tracked no-op children, {pool} -c {concurrency}, "
                                                 f"{_mode(fast)}", spawned, baseline, "s", target=target,
                                 note=f"{n / spawned:,.0f} tasks/s vs group {n / baseline:,.0f} tasks/s"))

    def hops(self, pg_url: str) -> None:
        from celery import chain

        n = self.sizes["hops"]
        for fast in (False, True):
            spawned, baseline = self._against_worker(
                pg_url, fast, lambda noop, key: chain(*[noop.si(key) for _ in range(n)]),
                {"handler": "sequence", "max_spawn_count": n}, n, wait_for_tracking=False)
            self.rows.append(Row("3 dependency hops", f"{n} steps, per hop, {_mode(fast)}", spawned / n * 1000,
                                 baseline / n * 1000, "ms", target=None if fast else 1.3))

    # ---- case 4 ----------------------------------------------------------------------------
    def memory(self, pg_url: str) -> None:
        small, large = self.sizes["memory"]
        peaks = {}
        for n in (small, large):
            queue = f"bench-mem-{uuid.uuid4().hex[:6]}"
            dead = f"{queue}-dead"
            app = self.app(REDIS_BROKER, pg_url, queue, dead)
            with self.worker(REDIS_BROKER, pg_url, queue, pool="solo", dead_queue=dead) as proc:
                idle = _peak_rss_mb(proc.pid)
                result = app.tasks["bench.parent"].apply_async(kwargs={"key": "unused", "n": n, "_spawn_config": {
                    "handler": "stream", "max_spawn_count": n, "batch_size": 1000}})
                wait_until(lambda: self.counter.llen(dead) >= n, 3600, f"{n:,} streamed children", 0.5)
                wait_until(lambda: result.id in (Path(self.log_dir) / f"bench-worker-{queue}.log").read_text(
                    errors="replace") and "succeeded" in (Path(self.log_dir) / f"bench-worker-{queue}.log").read_text(
                    errors="replace"), 600, "the parent to finish", 0.5)
                peaks[n] = (_peak_rss_mb(proc.pid), idle)
            self.counter.delete(dead)
        (small_peak, small_idle), (large_peak, _) = peaks[small], peaks[large]
        self.rows.append(Row("4 memory", f"peak RSS spawning {large:,} children (MB)", large_peak, None, "MB",
                             target=200, note=f"idle worker {small_idle:.0f} MB"))
        self.rows.append(Row("4 memory", f"peak RSS {large:,} vs {small:,} children", large_peak, small_peak, "MB",
                             target=1.15, note="ratio near 1: memory does not grow with the spawn"))

    # ---- case 5 ----------------------------------------------------------------------------
    def queries(self, pg_url: str, mysql_url: str | None) -> None:
        for label, url in (("PostgreSQL", pg_url), ("MariaDB", mysql_url)):
            if url is None:
                continue
            mariadb = label == "MariaDB"
            pool, log = (self.args.mysql_buffer_pool, self.args.mysql_redo_log) if mariadb else (0, 0)
            with mysql_sized_for_store(url, pool, log):
                self._queries_on(label, url, pool, log)

    def _queries_on(self, label: str, url: str, buffer_pool: int, redo_log: int) -> None:
        from benchmarks import cli_store
        from benchmarks import retention
        from celery_spawn import render
        from celery_spawn.store import SpawnStore, queries

        jobs, tree = self.sizes["queries"]
        purged = self.sizes["purge"]
        store = SpawnStore(url)
        cli_store.build(store, jobs // 10, tree // 10, 47, 7, span_hours=SPAN_HOURS)
        small_table = _small_tree_time(store)
        build = cli_store.build(store, jobs, tree, 47, 7, span_hours=SPAN_HOURS)
        big_tree, statements, flat = cli_store.timed(
            store, lambda c: queries.tree_rows(c, cli_store.BIG_ROOT), self.rounds)
        text = statistics.median(_seconds(lambda: list(render.tree_text_chunks(flat.rows, flat.start)))
                                 for _ in range(self.rounds))
        command = _tree_command_times(url, self.rounds + 2)
        stats, _, _ = cli_store.timed(store, lambda c: queries.stats(c, hours=24), self.rounds)
        detailed, _, _ = cli_store.timed(store, lambda c: queries.stats(c, hours=24, detailed=True),
                                         self.rounds)
        big_table = _small_tree_time(store)
        # the load alone first, on the store at rest: not in the wake of a purge (autovacuum, InnoDB's purge)
        baseline = retention.load_for(store, BASELINE_SECONDS if self.sizes is FULL else 5.0)
        alone = retention.purge(store, retention.older_than_for(jobs, tree, SPAN_HOURS, purged), 2000)
        loaded, during = retention.purge_under_load(
            store, retention.older_than_for(jobs, tree, SPAN_HOURS, purged, already=alone.jobs), 2000)
        store.dispose()
        size = f"{jobs:,} jobs, {label}"
        self.rows.append(Row("5 queries", f"tree of {tree:,} nodes, {size}", big_tree, None, "s",
                             target=0.4, note=f"{statements} statements; text render {text:.3f}s more; "
                                              f"store built in {build:.0f}s"
                                              + (f"; InnoDB buffer pool {buffer_pool:,} MiB" if buffer_pool else "")
                                              + (f", redo log {redo_log:,} MiB" if redo_log else "")))
        self.rows.append(Row(
            "5 queries", f"`celery spawn tree` of {tree:,} nodes, whole process, {label}",
            command["tree"] - command["celery --help"], command["client"], "s", target=2.0,
            note=f"tree {command['tree']:.3f}s less `celery --help` {command['celery --help']:.3f}s, "
                 f"against {_client_name(url)} printing the same rows"))
        self.rows.append(Row("5 queries", f"stats --hours 24, {size}", stats, None, "s", target=0.1))
        self.rows.append(Row("5 queries", f"stats --hours 24 --detailed, {size}", detailed, None, "s",
                             target=0.5))
        self.rows.append(Row("5 queries", f"100-node tree in {jobs:,} vs {jobs // 10:,} rows, {label}",
                             big_table, small_table, "s", target=1.5,
                             note="ratio near 1: a fixed tree does not slow down as the table grows"))
        self.rows.append(Row("6 purge", f"purge {alone.jobs:,} jobs of {size}, jobs/s", alone.rate,
                             None, "jobs/s", target=20_000, lower_is_better=False,
                             note=f"{alone.seconds:.1f}s at the default pause ratio "
                                  f"{retention.DEFAULT_PAUSE_RATIO:g}"))
        self.rows.append(Row("6 purge", f"spawn p99 during a purge of {loaded.jobs:,} jobs, {label}",
                             during.p99, baseline.p99, "s", target=2.0,
                             note=f"100-child spawns every 20 ms, {len(during.samples)} vs "
                                  f"{len(baseline.samples)}; median {during.median * 1000:.1f} vs "
                                  f"{baseline.median * 1000:.1f} ms; purge {loaded.rate:,.0f} jobs/s under load"))

    # ---- output ----------------------------------------------------------------------------
    def report(self) -> None:
        header = f"{'case':<18} {'what':<58} {'spawn':>10} {'baseline':>10} {'ratio':>7} {'target':>7}  met"
        print(header)
        print("-" * len(header))
        for row in self.rows:
            base = f"{row.baseline:10.3f}" if row.baseline is not None else f"{'-':>10}"
            ratio = f"{row.ratio:7.2f}" if row.ratio is not None else f"{'-':>7}"
            target = f"{row.target:7.2f}" if row.target is not None else f"{'-':>7}"
            met = {True: "yes", False: "NO", None: ""}[row.met]
            print(f"{row.case:<18} {row.what:<58} {row.spawn:10.3f} {base} {ratio} {target}  {met}"
                  + (f"   {row.note}" if row.note else ""))
        out = Path(self.args.json)
        out.write_text(json.dumps({
            "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "machine": f"{platform.node()} {platform.machine()} {os.cpu_count()} cores",
            "smoke": self.args.smoke, "rounds": self.rounds,
            "rows": [row.as_dict() for row in self.rows],
        }, indent=2))
        print(f"\nwritten to {out}")


@contextlib.contextmanager
def mysql_sized_for_store(url: str, buffer_pool: int, redo_log: int) -> Iterator[None]:
    """Size MariaDB's InnoDB buffer pool and redo log (MiB; 0 leaves one as it is) while the block runs, then
    restore them.

    Debian's MariaDB keeps a 128 MiB buffer pool with ``O_DIRECT`` and a 96 MiB redo log: a 10,000,000-job
    store then reads most pages from the disk, and a purge of a million rows fills the redo log again and
    again, each time forcing a checkpoint that stalls every commit beside it. That measures the server's
    configuration more than the queries; a server that holds such a store is given gigabytes of both. The
    runner says which sizes it used.
    """
    import sqlalchemy as sa

    wanted = {name: mib for name, mib in (("innodb_buffer_pool_size", buffer_pool),
                                          ("innodb_log_file_size", redo_log)) if mib}
    if not wanted:
        yield
        return
    engine = sa.create_engine(url, poolclass=sa.pool.NullPool)
    before: dict[str, int] = {}
    try:
        with engine.connect() as conn:
            for name, mib in wanted.items():
                before[name] = int(conn.execute(sa.text(f"SELECT @@{name}")).scalar())
                conn.execute(sa.text(f"SET GLOBAL {name} = :size"), {"size": mib * 2**20})
                print(f"MariaDB {name} {before[name] // 2**20} MiB -> {mib} MiB for the query case", flush=True)
        yield
    finally:
        with engine.connect() as conn:
            for name, size in before.items():
                conn.execute(sa.text(f"SET GLOBAL {name} = :size"), {"size": size})
        engine.dispose()


def _seconds(fn: Callable[[], object]) -> float:
    begin = time.perf_counter()
    fn()
    return time.perf_counter() - begin


def _small_tree_time(store) -> float:
    """Time ``tree`` on one of the store's 100-node trees (the same shape in every store)."""
    import sqlalchemy as sa

    from benchmarks import cli_store
    from celery_spawn.store import queries
    from celery_spawn.store import schema as s

    with store.read() as conn:
        root = conn.execute(sa.select(s.jobs.c.id).where(s.jobs.c.parent_id.is_(None),
                                                         s.jobs.c.id != cli_store.BIG_ROOT).limit(1)).scalar()
    seconds, _, _ = cli_store.timed(store, lambda c: queries.spawn_tree(c, root), 25)  # (milliseconds: many runs)
    return seconds


def _client_name(url: str) -> str:
    return "psql -qAt" if url.startswith("postgresql") else "mariadb -N -B"


def _tree_command_times(url: str, rounds: int) -> dict[str, float]:
    """Whole-process wall times, taking turns: ``celery spawn tree`` of the big tree, ``celery --help`` (what
    every ``celery`` command pays to start) and the database's own client printing the same rows."""
    import sqlalchemy as sa

    from benchmarks import cli_store

    where = sa.engine.make_url(url)
    select = (f"SELECT id, parent_id, task_name, state, depth, queue, operation_id, position "
              f"FROM spawn_jobs WHERE root_id = '{cli_store.BIG_ROOT}'")
    if where.get_backend_name() == "postgresql":
        client = ["psql", "-h", where.host or "127.0.0.1", "-p", str(where.port or 5432), "-U",
                  where.username or "postgres", "-d", where.database or "", "-qAt", "-c", select]
    else:
        client = ["mariadb", "-h", where.host or "127.0.0.1", "-P", str(where.port or 3306), "-u",
                  where.username or "root", "-D", where.database or "", "-N", "-B", "-e", select]
    celery = [sys.executable, "-m", "celery"]
    env = {**os.environ, "CELERY_SPAWN_DATABASE_URL": url}

    def run(argv: list[str]) -> Callable[[], float]:
        def once() -> float:
            begin = time.perf_counter()
            subprocess.run(argv, env=env, cwd=ROOT, check=True, stdout=subprocess.DEVNULL)
            return time.perf_counter() - begin
        return once

    return medians_taking_turns(rounds, {"tree": run([*celery, "spawn", "tree", cli_store.BIG_ROOT]),
                                         "celery --help": run([*celery, "--help"]), "client": run(client)})


def _mode(fast: bool) -> str:
    return "fast commits, no start tracking" if fast else "default settings"


def _peak_rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


CASES = ("dispatch", "e2e", "hops", "memory", "queries")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__.split("\n")[0])
    parser.add_argument("cases", nargs="*", default=["all"], help=f"all, or some of: {', '.join(CASES)}")
    parser.add_argument("--smoke", action="store_true", help="tiny sizes, one round (CI)")
    parser.add_argument("--rounds", type=int, default=3, help="measured rounds after one warm-up (median)")
    parser.add_argument("--mysql", action="store_true", help="also run the query case on MariaDB")
    parser.add_argument("--mysql-buffer-pool", type=int, default=4096, metavar="MIB",
                        help="MariaDB's innodb_buffer_pool_size during the query case, restored after "
                             "(default 4096; 0 keeps the server's)")
    parser.add_argument("--mysql-redo-log", type=int, default=1024, metavar="MIB",
                        help="MariaDB's innodb_log_file_size during the query case, restored after "
                             "(default 1024; 0 keeps the server's)")
    parser.add_argument("--json", default=str(ROOT / "benchmarks" / "results.json"))
    args = parser.parse_args(argv)
    chosen = CASES if "all" in args.cases else tuple(args.cases)
    unknown = set(chosen) - set(CASES)
    if unknown:
        parser.error(f"unknown case(s): {', '.join(sorted(unknown))}")
    bench = Bench(args)
    with throwaway_database("postgresql") as pg_url, contextlib.ExitStack() as stack:
        mysql_url = stack.enter_context(throwaway_database("mysql")) if args.mysql else None
        for case in chosen:
            print(f"== {case}", flush=True)
            if case == "queries":
                bench.queries(pg_url, mysql_url)
            else:
                getattr(bench, case)(pg_url)
    bench.report()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
