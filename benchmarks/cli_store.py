"""Build a big lineage store and time what ``celery spawn tree`` and ``celery spawn stats`` do on it.

    python benchmarks/cli_store.py --url postgresql+psycopg2://postgres@127.0.0.1/spawn_bench
    python benchmarks/cli_store.py --url sqlite:///bench.sqlite3 --jobs 200000 --tree-size 50000

The store gets ``--jobs`` jobs (default 1,000,000): one tree of ``--tree-size``
nodes (default 100,000; a complete tree with ``--fanout`` children per node)
and, for the rest, trees of one root and 99 children, created over the last
``--span-hours`` (default 48, so that ``stats --hours 24`` sees about half of
the store; 720 spreads them over the 30 days ``spawn_expires`` keeps). The
tables are emptied first (``--reuse`` keeps a store built by an earlier run).
Work finishes as it does in a worker: only the operations created in the last
``--running-hours`` (default 1) and the big tree's top operation may still have
unfinished children (about 2% of theirs, so most of them still run); every
other child is final, and each complete operation carries the rollup of its
children that a worker writes when it completes one, which ``stats`` reads
instead of the children. ``--running-hours 48`` gives the older shape of this
store, in which most operations of any age still run.

It prints, as the median of ``--repeat`` runs after one warm-up: the query and render time of
``tree`` on the big tree (text and JSON), of ``stats --hours 24`` and
``--hours 48`` (the whole store), the number of SQL statements each ran, and
the wall time of the real ``celery spawn`` commands as subprocesses.
``--explain`` also prints the plan of every statement ``tree`` and ``stats``
run (``EXPLAIN ANALYZE`` on PostgreSQL, ``ANALYZE`` on MariaDB/MySQL,
``EXPLAIN QUERY PLAN`` on SQLite): a whole tree should be one index range on
``ix_spawn_jobs_root_depth``; the child stats read the window's operations
(their rollups) and, for the operations still running, one index-only range
of ``ix_spawn_jobs_operation_state`` each.
"""
from __future__ import annotations

import argparse
import contextlib
import os
import random
import statistics
import subprocess
import tempfile
import sys
import time
from collections.abc import Callable, Iterator
from datetime import datetime, timedelta, timezone
from pathlib import Path

import sqlalchemy as sa

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from celery_spawn import render  # noqa: E402
from celery_spawn.store import SpawnStore, queries  # noqa: E402
from celery_spawn.store import schema as s  # noqa: E402
from celery_spawn.store.rollups import write_task_rollups  # noqa: E402
from celery_spawn.store.pgcopy import copy_rows, supports_copy  # noqa: E402

BIG_ROOT = "bench-root"
SMALL_TREE = 100  # a root and 99 children
ROWS_PER_INSERT = 20_000
STATES = [s.SUCCEEDED] * 95 + [s.FAILED] * 3 + [s.STARTED, s.PENDING]
#: The children of a complete operation: the same odds, every one final.
FINAL_STATES = [state for state in STATES if state in s.FINAL_JOB_STATES]
RUNNING_HOURS = 1.0
#: The small trees are created over this many hours before now.
SPAN_HOURS = 48.0


def utcnow() -> datetime:
    return datetime.now(timezone.utc).replace(tzinfo=None)


def job_row(job_id: str, parent_id: str | None, root_id: str, operation_id: str | None, position: int,
            depth: int, task: str, queue: str, state: str, created: datetime, rng: random.Random) -> dict:
    started = created + timedelta(milliseconds=rng.randint(5, 500))
    finished = started + timedelta(milliseconds=rng.randint(10, 3000)) if state in s.FINAL_JOB_STATES else None
    return {"id": job_id, "parent_id": parent_id, "root_id": root_id, "operation_id": operation_id,
            "position": position, "depth": depth, "task_name": task, "queue": queue, "priority": None,
            "state": state, "pending_deps": 0, "retries": 0, "message": None, "error": None,
            "created_at": created, "dispatched_at": created, "started_at": started if state != s.PENDING else None,
            "finished_at": finished}


def op_row(op_id: str, parent_id: str, root_id: str, depth: int, handler: str, queue: str,
           children: list[dict], created: datetime) -> dict:
    """An operation whose state follows its ``children`` (job rows): complete, with the rollup a worker
    writes (Tracker._try_complete), when they are all final; running, without a rollup, otherwise."""
    row = {"id": op_id, "parent_id": parent_id, "root_id": root_id, "parent_task": "bench.parent",
           "handler": handler, "queue": queue, "depth": depth, "state": s.OP_RUNNING, "total": len(children),
           "config": None, "error": None, "on_complete": None, "wait_for_descendants": False,
           "fail_fast": False, "completed": False, "created_at": created, "updated_at": created,
           "finished_at": None, "children_timed": None, "children_seconds": None, "children_max_seconds": None,
           **{column: None for column in s.CHILD_COUNT_COLUMNS.values()}}
    states = [child["state"] for child in children]
    if any(state not in s.FINAL_JOB_STATES for state in states):
        return row
    durations = [(c["finished_at"] - c["started_at"]).total_seconds() for c in children
                 if c["started_at"] is not None and c["finished_at"] is not None]
    row.update(
        state=s.OP_SUCCEEDED if all(state == s.SUCCEEDED for state in states) else s.OP_PARTIALLY_FAILED,
        completed=True, finished_at=created + timedelta(seconds=5), children_timed=len(durations),
        children_seconds=round(sum(durations), 6), children_max_seconds=max(durations, default=None),
        **{column: states.count(state) for state, column in s.CHILD_COUNT_COLUMNS.items()})
    return row


def big_tree(size: int, fanout: int, now: datetime, rng: random.Random) -> Iterator[tuple[str, dict]]:
    """A complete tree: node i's parent is (i - 1) // fanout; one operation per node with children.

    The top operation still runs (its children draw from every state); the others are complete.
    """
    def nid(i: int) -> str:
        return BIG_ROOT if i == 0 else f"big-{i}"

    depths = [0] * size
    created = now - timedelta(hours=1)
    children: dict[int, list[dict]] = {}  # the rows of each operation's children, until it is written
    for i in range(size):
        parent = (i - 1) // fanout if i else None
        depth = depths[parent] + 1 if parent is not None else 0
        depths[i] = depth
        operation = f"op-big-{parent}" if parent is not None else None
        state = rng.choice(STATES if parent == 0 else FINAL_STATES) if i else s.SUCCEEDED
        row = job_row(nid(i), nid(parent) if parent is not None else None, BIG_ROOT, operation,
                      (i - 1) % fanout if i else 0, depth, "bench.node", "bench-big", state, created, rng)
        yield "job", row
        if parent is not None:
            siblings = children[parent]
            siblings.append(row)
            if len(siblings) == min(fanout, size - (parent * fanout + 1)):  # the last child of its operation
                yield "op", op_row(f"op-big-{parent}", nid(parent), BIG_ROOT, depths[parent], "big_tree",
                                   "bench-big", children.pop(parent), created)
        if i * fanout + 1 < size:
            children[i] = []


def small_trees(count: int, now: datetime, rng: random.Random, running_hours: float = RUNNING_HOURS,
                span_hours: float = SPAN_HOURS) -> Iterator[tuple[str, dict]]:
    queues = ["images", "etl", "reports", "default"]
    handlers = ["image_processor", "dataset_processor", "workflow", "safe_spawner"]
    for t in range(count):
        age = rng.uniform(0, span_hours * 3600)
        created = now - timedelta(seconds=age)
        root, op = f"r{t}", f"op{t}"
        queue, handler = queues[t % 4], handlers[t % 4]
        yield "job", job_row(root, None, root, None, 0, 0, "bench.parent", queue, s.SUCCEEDED, created, rng)
        odds = STATES if age < running_hours * 3600 else FINAL_STATES
        children = [job_row(f"{root}.{position}", root, root, op, position, 1, f"bench.{handler}.child", queue,
                            rng.choice(odds), created, rng) for position in range(SMALL_TREE - 1)]
        for child in children:
            yield "job", child
        yield "op", op_row(op, root, root, 0, handler, queue, children, created)


def build(store: SpawnStore, jobs: int, tree_size: int, fanout: int, seed: int,
          running_hours: float = RUNNING_HOURS, span_hours: float = SPAN_HOURS) -> float:
    """Fill the store (emptied first); returns the seconds the build took.

    The rows go in as the store's bulk path writes a spawn's children (``COPY`` on
    PostgreSQL, multi-row ``INSERT`` elsewhere), with the secondary indexes
    dropped during the load and created again after it, as a bulk load is done.
    """
    rng = random.Random(seed)
    now = utcnow()
    engine = store.engine
    if engine.dialect.name in ("mysql", "mariadb"):  # LOAD DATA LOCAL needs the client's consent
        engine = sa.create_engine(engine.url.update_query_dict({"local_infile": "1"}), poolclass=sa.NullPool)
    with engine.begin() as conn:
        for table in (s.dependencies, s.jobs, s.task_rollups, s.operations):
            conn.execute(table.delete())
    small = max(0, (jobs - tree_size) // SMALL_TREE)
    buffers: dict[str, list[dict]] = {"job": [], "op": []}
    tables = {"job": s.jobs, "op": s.operations}
    written = 0
    started = time.perf_counter()

    def flush(kind: str) -> None:
        nonlocal written
        rows = buffers[kind]
        if rows:
            with engine.begin() as conn:
                if supports_copy(conn):
                    copy_rows(conn, tables[kind], rows)
                elif conn.dialect.name in ("mysql", "mariadb"):
                    _load_data(conn, tables[kind], rows)
                else:
                    conn.execute(tables[kind].insert(), rows)
            if kind == "job":
                written += len(rows)
            buffers[kind] = []

    with _indexes_dropped(engine, (s.jobs, s.operations)):
        for source in (big_tree(tree_size, fanout, now, rng), small_trees(small, now, rng, running_hours, span_hours)):
            for kind, row in source:
                buffers[kind].append(row)
                if len(buffers[kind]) >= ROWS_PER_INSERT:
                    flush(kind)
                    if kind == "job" and written % 1_000_000 < ROWS_PER_INSERT:
                        print(f"  {written:,} jobs written ({time.perf_counter() - started:.0f}s)", flush=True)
        flush("job")
        flush("op")
        print(f"  rows written ({time.perf_counter() - started:.0f}s); creating the indexes", flush=True)
    with engine.begin() as conn:  # the per-task rollups of the complete operations, as a worker writes them
        write_task_rollups(conn, s.operations.c.children_timed.isnot(None))
    analyze(engine)
    seconds = time.perf_counter() - started
    print(f"built {written:,} jobs in {seconds:.1f}s", flush=True)
    return seconds


def _load_data(conn: sa.Connection, table: sa.Table, rows: list[dict]) -> None:
    """MariaDB/MySQL's bulk path: ``LOAD DATA LOCAL INFILE`` from a tab-separated file of ``rows``."""
    def text(value: object) -> str:
        if value is None:
            return "\\N"
        if isinstance(value, bool):
            return "1" if value else "0"
        if isinstance(value, datetime):
            return value.isoformat(sep=" ")
        return str(value).replace("\\", "\\\\").replace("\t", "\\t").replace("\n", "\\n")

    columns = list(rows[0])
    with tempfile.NamedTemporaryFile("w", suffix=".tsv", encoding="utf-8") as out:
        out.writelines("\t".join(map(text, (row[c] for c in columns))) + "\n" for row in rows)
        out.flush()
        names = ", ".join(f"`{c}`" for c in columns)
        conn.exec_driver_sql(f"LOAD DATA LOCAL INFILE '{out.name}' INTO TABLE `{table.name}` "
                             f"CHARACTER SET utf8mb4 ({names})")


@contextlib.contextmanager
def _indexes_dropped(engine: sa.Engine, tables: tuple[sa.Table, ...]) -> Iterator[None]:
    """Drop the tables' secondary indexes for the block and create them again after it."""
    indexes = [index for table in tables for index in table.indexes]
    with engine.begin() as conn:
        for index in indexes:
            index.drop(conn, checkfirst=True)
    try:
        yield
    finally:
        for index in indexes:
            with engine.begin() as conn:
                index.create(conn, checkfirst=True)


def analyze(engine: sa.Engine) -> None:
    with engine.connect() as conn:
        if engine.dialect.name == "postgresql":
            conn.execution_options(isolation_level="AUTOCOMMIT").exec_driver_sql("VACUUM ANALYZE")
        elif engine.dialect.name in ("mysql", "mariadb"):
            conn.exec_driver_sql(
                "ANALYZE TABLE spawn_jobs, spawn_operations, spawn_dependencies, spawn_task_rollups").all()
        else:
            conn.exec_driver_sql("ANALYZE")
            conn.commit()


def count_rows(store: SpawnStore) -> int:
    with store.read() as conn:
        return int(conn.execute(sa.select(sa.func.count()).select_from(s.jobs)).scalar() or 0)


def timed(store: SpawnStore, fn: Callable[[sa.Connection], object], repeat: int,
          warmup: int = 1) -> tuple[float, int, object]:
    """Median seconds of ``fn`` on a fresh read connection after ``warmup`` untimed runs, and its statements.

    The warm-up is the runner's rule for every case: the first run after a
    store is built pays for pages the build pushed out of the database's cache.
    """
    for _ in range(warmup):
        with store.read() as conn:
            fn(conn)
    statements = []

    def count(*_args: object, **_kwargs: object) -> None:
        statements.append(1)

    engine = store.engine
    times, result = [], None
    for _ in range(repeat):
        with store.read() as conn:
            conn.exec_driver_sql("SELECT 1")  # connect (and BEGIN on SQLite) outside the timing
            statements.clear()
            sa.event.listen(engine, "before_cursor_execute", count)
            try:
                begin = time.perf_counter()
                result = fn(conn)
                times.append(time.perf_counter() - begin)
            finally:
                sa.event.remove(engine, "before_cursor_execute", count)
    return statistics.median(times), len(statements), result


def explain(store: SpawnStore, fn: Callable[[sa.Connection], object]) -> None:
    """Run ``fn`` once, then print the plan of each statement it ran."""
    seen: list[tuple[str, object]] = []

    def capture(_conn: object, _cursor: object, statement: str, parameters: object, *_args: object) -> None:
        seen.append((statement, parameters))

    engine = store.engine
    with store.read() as conn:
        sa.event.listen(engine, "before_cursor_execute", capture)
        try:
            fn(conn)
        finally:
            sa.event.remove(engine, "before_cursor_execute", capture)
        prefix = {"postgresql": "EXPLAIN (ANALYZE, BUFFERS) ", "mysql": "ANALYZE ", "mariadb": "ANALYZE ",
                  "sqlite": "EXPLAIN QUERY PLAN "}[engine.dialect.name]
        for statement, parameters in seen:
            print(" ".join(statement.split()))
            cursor = conn.connection.dbapi_connection.cursor()
            cursor.execute(prefix + statement, parameters)
            for row in cursor.fetchall():
                print("    " + (row[0] if len(row) == 1 else "  ".join(str(v) for v in row)))
            cursor.close()
        print()


def cli_wall_time(url: str, args: list[str], repeat: int) -> float:
    env = {**os.environ, "CELERY_SPAWN_DATABASE_URL": url}
    times = []
    for _ in range(repeat):
        begin = time.perf_counter()
        subprocess.run([sys.executable, "-m", "celery", "spawn", *args], env=env, cwd=ROOT, check=True,
                       stdout=subprocess.DEVNULL)
        times.append(time.perf_counter() - begin)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--url", default=os.environ.get("SPAWN_BENCH_URL", "sqlite:///spawn_bench.sqlite3"))
    parser.add_argument("--jobs", type=int, default=1_000_000)
    parser.add_argument("--tree-size", type=int, default=100_000)
    parser.add_argument("--fanout", type=int, default=47, help="children per node of the big tree")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--running-hours", type=float, default=RUNNING_HOURS,
                        help="operations younger than this may still run (48: any operation, most of them do)")
    parser.add_argument("--span-hours", type=float, default=SPAN_HOURS,
                        help="the small trees are created over this many hours before now (720: the 30 days of "
                             "spawn_expires, a store that keeps a month)")
    parser.add_argument("--reuse", action="store_true", help="time the store an earlier run built")
    parser.add_argument("--no-cli", action="store_true", help="skip the subprocess timings")
    parser.add_argument("--explain", action="store_true", help="print the plans of the tree and stats statements")
    options = parser.parse_args()

    store = SpawnStore(options.url)
    print(f"store: {store.safe_url} ({store.backend})")
    if not options.reuse:
        build(store, options.jobs, options.tree_size, options.fanout, options.seed, options.running_hours,
              options.span_hours)
    total = count_rows(store)
    print(f"jobs in store: {total:,}; big tree: {options.tree_size:,} nodes below {BIG_ROOT!r}")
    print()
    if options.explain:
        explain(store, lambda c: queries.spawn_tree(c, BIG_ROOT))
        explain(store, lambda c: queries.stats(c, hours=24))

    rows = []
    tree_q, tree_n, tree = timed(store, lambda c: queries.spawn_tree(c, BIG_ROOT), options.repeat)
    text_s = statistics.median(_time(lambda: render.tree_text(tree)) for _ in range(options.repeat))
    json_s = statistics.median(_time(lambda: render.tree_json(tree)) for _ in range(options.repeat))
    nodes = render.tree_summary(tree)["jobs"] if tree else 0
    rows.append((f"tree {BIG_ROOT} ({nodes:,} nodes): query", tree_q, tree_n))
    rows.append(("tree: query + render text", tree_q + text_s, tree_n))
    rows.append(("tree: query + render json", tree_q + json_s, tree_n))
    leaf = f"big-{options.tree_size - 1}"
    full_q, full_n, _ = timed(store, lambda c: queries.spawn_tree(c, leaf, full=True), options.repeat)
    rows.append((f"tree {leaf} --full: query", full_q, full_n))
    for hours in (24, 48):
        stats_q, stats_n, result = timed(store, lambda c, h=hours: queries.stats(c, hours=h), options.repeat)
        render_s = _time(lambda r=result: render.stats_text(r))
        rows.append((f"stats --hours {hours}: query + render ({result['children']:,} children)",
                     stats_q + render_s, stats_n))
    det_q, det_n, _ = timed(store, lambda c: queries.stats(c, hours=24, detailed=True), options.repeat)
    rows.append(("stats --hours 24 --detailed: query", det_q, det_n))
    list_q, list_n, _ = timed(store, lambda c: queries.list_operations(c, limit=50), options.repeat)
    rows.append(("list --limit 50: query", list_q, list_n))
    pend_q, pend_n, _ = timed(store, lambda c: queries.pending(c), options.repeat)
    rows.append(("pending: query", pend_q, pend_n))

    width = max(len(r[0]) for r in rows)
    print(f"{f'in process (median of {options.repeat})':{width}}  {'seconds':>8}  statements")
    for label, seconds, statements in rows:
        print(f"{label:{width}}  {seconds:8.3f}  {statements}")
    if not options.no_cli:
        print()
        print(f"{'celery spawn ... > /dev/null (wall, median)':{width}}  {'seconds':>8}")
        for args in (["tree", BIG_ROOT], ["tree", BIG_ROOT, "--format", "json"], ["stats", "--hours", "24"],
                     ["list"]):
            seconds = cli_wall_time(options.url, args, options.repeat)
            print(f"{'celery spawn ' + ' '.join(args):{width}}  {seconds:8.3f}")
        startup = _time(lambda: subprocess.run([sys.executable, "-m", "celery", "--help"], check=True,
                                               stdout=subprocess.DEVNULL))
        print(f"{'celery --help (import cost of any celery command)':{width}}  {startup:8.3f}")
    store.dispose()


def _time(fn: Callable[[], object]) -> float:
    begin = time.perf_counter()
    fn()
    return time.perf_counter() - begin


if __name__ == "__main__":
    main()
