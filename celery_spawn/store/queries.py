"""Read queries over the lineage store, shared by ``celery spawn`` and the web API.

Every function takes a SQLAlchemy :class:`~sqlalchemy.engine.Connection`
(``SpawnStore.read()``) plus keyword arguments, and returns plain dicts and
lists. Datetimes are naive UTC :class:`~datetime.datetime` objects, as stored;
:func:`celery_spawn.render.jsonable` turns any result into JSON-ready data.

Costs: each function runs a small, fixed number of statements whatever the size
of the tree (a whole tree is one range on ``(root_id, depth)``, a subtree a
recursive CTE over the indexed ``parent_id`` column, stats aggregates over
covering indexes; docs/architecture.md has the plans), and every argument
reaches SQL as a bound parameter.
The statements are portable across SQLite, PostgreSQL and MySQL 8 / MariaDB
10.2+ (``WITH RECURSIVE``, window functions).

Invalid arguments (a negative limit, an unknown state) raise :class:`ValueError`
with a message fit to show to a user; unknown ids give ``None`` (or ``[]``).
"""
from __future__ import annotations

import contextlib
import gc
import itertools
import json
import operator
from collections.abc import Iterable, Iterator
from datetime import datetime, timedelta, timezone
from decimal import Decimal
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Connection

from ..config import HARD_MAX_DEPTH
from . import schema as s

__all__ = [
    "DEFAULT_LIMIT", "MAX_LIMIT", "MAX_LEVELS", "JOB_FIELDS", "OPERATION_FIELDS",
    "list_operations", "get_operation", "get_job", "parent", "spawn_tree", "children", "ancestors",
    "descendants", "stats", "pending", "find_kind", "progress",
]

#: Rows a listing returns unless asked otherwise, and the most it will return.
DEFAULT_LIMIT = 50
MAX_LIMIT = 10_000
#: Children shown in :func:`get_operation` unless asked otherwise.
DEFAULT_CHILDREN_LIMIT = 1_000
#: Undispatched children shown per operation in :func:`pending`.
DEFAULT_JOBS_PER_OPERATION = 20
#: Levels a recursive query follows at most: no spawn config can nest deeper, and a
#: corrupt ``parent_id`` cycle cannot make a query loop. MySQL's ``cte_max_recursion_depth``
#: and MariaDB's ``max_recursive_iterations`` both default to this value.
MAX_LEVELS = HARD_MAX_DEPTH
#: Rows of the biggest and slowest operations in detailed stats.
TOP_N = 10

#: Columns of a job as the queries return it (``message``, which holds the payload, is left out).
JOB_FIELDS = ("id", "parent_id", "root_id", "operation_id", "position", "depth", "task_name", "queue",
              "priority", "state", "pending_deps", "retries", "error", "created_at", "dispatched_at",
              "started_at", "finished_at")
#: Columns of an operation in listings (``config`` and ``on_complete`` are in :func:`get_operation`).
OPERATION_FIELDS = ("id", "parent_id", "root_id", "parent_task", "handler", "queue", "depth", "state",
                    "total", "error", "wait_for_descendants", "fail_fast", "completed", "created_at",
                    "updated_at", "finished_at")
#: Columns read for each node of :func:`spawn_tree`; a node carries all of them but ``parent_id``
#: (its place in the nesting says it), plus ``children`` and, where cut, ``hidden_children``.
TREE_FIELDS = ("id", "parent_id", "task_name", "state", "depth", "queue", "operation_id", "position")

_FINAL = tuple(sorted(s.FINAL_JOB_STATES))
_UNDISPATCHED = (s.PENDING, s.HELD)
_OP_FINISHED = tuple(state for state in s.OPERATION_STATES if state != s.OP_RUNNING)

_jobs = s.jobs
_ops = s.operations


# ---- argument checks --------------------------------------------------------------------------
def _positive(name: str, value: int | None, *, allow_none: bool = True, maximum: int | None = None) -> int | None:
    if value is None:
        if allow_none:
            return None
        raise ValueError(f"{name} is required")
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{name} must be an integer, not {type(value).__name__}")
    if value < 1:
        raise ValueError(f"{name} must be 1 or more, not {value}")
    if maximum is not None and value > maximum:
        raise ValueError(f"{name} must be at most {maximum}, not {value}")
    return value


def _non_negative(name: str, value: int | None) -> int | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{name} must be an integer, not {type(value).__name__}")
    if value < 0:
        raise ValueError(f"{name} must be 0 or more, not {value}")
    return value


def _states(value: str | Iterable[str] | None, allowed: Iterable[str], what: str) -> tuple[str, ...] | None:
    if value is None:
        return None
    states = (value,) if isinstance(value, str) else tuple(value)
    allowed = tuple(allowed)
    unknown = [v for v in states if v not in allowed]
    if unknown or not states:
        raise ValueError(f"unknown {what} state {unknown[0] if unknown else ''!r}; known: {', '.join(allowed)}")
    return states


def _as_utc(value: datetime) -> datetime:
    """Naive UTC, as stored: aware datetimes are converted, naive ones taken as UTC."""
    if value.tzinfo is not None:
        value = value.astimezone(timezone.utc).replace(tzinfo=None)
    return value


def _utcnow() -> datetime:
    return datetime.now(timezone.utc).replace(tzinfo=None)


# ---- small helpers ------------------------------------------------------------------------------
def _num(value: Any) -> Any:
    """Plain int/float from driver numbers (MySQL sums and averages are Decimal)."""
    if isinstance(value, Decimal):
        return int(value) if value == value.to_integral_value() else float(value)
    return value


def seconds_value(value: Any) -> float | None:
    """A float rounded to microseconds (durations), or None."""
    return None if value is None else round(float(value), 6)


def _ratio(part: float, whole: float) -> float | None:
    return round(part / whole, 4) if whole else None


def _row(mapping: Any, fields: Iterable[str]) -> dict:
    return {field: _num(mapping[field]) for field in fields}


def _bool_fields(row: dict) -> dict:
    for field in ("wait_for_descendants", "fail_fast", "completed"):
        if field in row and row[field] is not None:
            row[field] = bool(row[field])
    return row


def _parse_json(raw: str | None) -> Any:
    if not raw:
        return None
    try:
        return json.loads(raw)
    except ValueError:
        return raw


def progress(counts: dict[str, int], total: int | None = None) -> dict:
    """``{"done", "total", "percent"}`` from child counts per state; percent is None when total is 0."""
    done = sum(n for state, n in counts.items() if state in s.FINAL_JOB_STATES)
    total = total if total else sum(counts.values())
    return {"done": done, "total": total, "percent": round(100.0 * done / total, 1) if total else None}


def seconds_between(conn: Connection, start: Any, end: Any) -> sa.ColumnElement:
    """``end - start`` in seconds (float), in this connection's SQL dialect."""
    dialect = conn.dialect.name
    if dialect == "postgresql":
        return sa.extract("epoch", end - start)
    if dialect in ("mysql", "mariadb"):
        return sa.func.timestampdiff(sa.literal_column("MICROSECOND"), start, end) / 1000000.0
    return (sa.func.julianday(end) - sa.func.julianday(start)) * 86400.0


def duration_aggregates(conn: Connection, start: Any, end: Any) -> tuple[sa.ColumnElement, ...]:
    """Aggregates ``(count, sum, max)`` of ``end - start`` in seconds, over rows with both set.

    The per-row work is the cheapest difference each dialect has (a PostgreSQL
    interval, a MySQL integer of microseconds), computed twice, not three
    times: the count needs no arithmetic. The conversion to seconds is done
    once per group, not once per row.
    """
    dialect = conn.dialect.name
    timed = sa.func.count(sa.case((start.isnot(None), end)))  # no arithmetic to count rows with both
    if dialect == "postgresql":
        diff = end - start
        return timed, sa.extract("epoch", sa.func.sum(diff)), sa.extract("epoch", sa.func.max(diff))
    if dialect in ("mysql", "mariadb"):
        diff = sa.func.timestampdiff(sa.literal_column("MICROSECOND"), start, end)
        return timed, sa.func.sum(diff) / 1000000.0, sa.func.max(diff) / 1000000.0
    diff = (sa.func.julianday(end) - sa.func.julianday(start)) * 86400.0
    return timed, sa.func.sum(diff), sa.func.max(diff)


def _count_if(condition: sa.ColumnElement) -> sa.ColumnElement:
    return sa.func.sum(sa.case((condition, 1), else_=0))


# ---- recursive walks ----------------------------------------------------------------------------
def _down(job_id: str, max_level: int, columns: Iterable[str] = ("id",), name: str = "spawn_down") -> sa.CTE:
    """The job (level 0) and its descendants down to ``max_level``, over ``ix_spawn_jobs_parent``."""
    cols = [_jobs.c[c] for c in columns]
    anchor = sa.select(*cols, sa.literal(0, sa.Integer).label("level")).where(_jobs.c.id == job_id)
    tree = anchor.cte(name, recursive=True)
    step = (sa.select(*cols, (tree.c.level + 1).label("level"))
            .join(tree, _jobs.c.parent_id == tree.c.id)
            .where(tree.c.level < max_level))
    return tree.union_all(step)


def _up(job_id: str, max_level: int, name: str = "spawn_up") -> sa.CTE:
    """The job (level 0) and its ancestors up to ``max_level``, over the primary key."""
    anchor = sa.select(_jobs.c.id, _jobs.c.parent_id, sa.literal(0, sa.Integer).label("level")).where(
        _jobs.c.id == job_id)
    chain = anchor.cte(name, recursive=True)
    step = (sa.select(_jobs.c.id, _jobs.c.parent_id, (chain.c.level + 1).label("level"))
            .join(chain, _jobs.c.id == chain.c.parent_id)
            .where(chain.c.level < max_level))
    return chain.union_all(step)


def _levels(depth: int | None) -> int:
    return MAX_LEVELS if depth is None else min(depth, MAX_LEVELS)


def _job_select(walk: sa.CTE) -> sa.Select:
    return (sa.select(*[_jobs.c[f] for f in JOB_FIELDS], walk.c.level.label("distance"))
            .join(walk, _jobs.c.id == walk.c.id))


def _jobs_out(rows: Iterable[Any]) -> list[dict]:
    out, seen = [], set()
    for row in rows:
        if row["id"] in seen:  # only a corrupt parent cycle repeats ids
            continue
        seen.add(row["id"])
        out.append(_row(row, JOB_FIELDS + ("distance",)))
    return out


# ---- operations ---------------------------------------------------------------------------------
def list_operations(conn: Connection, *, limit: int = DEFAULT_LIMIT, queue: str | None = None,
                    state: str | Iterable[str] | None = None, since: datetime | None = None) -> list[dict]:
    """The newest spawn operations, newest first, with child counts per state and progress.

    ``queue`` is the queue the parent ran on; ``state`` one or more operation
    states; ``since`` keeps operations created at or after it. Each dict has
    the :data:`OPERATION_FIELDS`, ``counts`` (``{job state: n}``) and
    ``progress`` (``{"done", "total", "percent"}``). Two statements.
    """
    _positive("limit", limit, allow_none=False, maximum=MAX_LIMIT)
    states = _states(state, s.OPERATION_STATES, "operation")
    query = sa.select(*[_ops.c[f] for f in OPERATION_FIELDS])
    if queue is not None:
        query = query.where(_ops.c.queue == queue)
    if states is not None:
        query = query.where(_ops.c.state.in_(states))
    if since is not None:
        query = query.where(_ops.c.created_at >= _as_utc(since))
    query = query.order_by(_ops.c.created_at.desc(), _ops.c.id.desc()).limit(limit)
    operations = [_bool_fields(_row(r, OPERATION_FIELDS)) for r in conn.execute(query).mappings()]
    if not operations:
        return []
    # Counts for exactly these operations: a derived table (MySQL refuses LIMIT inside IN (...)).
    chosen = query.with_only_columns(_ops.c.id).subquery("chosen")
    counts: dict[str, dict[str, int]] = {}
    rows = conn.execute(
        sa.select(_jobs.c.operation_id, _jobs.c.state, sa.func.count())
        .join(chosen, _jobs.c.operation_id == chosen.c.id)
        .group_by(_jobs.c.operation_id, _jobs.c.state)
    )
    for operation_id, job_state, count in rows:
        counts.setdefault(operation_id, {})[job_state] = int(count)
    for operation in operations:
        operation["counts"] = counts.get(operation["id"], {})
        operation["progress"] = progress(operation["counts"], operation["total"])
    return operations


def get_operation(conn: Connection, operation_id: str, *,
                  children_limit: int | None = DEFAULT_CHILDREN_LIMIT) -> dict | None:
    """One operation with its config, child counts per state, progress and children (in spawn order).

    ``children`` holds at most ``children_limit`` jobs (None: all of them);
    ``children_shown`` says how many. Three statements.
    """
    _positive("children_limit", children_limit)
    row = conn.execute(
        sa.select(*[_ops.c[f] for f in OPERATION_FIELDS], _ops.c.config, _ops.c.on_complete)
        .where(_ops.c.id == operation_id)
    ).mappings().first()
    if row is None:
        return None
    operation = _bool_fields(_row(row, OPERATION_FIELDS))
    operation["config"] = _parse_json(row["config"])
    operation["on_complete"] = _parse_json(row["on_complete"])
    rows = conn.execute(
        sa.select(_jobs.c.state, sa.func.count()).where(_jobs.c.operation_id == operation_id)
        .group_by(_jobs.c.state)
    )
    operation["counts"] = {state: int(n) for state, n in rows}
    operation["progress"] = progress(operation["counts"], operation["total"])
    query = (sa.select(*[_jobs.c[f] for f in JOB_FIELDS]).where(_jobs.c.operation_id == operation_id)
             .order_by(_jobs.c.position, _jobs.c.id))
    if children_limit is not None:
        query = query.limit(children_limit)
    operation["children"] = [_row(r, JOB_FIELDS) for r in conn.execute(query).mappings()]
    operation["children_shown"] = len(operation["children"])
    return operation


# ---- jobs ---------------------------------------------------------------------------------------
def get_job(conn: Connection, job_id: str) -> dict | None:
    """One job (:data:`JOB_FIELDS`) with ``children_count``, the ``operations`` it spawned
    (``id``, ``state``, ``total``, ``created_at``) and its ``depends_on`` edges
    (``id``, ``satisfied``, ``ignore_failure``). Four statements.
    """
    row = conn.execute(sa.select(*[_jobs.c[f] for f in JOB_FIELDS]).where(_jobs.c.id == job_id)).mappings().first()
    if row is None:
        return None
    job = _row(row, JOB_FIELDS)
    job["children_count"] = int(conn.execute(
        sa.select(sa.func.count()).select_from(_jobs).where(_jobs.c.parent_id == job_id)).scalar() or 0)
    job["operations"] = [
        {"id": r.id, "state": r.state, "total": r.total, "created_at": r.created_at}
        for r in conn.execute(
            sa.select(_ops.c.id, _ops.c.state, _ops.c.total, _ops.c.created_at)
            .where(_ops.c.parent_id == job_id).order_by(_ops.c.created_at, _ops.c.id))
    ]
    job["depends_on"] = [
        {"id": r.depends_on_id, "satisfied": bool(r.satisfied), "ignore_failure": bool(r.ignore_failure)}
        for r in conn.execute(
            sa.select(s.dependencies.c.depends_on_id, s.dependencies.c.satisfied, s.dependencies.c.ignore_failure)
            .where(s.dependencies.c.job_id == job_id).order_by(s.dependencies.c.depends_on_id))
    ]
    return job


def parent(conn: Connection, job_id: str) -> dict | None:
    """The parent of a job (:data:`JOB_FIELDS`), or None for a root or an unknown job. One statement."""
    child = _jobs.alias("child")
    row = conn.execute(
        sa.select(*[_jobs.c[f] for f in JOB_FIELDS]).join(child, child.c.parent_id == _jobs.c.id)
        .where(child.c.id == job_id)
    ).mappings().first()
    return _row(row, JOB_FIELDS) if row else None


def find_kind(conn: Connection, some_id: str) -> str | None:
    """``"job"``, ``"operation"`` or None: what an id names in the store. At most two statements."""
    if conn.execute(sa.select(_jobs.c.id).where(_jobs.c.id == some_id)).first() is not None:
        return "job"
    if conn.execute(sa.select(_ops.c.id).where(_ops.c.id == some_id)).first() is not None:
        return "operation"
    return None


def children(conn: Connection, job_id: str, *, state: str | Iterable[str] | None = None,
             depth: int = 1, limit: int | None = None) -> list[dict]:
    """Jobs below ``job_id`` down to ``depth`` levels (1: direct children), nearest first.

    ``state`` keeps jobs in one or more job states. Each dict has the
    :data:`JOB_FIELDS` and ``distance`` (1 for a child). One statement.
    """
    _positive("depth", depth, allow_none=False)
    _positive("limit", limit)
    states = _states(state, s.JOB_STATES, "job")
    walk = _down(job_id, _levels(depth))
    query = _job_select(walk).where(walk.c.level >= 1)
    if states is not None:
        query = query.where(_jobs.c.state.in_(states))
    query = query.order_by(walk.c.level, _jobs.c.position, _jobs.c.id)
    if limit is not None:
        query = query.limit(limit)
    return _jobs_out(conn.execute(query).mappings())


def descendants(conn: Connection, job_id: str, *, depth: int | None = None,
                limit: int | None = None) -> list[dict]:
    """Every job below ``job_id`` (down to ``depth`` levels; None: all), nearest first. One statement."""
    _positive("depth", depth)
    return children(conn, job_id, depth=_levels(depth), limit=limit)


def ancestors(conn: Connection, job_id: str, *, depth: int | None = None) -> list[dict]:
    """The parent chain of ``job_id``: its parent first, the root last, at most ``depth`` of them.

    Each dict has the :data:`JOB_FIELDS` and ``distance`` (1 for the parent). One statement.
    """
    _positive("depth", depth)
    walk = _up(job_id, _levels(depth))
    query = _job_select(walk).where(walk.c.level >= 1).order_by(walk.c.level)
    return _jobs_out(conn.execute(query).mappings())


def _top(conn: Connection, job_id: str) -> str | None:
    """The topmost recorded ancestor of a job (itself for a root), or None for an unknown job."""
    walk = _up(job_id, MAX_LEVELS)
    return conn.execute(sa.select(walk.c.id).order_by(walk.c.level.desc()).limit(1)).scalar()


#: Spawn order of siblings (``position`` is NOT NULL; the id breaks ties between operations).
_SPAWN_ORDER = operator.itemgetter("position", "id")


def _unique(rows: Iterable[Any]) -> Iterator[Any]:
    """Rows with a repeated id dropped (only a corrupt ``parent_id`` cycle through the start repeats one)."""
    seen: set = set()
    for row in rows:
        if row[0] not in seen:
            seen.add(row[0])
            yield row


def _nest(rows: Iterable[Any], start: str) -> tuple[dict | None, dict[str, dict]]:
    """Tree nodes from :data:`TREE_FIELDS` rows (unique ids), children in spawn order: (start node, nodes by id).

    One pass makes each node and hands it to its parent. Rows come in no set
    order (asking the server for one costs it a sort of the whole tree), but a
    parent is recorded before its children, so it nearly always comes first:
    a child whose parent has not come (yet) waits in ``early`` and joins at the
    end. Sibling lists are sorted only where a child came out of spawn order.
    The start is nobody's child (only a corrupt ``parent_id`` cycle gives it a
    parent here). A row whose parent is not among the rows stays detached (a
    root range may hold other recorded trees of the same Celery workflow).
    """
    nodes: dict[str, dict] = {}
    early: dict[Any, list[dict]] = {}
    unsorted: set = set()
    for job, parent_id, task_name, state, depth, queue, operation_id, position in rows:
        node = {"id": job, "task_name": task_name, "state": state, "depth": depth, "queue": queue,
                "operation_id": operation_id, "position": position, "children": []}
        above = nodes.get(parent_id)
        if above is not None and job != start:
            kids = above["children"]
            if kids and kids[-1]["position"] >= position:
                unsorted.add(parent_id)
            kids.append(node)
        elif job != start:
            early.setdefault(parent_id, []).append(node)
        nodes[job] = node
    for parent_id, kids in early.items():
        above = nodes.get(parent_id)
        if above is not None:
            above["children"].extend(kids)
            unsorted.add(parent_id)
    for parent_id in unsorted:
        nodes[parent_id]["children"].sort(key=_SPAWN_ORDER)
    return nodes.get(start), nodes


@contextlib.contextmanager
def _no_gc() -> Iterator[None]:
    """Pause the cyclic GC while building many small dicts (it would rescan them again and again)."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


def _top_start(start: str) -> sa.Subquery:
    """``root_id`` and ``depth`` of ``start`` if it tops its recorded tree (no recorded parent), else no row."""
    me, above = _jobs.alias("tree_start"), _jobs.alias("tree_above")
    is_top = sa.or_(me.c.parent_id.is_(None), ~sa.exists().where(above.c.id == me.c.parent_id))
    return sa.select(me.c.root_id, me.c.depth).where(me.c.id == start, is_top).subquery("tree_top")


#: Rows per fetch when a tree streams from MySQL/MariaDB.
_STREAM_ROWS = 1_000


def _rows(conn: Connection, query: sa.Select) -> Iterable[Any]:
    """All rows of ``query``; on MySQL/MariaDB streamed, so the server sends while Python nests.

    mysqlclient otherwise receives and converts every row before the first one
    is used; streamed (``mysql_use_result``), the server's index range and
    row lookups overlap with the nesting here. psycopg2 would stream through a
    named cursor, one round trip per fetch: slower, so PostgreSQL and SQLite
    fetch everything at once.
    """
    if conn.dialect.name in ("mysql", "mariadb"):
        result = conn.execute(query.execution_options(stream_results=True, max_row_buffer=_STREAM_ROWS))
        return itertools.chain.from_iterable(result.partitions(_STREAM_ROWS))
    return conn.execute(query).all()


def spawn_tree(conn: Connection, job_id: str, *, max_depth: int | None = None, full: bool = False) -> dict | None:
    """The spawn tree below ``job_id`` as nested dicts, or None when the job is unknown.

    Each node has :data:`TREE_FIELDS` but ``parent_id`` (``depth`` is the job's
    depth from its root), ``children`` (in spawn order) and, for a node at
    ``max_depth`` levels below the start whose children are cut off,
    ``hidden_children`` (their count). ``full`` starts from the topmost recorded
    ancestor instead.

    Every job carries its tree's ``root_id`` and its ``depth`` (a child gets its
    parent's root and depth + 1 when it is recorded), so the tree of a top job
    (one without a recorded parent: what ``full`` and the usual ``tree ROOT``
    ask for) is one range scan of ``ix_spawn_jobs_root_depth``, whatever the
    size of the table; rows of other trees of the same Celery workflow are left
    detached when nesting. Below a top, the tree is a recursive walk over
    ``parent_id``. At most three statements (four for ``full`` below a corrupt
    cycle); the rows are nested here, with no recursion.
    """
    _non_negative("max_depth", max_depth)
    start = job_id
    if full:
        start = _top(conn, job_id)
        if start is None:
            return None
    levels = _levels(max_depth)
    fields = [_jobs.c[f] for f in TREE_FIELDS]
    top = _top_start(start)
    by_root = (sa.select(*fields)
               .join(top, sa.and_(_jobs.c.root_id == top.c.root_id, _jobs.c.depth >= top.c.depth,
                                  _jobs.c.depth <= top.c.depth + levels)))
    # No ORDER BY: sorting 100,000 rows costs the server more than sorting sibling lists here.
    with _no_gc():
        root, nodes = _nest(_rows(conn, by_root), start)
        via_root = bool(nodes)
        if not via_root:  # not a top (or unknown): walk down parent_id
            walk = _down(start, levels, TREE_FIELDS, name="spawn_tree")
            root, nodes = _nest(_unique(conn.execute(sa.select(*[walk.c[f] for f in TREE_FIELDS]))), start)
    if root is None:
        return None
    if max_depth is not None:
        if via_root:  # the level below the cut, by the same range
            hidden = (sa.select(_jobs.c.parent_id, sa.func.count())
                      .join(top, sa.and_(_jobs.c.root_id == top.c.root_id, _jobs.c.depth == top.c.depth + levels + 1))
                      .group_by(_jobs.c.parent_id))
        else:
            cut = _down(start, levels, ("id",), name="spawn_cut")
            hidden = (sa.select(_jobs.c.parent_id, sa.func.count())
                      .join(cut, _jobs.c.parent_id == cut.c.id)
                      .where(cut.c.level == levels)
                      .group_by(_jobs.c.parent_id))
        for parent_id, count in conn.execute(hidden):
            if parent_id in nodes and count:
                nodes[parent_id]["hidden_children"] = int(count)
    return root


# ---- statistics ---------------------------------------------------------------------------------
def stats(conn: Connection, *, hours: float = 24, queue: str | None = None, detailed: bool = False,
          now: datetime | None = None) -> dict:
    """Spawn statistics over the operations created in the last ``hours``.

    ``queue`` keeps operations whose parent ran on that queue. The result has
    ``operations`` (count), ``operations_by_state``, ``children`` (their total),
    ``children_by_state``, ``avg_children_per_spawn``, ``max_children_per_spawn``,
    ``success_rate`` (succeeded / finished operations), ``child_success_rate``
    (succeeded / finished children), ``durations`` (seconds: operations from
    creation to completion, children from start to finish), ``by_queue`` and
    ``by_handler`` (lists of dicts). ``detailed`` adds ``by_task`` (children per
    task name), ``largest`` and ``slowest`` (top operations). Two statements,
    five with ``detailed``. Without ``detailed`` the cost grows with the
    operations in the window and the children of those still running, not with
    all their children (see :func:`_children_query`).
    """
    if isinstance(hours, bool) or not isinstance(hours, (int, float)) or not hours > 0:
        raise ValueError(f"hours must be a number above 0, not {hours!r}")
    if hours > 24 * 366 * 100:
        raise ValueError(f"hours must be at most {24 * 366 * 100}, not {hours!r}")
    until = _as_utc(now) if now is not None else _utcnow()
    since = until - timedelta(hours=hours)

    window = [_ops.c.created_at >= since, _ops.c.created_at <= until]
    if queue is not None:
        window.append(_ops.c.queue == queue)

    op_seconds = seconds_between(conn, _ops.c.created_at, _ops.c.finished_at)
    op_timed, op_sum, op_max = duration_aggregates(conn, _ops.c.created_at, _ops.c.finished_at)
    grouped = conn.execute(
        sa.select(
            _ops.c.queue, _ops.c.handler, _ops.c.state,
            sa.func.count().label("n"),
            sa.func.sum(_ops.c.total).label("children"),
            sa.func.max(_ops.c.total).label("max_children"),
            op_timed.label("timed"), op_sum.label("seconds"), op_max.label("max_seconds"),
        ).where(*window).group_by(_ops.c.queue, _ops.c.handler, _ops.c.state)
    ).all()

    overall = _Tally()
    by_queue: dict[Any, _Tally] = {}
    by_handler: dict[Any, _Tally] = {}
    by_state: dict[str, int] = {}
    for row in grouped:
        for tally in (overall, by_queue.setdefault(row.queue, _Tally()), by_handler.setdefault(row.handler, _Tally())):
            tally.add(row)
        by_state[row.state] = by_state.get(row.state, 0) + int(row.n)

    children = _Children()
    for row in conn.execute(_children_query(conn, window)):
        if row.state is not None:
            children.count({row.state: row.n}, row.timed, row.seconds, row.max_seconds)
        else:
            children.count({state: row._mapping[column] for state, column in s.CHILD_COUNT_COLUMNS.items()},
                           row.timed, row.seconds, row.max_seconds)
    children_by_state = children.by_state
    finished_children = sum(n for state, n in children_by_state.items() if state in s.FINAL_JOB_STATES)

    result: dict[str, Any] = {
        "window": {"hours": hours, "since": since, "until": until},
        "queue": queue,
        **overall.summary(),
        "operations_by_state": dict(sorted(by_state.items())),
        "children_by_state": dict(sorted(children_by_state.items())),
        "child_success_rate": _ratio(children_by_state.get(s.SUCCEEDED, 0), finished_children),
        "by_queue": [{"queue": key, **tally.summary()} for key, tally in _sorted(by_queue)],
        "by_handler": [{"handler": key, **tally.summary()} for key, tally in _sorted(by_handler)],
    }
    result["durations"] = {
        "operation_avg_seconds": result.pop("avg_seconds"),
        "operation_max_seconds": result.pop("max_seconds"),
        "child_avg_seconds": children.average,
        "child_max_seconds": children.max_seconds,
    }
    for group in result["by_queue"] + result["by_handler"]:
        group["avg_duration_seconds"] = group.pop("avg_seconds")
        group["max_duration_seconds"] = group.pop("max_seconds")
    if detailed:
        result.update(_detailed_stats(conn, window, queue is not None, since, until, op_seconds))
    return result


def _children_query(conn: Connection, window: list) -> sa.CompoundSelect:
    """The children of the operations in ``window``: rows ``(state, n, <a count per final state>, timed,
    seconds, max_seconds)``, per state for the children counted, one with ``state`` NULL for the rollups.

    A child is recorded in its operation's transaction with the operation's
    created_at: the children of the operations created in a window are all the
    spawned jobs created in it. Most of them are counted already: a complete
    operation carries their rollup (how many ended in each final state, how
    many have both timestamps, the sum and maximum of their durations), written
    by the worker that completed it (``Tracker._try_complete``) from the same
    aggregate as the first branch. A rollup is exact and stays so: it is written
    only when every child is final, and a final job never changes again, since
    every UPDATE of a job's state or times is guarded by a non-final (or a
    precise earlier) state: finishes, starts and retries, cancel and fail_fast,
    dependency cascades, publishing marks, redelivery, reconciling from the
    result backend, the store-only cancel of the web API. The one exception,
    spawning again over a failed operation, deletes its jobs together with the
    operation's row and rollup. The children of operations without a rollup
    (running, or completed without one: by a store-only cancel, or before
    rollups existed) are counted: one range of ``ix_spawn_jobs_operation_state``
    per operation. So the cost grows with the operations in the window and the
    children of those still running, not with all the children.

    Both branches are one statement, so they see the same snapshot: an operation
    that completes meanwhile is counted once, from its rollup or from its children.
    """
    timed, seconds, longest = duration_aggregates(conn, _jobs.c.started_at, _jobs.c.finished_at)
    counted = (
        sa.select(_jobs.c.state, sa.func.count().label("n"),
                  *(sa.null().label(column) for column in s.CHILD_COUNT_COLUMNS.values()),
                  timed.label("timed"), seconds.label("seconds"), longest.label("max_seconds"))
        .select_from(_ops.join(_jobs, _jobs.c.operation_id == _ops.c.id))
        .where(*window, _ops.c.children_timed.is_(None)).group_by(_jobs.c.state)
    )
    rolled_up = (
        sa.select(sa.null().label("state"), sa.null().label("n"),
                  *(sa.func.sum(_ops.c[column]).label(column) for column in s.CHILD_COUNT_COLUMNS.values()),
                  sa.func.sum(_ops.c.children_timed).label("timed"),
                  sa.func.sum(_ops.c.children_seconds).label("seconds"),
                  sa.func.max(_ops.c.children_max_seconds).label("max_seconds"))
        .where(*window, _ops.c.children_timed.isnot(None))
    )
    return sa.union_all(counted, rolled_up)


class Durations:
    """The count, sum and maximum of durations in seconds, added up over aggregate rows."""

    def __init__(self) -> None:
        self.timed = 0
        self.seconds = 0.0
        self.max_seconds: float | None = None

    def add(self, timed: Any, seconds: Any, max_seconds: Any) -> None:
        self.timed += int(timed or 0)
        self.seconds += seconds_value(seconds) or 0.0
        if max_seconds is not None:
            value = seconds_value(max_seconds)
            self.max_seconds = value if self.max_seconds is None else max(self.max_seconds, value)

    @property
    def average(self) -> float | None:
        return round(self.seconds / self.timed, 6) if self.timed else None


class _Children(Durations):
    """Children per state and their durations, summed from rollups and from counted children."""

    def __init__(self) -> None:
        super().__init__()
        self.by_state: dict[str, int] = {}

    def count(self, by_state: dict[str, Any], timed: Any, seconds: Any, max_seconds: Any) -> None:
        for state, n in by_state.items():
            if n:
                self.by_state[state] = self.by_state.get(state, 0) + int(n)
        self.add(timed, seconds, max_seconds)


class _Tally:
    """Sums of the grouped operation rows for one bucket (all, a queue, a handler)."""

    def __init__(self) -> None:
        self.operations = self.children = self.finished = self.succeeded = 0
        self.max_children: int | None = None
        self.durations = Durations()

    def add(self, row: Any) -> None:
        n = int(row.n)
        self.operations += n
        self.children += int(row.children or 0)
        if row.max_children is not None:
            self.max_children = max(self.max_children or 0, int(row.max_children))
        if row.state in _OP_FINISHED:
            self.finished += n
        if row.state == s.OP_SUCCEEDED:
            self.succeeded += n
        self.durations.add(row.timed, row.seconds, row.max_seconds)

    def summary(self) -> dict:
        return {
            "operations": self.operations,
            "children": self.children,
            "avg_children_per_spawn": round(self.children / self.operations, 2) if self.operations else None,
            "max_children_per_spawn": self.max_children,
            "success_rate": _ratio(self.succeeded, self.finished),
            "avg_seconds": self.durations.average,
            "max_seconds": self.durations.max_seconds,
        }


def _sorted(buckets: dict[Any, _Tally]) -> list[tuple[Any, _Tally]]:
    return sorted(buckets.items(), key=lambda item: (-item[1].operations, str(item[0])))


def _detailed_stats(conn: Connection, window: list, join: bool, since: datetime, until: datetime,
                   op_seconds: Any) -> dict:
    # Children per task: the spawned jobs created in the window (the children of its operations, see
    # _children_query), one range of ix_spawn_jobs_state_created (state, created_at, operation_id) and a
    # row read per child for its task name and times; the IN list of every state makes that range usable
    # by MySQL/MariaDB and PostgreSQL alike. With a queue (the operation's: the parent's) the jobs are
    # joined to their operations.
    job_window = [_jobs.c.state.in_(s.JOB_STATES), _jobs.c.created_at >= since, _jobs.c.created_at <= until,
                  _jobs.c.operation_id.isnot(None)]
    job_from: Any = _jobs
    if join:
        job_from = _jobs.join(_ops, _jobs.c.operation_id == _ops.c.id)
        job_window += window
    timed, total, longest = duration_aggregates(conn, _jobs.c.started_at, _jobs.c.finished_at)
    by_task = conn.execute(
        sa.select(
            _jobs.c.task_name, sa.func.count().label("n"),
            _count_if(_jobs.c.state == s.SUCCEEDED).label("succeeded"),
            _count_if(_jobs.c.state == s.FAILED).label("failed"),
            _count_if(_jobs.c.state.in_(_FINAL)).label("finished"),
            timed.label("timed"), total.label("seconds"), longest.label("max_seconds"),
        ).select_from(job_from)
        .where(*job_window).group_by(_jobs.c.task_name)
        .order_by(sa.func.count().desc(), _jobs.c.task_name).limit(MAX_LIMIT)
    ).all()
    summary_cols = [_ops.c.id, _ops.c.parent_id, _ops.c.handler, _ops.c.queue, _ops.c.state, _ops.c.total,
                    _ops.c.created_at, _ops.c.finished_at]
    largest = conn.execute(
        sa.select(*summary_cols).where(*window).order_by(_ops.c.total.desc(), _ops.c.id).limit(TOP_N)
    ).mappings().all()
    slowest = conn.execute(
        sa.select(*summary_cols, op_seconds.label("seconds")).where(*window, _ops.c.finished_at.isnot(None))
        .order_by(op_seconds.desc(), _ops.c.id).limit(TOP_N)
    ).mappings().all()
    return {
        "by_task": [{
            "task_name": r.task_name, "jobs": int(r.n), "succeeded": int(r.succeeded or 0),
            "failed": int(r.failed or 0), "success_rate": _ratio(int(r.succeeded or 0), int(r.finished or 0)),
            "avg_seconds": seconds_value(float(r.seconds) / int(r.timed)) if r.timed else None,
            "max_seconds": seconds_value(r.max_seconds),
        } for r in by_task],
        "largest": [{k: _num(v) for k, v in r.items()} for r in largest],
        "slowest": [{**{k: _num(v) for k, v in r.items()}, "seconds": seconds_value(r["seconds"])} for r in slowest],
    }


# ---- undispatched work --------------------------------------------------------------------------
def pending(conn: Connection, *, queue: str | None = None, limit: int = DEFAULT_LIMIT,
            jobs_per_operation: int = DEFAULT_JOBS_PER_OPERATION) -> list[dict]:
    """Operations with children recorded but not dispatched (pending) or waiting on dependencies (held).

    Oldest waiting first, at most ``limit`` operations. ``queue`` keeps children
    bound for that queue. Each dict has ``operation_id``, ``parent_id``,
    ``handler``, ``operation_queue``, ``operation_state``, ``total``,
    ``updated_at`` (the last touch: the recovery sweep waits for it to age),
    ``pending``, ``held``, ``oldest`` (creation time of the oldest waiting
    child) and ``jobs``: up to ``jobs_per_operation`` waiting children in spawn
    order (:data:`JOB_FIELDS`). Two statements.
    """
    _positive("limit", limit, allow_none=False, maximum=MAX_LIMIT)
    _positive("jobs_per_operation", jobs_per_operation, allow_none=False, maximum=MAX_LIMIT)
    waiting = [_jobs.c.state.in_(_UNDISPATCHED), _jobs.c.operation_id.isnot(None)]
    if queue is not None:
        waiting.append(_jobs.c.queue == queue)
    groups = (
        sa.select(
            _jobs.c.operation_id,
            _count_if(_jobs.c.state == s.PENDING).label("pending"),
            _count_if(_jobs.c.state == s.HELD).label("held"),
            sa.func.min(_jobs.c.created_at).label("oldest"),
        ).where(*waiting).group_by(_jobs.c.operation_id)
        .order_by(sa.func.min(_jobs.c.created_at), _jobs.c.operation_id).limit(limit)
    ).subquery("waiting")
    rows = conn.execute(
        sa.select(groups, _ops.c.parent_id, _ops.c.handler, _ops.c.queue.label("operation_queue"),
                  _ops.c.state.label("operation_state"), _ops.c.total, _ops.c.updated_at)
        .select_from(groups.outerjoin(_ops, _ops.c.id == groups.c.operation_id))
        .order_by(groups.c.oldest, groups.c.operation_id)
    ).mappings().all()
    if not rows:
        return []
    result = [{
        "operation_id": r["operation_id"], "parent_id": r["parent_id"], "handler": r["handler"],
        "operation_queue": r["operation_queue"], "operation_state": r["operation_state"],
        "total": _num(r["total"]), "updated_at": r["updated_at"], "pending": int(r["pending"] or 0),
        "held": int(r["held"] or 0), "oldest": r["oldest"], "jobs": [],
    } for r in rows]
    by_id = {entry["operation_id"]: entry for entry in result}
    # The first waiting children of those operations, numbered per operation by a window function.
    rank = sa.func.row_number().over(partition_by=_jobs.c.operation_id,
                                     order_by=(_jobs.c.position, _jobs.c.id)).label("rank")
    ranked = (sa.select(*[_jobs.c[f] for f in JOB_FIELDS], rank)
              .join(groups, _jobs.c.operation_id == groups.c.operation_id)
              .where(*waiting)).subquery("ranked")
    for row in conn.execute(
        sa.select(*[ranked.c[f] for f in JOB_FIELDS]).where(ranked.c.rank <= jobs_per_operation)
        .order_by(ranked.c.operation_id, ranked.c.position, ranked.c.id)
    ).mappings():
        by_id[row["operation_id"]]["jobs"].append(_row(row, JOB_FIELDS))
    return result
