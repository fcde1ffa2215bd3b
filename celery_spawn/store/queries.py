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
import operator
from collections.abc import Callable, Collection, Iterable, Iterator
from datetime import datetime
from typing import Any, TypeVar

import sqlalchemy as sa
from sqlalchemy.engine import Connection

from . import schema as s
from . import trees
from .dialects import dialect_of
from .labels import matches, resolve_operation
from .rows import (  # noqa: F401  (re-exported: the faces read these limits from here)
    _FINAL, _OP_FINISHED, _UNDISPATCHED, DEFAULT_CHILDREN_LIMIT, DEFAULT_JOBS_PER_OPERATION, DEFAULT_LIMIT,
    JOB_FIELDS, MAX_LEVELS, MAX_LIMIT, OPERATION_FIELDS, TOP_N, TREE_FIELDS, _as_utc, _bool_fields, _jobs,
    _non_negative, _num, _ops, _parse_json, _positive, _ratio, _row, _states, _utcnow, progress, seconds_value,
)
from .treerows import TreeRows
from .stats import (  # noqa: F401  (one read API)
    Durations, backlog, duration_aggregates, pending, seconds_between, stats,
)

__all__ = [
    "DEFAULT_LIMIT", "MAX_LIMIT", "MAX_LEVELS", "JOB_FIELDS", "OPERATION_FIELDS",
    "list_operations", "resolve_operation", "get_operation", "get_job", "parent", "spawn_tree", "tree_rows", "TreeRows",
    "children", "ancestors",
    "descendants", "stats", "pending", "find_kind", "progress", "backlog",
]


# ---- recursive walks ----------------------------------------------------------------------------
def _down(job_id: str, max_level: int, columns: tuple[str, ...] = ("id",), name: str = "spawn_down") -> sa.CTE:
    """The job (level 0) and its descendants down to ``max_level``, over ``ix_spawn_jobs_parent``."""
    return trees.down(_jobs.c.id == job_id, columns=columns, max_level=max_level, name=name)


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
                    state: str | Iterable[str] | None = None, since: datetime | None = None,
                    operation: str | None = None) -> list[dict]:
    """The newest spawn operations, newest first, with child counts per state and progress.

    ``queue`` is the queue the parent ran on; ``state`` one or more operation
    states; ``since`` keeps operations created at or after it; ``operation``
    keeps those a label or an operation id names (every operation with that
    label, and the one with that id). Each dict has the
    :data:`OPERATION_FIELDS`, ``counts`` (``{job state: n}``) and
    ``progress`` (``{"done", "total", "percent"}``). Two statements.
    """
    _positive("limit", limit, allow_none=False, maximum=MAX_LIMIT)
    states = _states(state, s.OPERATION_STATES, "operation")
    query = sa.select(*[_ops.c[f] for f in OPERATION_FIELDS])
    if operation is not None:
        query = query.where(matches(operation))
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
    for listed in operations:
        listed["counts"] = counts.get(listed["id"], {})
        listed["progress"] = progress(listed["counts"], listed["total"])
    return operations


def get_operation(conn: Connection, operation_id: str, *,
                  children_limit: int | None = DEFAULT_CHILDREN_LIMIT) -> dict | None:
    """One operation with its config, child counts per state, progress and children (in spawn order).

    ``children`` holds at most ``children_limit`` jobs (None: all of them);
    ``children_shown`` says how many. Three statements.
    """
    _positive("children_limit", children_limit)
    operation = operation_status(conn, operation_id, with_config=True)
    if operation is None:
        return None
    query = (sa.select(*[_jobs.c[f] for f in JOB_FIELDS]).where(_jobs.c.operation_id == operation_id)
             .order_by(_jobs.c.position, _jobs.c.id))
    if children_limit is not None:
        query = query.limit(children_limit)
    operation["children"] = [_row(r, JOB_FIELDS) for r in conn.execute(query).mappings()]
    operation["children_shown"] = len(operation["children"])
    return operation


def operation_status(conn: Connection, operation_id: str, *, with_config: bool = False) -> dict | None:
    """One operation (:data:`OPERATION_FIELDS`) with child ``counts`` per state and ``progress``, no children.

    ``with_config`` adds its ``config`` and ``on_complete`` (parsed). Two statements.
    """
    columns = [_ops.c[f] for f in OPERATION_FIELDS]
    if with_config:
        columns += [_ops.c.config, _ops.c.on_complete]
    row = conn.execute(sa.select(*columns).where(_ops.c.id == operation_id)).mappings().first()
    if row is None:
        return None
    operation = _bool_fields(_row(row, OPERATION_FIELDS))
    if with_config:
        operation["config"] = _parse_json(row["config"])
        operation["on_complete"] = _parse_json(row["on_complete"])
    rows = conn.execute(
        sa.select(_jobs.c.state, sa.func.count()).where(_jobs.c.operation_id == operation_id)
        .group_by(_jobs.c.state)
    )
    operation["counts"] = {state: int(n) for state, n in rows}
    operation["progress"] = progress(operation["counts"], operation["total"])
    return operation


def operation_child_ids(conn: Connection, operation_id: str) -> list[str]:
    """The ids of an operation's children in spawn order. One statement (index on operation, position)."""
    return list(conn.execute(
        sa.select(_jobs.c.id).where(_jobs.c.operation_id == operation_id).order_by(_jobs.c.position, _jobs.c.id)
    ).scalars())


def operations_of(conn: Connection, job_id: str) -> list[str]:
    """The ids of the operations a job spawned, oldest first. One statement (index on parent_id)."""
    return list(conn.execute(
        sa.select(_ops.c.id).where(_ops.c.parent_id == job_id).order_by(_ops.c.created_at, _ops.c.id)
    ).scalars())


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
    walk = trees.up(job_id, _levels(depth))
    query = _job_select(walk).where(walk.c.level >= 1).order_by(walk.c.level)
    return _jobs_out(conn.execute(query).mappings())


def _top(conn: Connection, job_id: str) -> str | None:
    """The topmost recorded ancestor of a job (itself for a root), or None for an unknown job."""
    walk = trees.up(job_id, MAX_LEVELS)
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


def _tuples(conn: Connection, query: sa.Select) -> Iterable[tuple]:
    """The rows of a tree's read: the driver's own tuples, or streamed rows on MySQL/MariaDB.

    For the tree's columns (text and integers) SQLAlchemy processes no value,
    so the DBAPI cursor's rows are the result; building a ``Row`` for each of
    100,000 nodes costs more than PostgreSQL's whole index range. On
    MySQL/MariaDB the rows stream (``mysql_use_result``) as SQLAlchemy rows:
    the server's index range and row lookups overlap with whatever the caller
    does with the first rows, which saves more than the rows cost. psycopg2
    would stream through a named cursor, one round trip per fetch: slower, so
    PostgreSQL and SQLite fetch everything at once.
    """
    if dialect_of(conn).streams_reads:  # Rows here: the raw cursor would miss the row SQLAlchemy prefetches
        streamed = conn.execute(query.execution_options(stream_results=True, max_row_buffer=_STREAM_ROWS))
        return itertools.chain.from_iterable(streamed.partitions(_STREAM_ROWS))
    result = conn.execute(query)
    try:
        return result.cursor.fetchall()
    finally:
        result.close()


_Gathered = TypeVar("_Gathered")


def _read_tree(conn: Connection, job_id: str, max_depth: int | None, full: bool,
               gather: Callable[[Iterable[tuple], str], tuple[_Gathered, Collection[str]]],
               ) -> tuple[str, _Gathered, dict[str, int]] | None:
    """The one read of a tree: (start, what ``gather`` made of the rows as they came, cut counts), or None.

    ``gather`` takes the rows (streamed where the driver streams) and the start,
    and returns what it built and the ids it saw.
    """
    _non_negative("max_depth", max_depth)
    start = job_id
    if full:
        found = _top(conn, job_id)
        if found is None:
            return None
        start = found
    levels = _levels(max_depth)
    top = _top_start(start)
    # No ORDER BY: sorting 100,000 rows costs the server more than sorting sibling lists in Python.
    gathered, ids = gather(_tuples(conn, sa.select(*[_jobs.c[f] for f in TREE_FIELDS]).join(
        top, sa.and_(_jobs.c.root_id == top.c.root_id, _jobs.c.depth >= top.c.depth,
                     _jobs.c.depth <= top.c.depth + levels))), start)
    via_root = bool(ids)
    if not via_root:  # not a top (or unknown): walk down parent_id
        walk = _down(start, levels, TREE_FIELDS, name="spawn_tree")
        gathered, ids = gather(_unique(_tuples(conn, sa.select(*[walk.c[f] for f in TREE_FIELDS]))), start)
    if start not in ids:
        return None
    hidden: dict[str, int] = {}
    if max_depth is not None:
        if via_root:  # the level below the cut, by the same range
            counted = (sa.select(_jobs.c.parent_id, sa.func.count())
                       .join(top, sa.and_(_jobs.c.root_id == top.c.root_id,
                                          _jobs.c.depth == top.c.depth + levels + 1))
                       .group_by(_jobs.c.parent_id))
        else:
            cut = _down(start, levels, ("id",), name="spawn_cut")
            counted = (sa.select(_jobs.c.parent_id, sa.func.count())
                       .join(cut, _jobs.c.parent_id == cut.c.id)
                       .where(cut.c.level == levels)
                       .group_by(_jobs.c.parent_id))
        hidden = {parent_id: int(count) for parent_id, count in conn.execute(counted) if parent_id in ids and count}
    return start, gathered, hidden


def _listed(rows: Iterable[tuple], _start: str) -> tuple[list[tuple], set[str]]:
    listed = list(rows)
    return listed, {row[0] for row in listed}


def _nested(rows: Iterable[tuple], start: str) -> tuple[tuple[dict | None, dict[str, dict]], dict[str, dict]]:
    with _no_gc():
        root, nodes = _nest(rows, start)
    return (root, nodes), nodes


def tree_rows(conn: Connection, job_id: str, *, max_depth: int | None = None, full: bool = False) -> TreeRows | None:
    """The rows of the spawn tree below ``job_id`` (see :func:`spawn_tree`), or None when the job is unknown.

    A renderer that walks the rows itself (``celery spawn tree``'s text) never
    pays for 100,000 nested dicts.
    """
    found = _read_tree(conn, job_id, max_depth, full, _listed)
    return None if found is None else TreeRows(*found)


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
    cycle); the rows are nested as they arrive, with no recursion.
    """
    found = _read_tree(conn, job_id, max_depth, full, _nested)
    if found is None:
        return None
    _start, (root, nodes), hidden = found
    for parent_id, count in hidden.items():
        nodes[parent_id]["hidden_children"] = count
    return root
