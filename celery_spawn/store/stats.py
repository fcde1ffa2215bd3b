"""Statistics and undispatched work over the lineage store (the read side of ``stats``, ``monitor``,
``pending``); see :mod:`.queries` for the conventions every read follows.
"""
from __future__ import annotations

from datetime import datetime, timedelta
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Connection

from . import schema as s
from .dialects import dialect_of
from .rows import (_FINAL, _OP_FINISHED, _UNDISPATCHED, DEFAULT_JOBS_PER_OPERATION, DEFAULT_LIMIT, JOB_FIELDS,
                   MAX_LIMIT, TOP_N, _as_utc, _jobs, _num, _ops, _positive, _ratio, _row, _utcnow, seconds_value)


def seconds_between(conn: Connection, start: Any, end: Any) -> sa.ColumnElement:
    """``end - start`` in seconds (float), in this connection's SQL dialect."""
    return dialect_of(conn).seconds_between(start, end)


def duration_aggregates(conn: Connection, start: Any, end: Any) -> tuple[sa.ColumnElement, ...]:
    """Aggregates ``(count, sum, max)`` of ``end - start`` in seconds, over rows with both set."""
    return dialect_of(conn).duration_aggregates(start, end)


def _count_if(condition: sa.ColumnElement) -> sa.ColumnElement:
    return sa.func.sum(sa.case((condition, 1), else_=0))


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
    task name), ``largest`` and ``slowest`` (top operations). One statement,
    four with ``detailed``. Without ``detailed`` the cost grows with the
    operations in the window and the children of those still running, not with
    all their children (see :func:`_window_query`).
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
    overall = _Tally()
    by_queue: dict[Any, _Tally] = {}
    by_handler: dict[Any, _Tally] = {}
    by_state: dict[str, int] = {}
    children = _Children()
    for row in conn.execute(_window_query(conn, window)):
        if row.child_state is not None:  # children counted one by one
            children.count({row.child_state: row.child_n}, row.child_timed, row.child_seconds,
                           row.child_max_seconds)
            continue
        for tally in (overall, by_queue.setdefault(row.queue, _Tally()), by_handler.setdefault(row.handler, _Tally())):
            tally.add(row)
        by_state[row.state] = by_state.get(row.state, 0) + int(row.n)
        children.count({state: row._mapping[column] for state, column in s.CHILD_COUNT_COLUMNS.items()},
                       row.child_timed, row.child_seconds, row.child_max_seconds)
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


def _window_query(conn: Connection, window: list) -> sa.CompoundSelect:
    """The operations in ``window`` and their children, in one statement (one snapshot), two kinds of rows.

    Operation rows (``child_state`` NULL), grouped by queue, handler and state:
    ``n``, ``children``, ``max_children``, their durations (``timed``,
    ``seconds``, ``max_seconds``), and the sums of their children's rollups (a
    count per final state, ``child_timed``, ``child_seconds``,
    ``child_max_seconds``). Child rows: ``child_state``, ``child_n`` and the
    same child durations, for the children counted one by one.

    A child is recorded in its operation's transaction with the operation's
    created_at: the children of the operations created in a window are all the
    spawned jobs created in it. Most of them are counted already: a complete
    operation carries their rollup (how many ended in each final state, how
    many have both timestamps, the sum and maximum of their durations), written
    by the worker that completed it (``Tracker._try_complete``) from the same
    aggregate as the child rows. A rollup is exact and stays so: it is written
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
    children of those still running, not with all the children; the window's
    operations are read once, for their own figures and their rollups alike.
    """
    op_timed, op_sum, op_max = duration_aggregates(conn, _ops.c.created_at, _ops.c.finished_at)
    timed, seconds, longest = duration_aggregates(conn, _jobs.c.started_at, _jobs.c.finished_at)
    operations = (
        sa.select(
            _ops.c.queue, _ops.c.handler, _ops.c.state, sa.func.count().label("n"),
            sa.func.sum(_ops.c.total).label("children"), sa.func.max(_ops.c.total).label("max_children"),
            op_timed.label("timed"), op_sum.label("seconds"), op_max.label("max_seconds"),
            *(sa.func.sum(_ops.c[column]).label(column) for column in s.CHILD_COUNT_COLUMNS.values()),
            sa.null().label("child_state"), sa.null().label("child_n"),
            sa.func.sum(_ops.c.children_timed).label("child_timed"),
            sa.func.sum(_ops.c.children_seconds).label("child_seconds"),
            sa.func.max(_ops.c.children_max_seconds).label("child_max_seconds"),
        ).where(*window).group_by(_ops.c.queue, _ops.c.handler, _ops.c.state)
    )
    counted = (
        sa.select(
            *(sa.null().label(name) for name in ("queue", "handler", "state", "n", "children", "max_children",
                                                 "timed", "seconds", "max_seconds")),
            *(sa.null().label(column) for column in s.CHILD_COUNT_COLUMNS.values()),
            _jobs.c.state.label("child_state"), sa.func.count().label("child_n"), timed.label("child_timed"),
            seconds.label("child_seconds"), longest.label("child_max_seconds"),
        ).select_from(_ops.join(_jobs, _jobs.c.operation_id == _ops.c.id))
        .where(*window, _ops.c.children_timed.is_(None)).group_by(_jobs.c.state)
    )
    return sa.union_all(operations, counted)


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
            value = seconds_value(max_seconds) or 0.0
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
    by_task: dict[str, _TaskTally] = {}
    for row in conn.execute(_by_task_query(conn, window, join, since, until)):
        by_task.setdefault(row.task_name, _TaskTally()).add_row(row)
    ranked = sorted(by_task.items(), key=lambda item: (-item[1].jobs, item[0]))[:MAX_LIMIT]
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
        "by_task": [{"task_name": name, **tally.summary()} for name, tally in ranked],
        "largest": [{k: _num(v) for k, v in r.items()} for r in largest],
        "slowest": [{**{k: _num(v) for k, v in r.items()}, "seconds": seconds_value(r["seconds"])} for r in slowest],
    }


def _by_task_query(conn: Connection, window: list, join: bool, since: datetime,
                   until: datetime) -> sa.CompoundSelect:
    """The children of the window's operations per task name: rows ``(task_name, n, succeeded, failed,
    finished, timed, seconds, max_seconds)``, possibly several per task name, to be added up.

    As in :func:`_window_query`, a complete operation's children are read
    from its per-task rollups (``spawn_task_rollups``, written with the
    operation's own rollup, in the same transaction), one index range on their
    ``created_at``; only the children of operations without a rollup are read,
    a range of their operation's jobs each. One statement, one snapshot.
    """
    r = s.task_rollups
    rolled_from: Any = r
    rolled_window = [r.c.created_at >= since, r.c.created_at <= until]
    if join:  # a queue: the operation's (its parent's) queue
        rolled_from = r.join(_ops, _ops.c.id == r.c.operation_id)
        rolled_window += window
    rolled_up = (
        sa.select(r.c.task_name, sa.func.sum(r.c.jobs).label("n"), sa.func.sum(r.c.succeeded).label("succeeded"),
                  sa.func.sum(r.c.failed).label("failed"), sa.func.sum(r.c.jobs).label("finished"),
                  sa.func.sum(r.c.timed).label("timed"), sa.func.sum(r.c.seconds).label("seconds"),
                  sa.func.max(r.c.max_seconds).label("max_seconds"))
        .select_from(rolled_from).where(*rolled_window).group_by(r.c.task_name)
    )
    timed, total, longest = duration_aggregates(conn, _jobs.c.started_at, _jobs.c.finished_at)
    counted = (
        sa.select(
            _jobs.c.task_name, sa.func.count().label("n"),
            _count_if(_jobs.c.state == s.SUCCEEDED).label("succeeded"),
            _count_if(_jobs.c.state == s.FAILED).label("failed"),
            _count_if(_jobs.c.state.in_(_FINAL)).label("finished"),
            timed.label("timed"), total.label("seconds"), longest.label("max_seconds"),
        ).select_from(_ops.join(_jobs, _jobs.c.operation_id == _ops.c.id))
        .where(*window, _ops.c.children_timed.is_(None)).group_by(_jobs.c.task_name)
    )
    return sa.union_all(rolled_up, counted)


class _TaskTally(Durations):
    """One task name's children, added up over its rollup and counted rows."""

    def __init__(self) -> None:
        super().__init__()
        self.jobs = self.succeeded = self.failed = self.finished = 0

    def add_row(self, row: Any) -> None:
        self.jobs += int(row.n or 0)
        self.succeeded += int(row.succeeded or 0)
        self.failed += int(row.failed or 0)
        self.finished += int(row.finished or 0)
        self.add(row.timed, row.seconds, row.max_seconds)

    def summary(self) -> dict:
        return {"jobs": self.jobs, "succeeded": self.succeeded, "failed": self.failed,
                "success_rate": _ratio(self.succeeded, self.finished),
                "avg_seconds": seconds_value(self.seconds / self.timed) if self.timed else None,
                "max_seconds": self.max_seconds}


# ---- undispatched work --------------------------------------------------------------------------
def pending(conn: Connection, *, queue: str | None = None, limit: int = DEFAULT_LIMIT,
            jobs_per_operation: int = DEFAULT_JOBS_PER_OPERATION) -> list[dict]:
    """Operations with children recorded but not dispatched (pending) or waiting on dependencies (held).

    Oldest waiting first, at most ``limit`` operations. ``queue`` keeps children
    bound for that queue. Each dict has ``operation_id``, ``parent_id``,
    ``handler``, ``operation_queue``, ``operation_state``, ``total``,
    ``updated_at`` (the last touch: the recovery sweep waits for it to age),
    ``pending``, ``held``, ``scheduled``, ``oldest`` (creation time of the oldest waiting
    child) and ``jobs``: up to ``jobs_per_operation`` waiting children in spawn
    order (:data:`JOB_FIELDS`). Two statements.
    """
    _positive("limit", limit, allow_none=False, maximum=MAX_LIMIT)
    _positive("jobs_per_operation", jobs_per_operation, allow_none=False, maximum=MAX_LIMIT)
    waiting: list[sa.ColumnElement[bool]] = [_jobs.c.state.in_(_UNDISPATCHED), _jobs.c.operation_id.isnot(None)]
    if queue is not None:
        waiting.append(_jobs.c.queue == queue)
    groups = (
        sa.select(
            _jobs.c.operation_id,
            _count_if(_jobs.c.state == s.PENDING).label("pending"),
            _count_if(_jobs.c.state == s.HELD).label("held"),
            _count_if(_jobs.c.state == s.SCHEDULED).label("scheduled"),
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
        "held": int(r["held"] or 0), "scheduled": int(r["scheduled"] or 0), "oldest": r["oldest"], "jobs": [],
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


#: The unfinished states :func:`backlog` counts, in their order through the state machine.
BACKLOG_STATES = (s.HELD, s.SCHEDULED, s.PENDING, s.DISPATCHED, s.STARTED)


def backlog(conn: Connection) -> dict[str, Any]:
    """What waits or runs now: ``children`` (a count per unfinished state of :data:`BACKLOG_STATES`, zeros
    included) and ``operations_running``. Two statements: one range of ``ix_spawn_jobs_state_created`` per
    state, and one of the operations' ``(state, updated_at)`` index."""
    children = dict.fromkeys(BACKLOG_STATES, 0)
    for state, count in conn.execute(
            sa.select(_jobs.c.state, sa.func.count()).where(_jobs.c.state.in_(BACKLOG_STATES))
            .group_by(_jobs.c.state)):
        children[state] = int(count)
    running = conn.execute(sa.select(sa.func.count()).select_from(_ops).where(_ops.c.state == s.OP_RUNNING))
    return {"children": children, "operations_running": int(running.scalar() or 0)}
