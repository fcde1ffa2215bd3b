"""The reading commands: ``list``, ``tree``, ``stats``, ``monitor``, ``lineage``, ``pending``."""
from __future__ import annotations

import functools
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import click
from celery.bin.base import CeleryCommand

from ..options import (
    CONNECT_TIMEOUT,
    JOB_ID,
    LIST_FORMATS,
    MONITOR_HOURS,
    RECENT_HOURS,
    TREE_FORMATS,
    DEFAULT_LIMIT,
    RET_OK,
    FiniteFloatRange,
    emit,
    fail_not_found,
    format_option,
    limit_option,
    note_label,
    open_store,
    queue_option,
    resolve_database_url,
    store_options,
    usage_errors,
    use_colour,
)
from ..protocol import OPERATION_STATES
from .group import spawn

if TYPE_CHECKING:
    from ..store import SpawnStore


@spawn.command(name="list", cls=CeleryCommand)
@click.option("--recent", is_flag=True, help=f"Only operations created in the last {RECENT_HOURS} hours.")
@limit_option(DEFAULT_LIMIT, "Operations to show, newest first.")
@queue_option("Only operations whose parent ran on this queue.")
@click.option("--state", "-s", type=click.Choice(OPERATION_STATES), default=None,
              help="Only operations in this state.")
@click.option("--operation", "-o", "operation", default=None, metavar="LABEL",
              help="Only the operations with this label (every parent's spawn that gave it as its operation_id), "
                   "or with this operation id.")
@click.option("--detailed", "-d", is_flag=True, help="Show counts per state, timing and errors.")
@format_option(LIST_FORMATS)
@store_options
@click.pass_context
@usage_errors
def list_command(ctx: click.Context, recent: bool, limit: int, queue: str | None, state: str | None,
                 operation: str | None, detailed: bool, fmt: str, database_url: str | None) -> None:
    """Spawn operations: parent, handler, state and progress.

    A LABEL column appears when an operation shown has a label.
    """
    from datetime import timedelta

    from .. import render
    from ..store import queries, utcnow

    with open_store(ctx, database_url) as store, store.read() as conn:
        # taken once connected: on the database server's clock, as the stored times are
        since = utcnow() - timedelta(hours=RECENT_HOURS) if recent else None
        operations = queries.list_operations(conn, limit=limit, queue=queue, state=state, since=since,
                                             operation=operation)
    if fmt == "json":
        emit(ctx, render.to_json(operations))
    else:
        emit(ctx, render.operations_text(operations, detailed=detailed, color=use_colour(ctx)))


@spawn.command(cls=CeleryCommand)
@click.argument("job_id", type=JOB_ID)
@format_option(TREE_FORMATS)
@click.option("--max-depth", "-m", type=click.IntRange(min=0, max=1000), default=None,
              help="Levels to show below the job (0: the job alone).")
@click.option("--full", is_flag=True, help="Start from the root of the job's tree.")
@click.option("--children-only", "-c", is_flag=True, help="Only the job's direct children, in spawn order.")
@store_options
@click.pass_context
@usage_errors
def tree(ctx: click.Context, job_id: str, fmt: str, max_depth: int | None, full: bool, children_only: bool,
         database_url: str | None) -> None:
    """The spawn tree below JOB_ID.

    JOB_ID may also be a label (the operation_id a spawn config gave): the
    tree below the parent job of the newest operation with that label. With
    --full, the whole tree the job belongs to, from its root, with the job
    marked ◀.
    """
    from .. import render

    # Text and JSON read flat rows and write them as they are walked: no nested dicts for 100,000 nodes.
    flat = fmt in ("text", "json") and not children_only

    def read(conn: Any, job: str) -> tuple[Any, list]:
        from ..store import queries

        if flat:
            return queries.tree_rows(conn, job, max_depth=max_depth, full=full), []
        if not children_only:
            return queries.spawn_tree(conn, job, max_depth=max_depth, full=full), []
        start = job
        if full:
            found = queries.spawn_tree(conn, job, max_depth=0, full=True)
            start = found["id"] if found else job
        data = queries.spawn_tree(conn, start, max_depth=1)
        return data, queries.children(conn, start) if data is not None and fmt in ("text", "json") else []

    shown, labelled, kind = job_id, None, None
    rows: list = []
    data = _direct_tree(ctx, database_url, job_id, max_depth) if flat and not full else None
    if data is None:
        data, rows, shown, labelled, kind = _store_tree(ctx, database_url, job_id, read)
    if data is None:
        hint = (" (that is an operation id: `celery spawn list` shows its parent job)"
                if kind == "operation" else "")
        fail_not_found("job", job_id, hint)
    if labelled is not None:
        note_label(job_id, labelled[0]["id"], labelled[1])
    color = use_colour(ctx)
    if flat:
        chunks = (render.tree_json_chunks(data.rows, data.start, data.hidden) if fmt == "json" else
                  render.tree_text_chunks(data.rows, data.start, data.hidden, color=color,
                                          highlight=shown if full else None))
        for chunk in chunks:
            click.echo(chunk, nl=False, color=color)
    elif children_only and fmt == "json":
        emit(ctx, render.to_json(rows))
    elif children_only and fmt == "text":
        emit(ctx, render.jobs_text(rows, color=color))
    else:
        emit(ctx, render.render_tree(data, fmt, color=color, highlight=shown if full else None))


def _direct_tree(ctx: click.Context, database_url: str | None, job_id: str, max_depth: int | None) -> Any:
    """The tree's rows read without SQLAlchemy where the store's URL allows it (see ``store.direct``), or None."""
    from ..store import direct
    from ..store.timeouts import Timeouts

    url, engine_options = resolve_database_url(ctx, database_url)
    if engine_options:  # options the driver must see: the store applies them
        return None
    return direct.read_tree(url, job_id, max_depth=max_depth, timeouts=Timeouts(connect=CONNECT_TIMEOUT))


def _store_tree(ctx: click.Context, database_url: str | None, job_id: str,
                read: Callable[[Any, str], tuple[Any, list]]) -> tuple[Any, list, str, Any, str | None]:
    """The tree read through the store, the job id taken as a label too: (data, rows, shown, labelled, kind)."""
    from ..store import queries

    shown, labelled = job_id, None
    with open_store(ctx, database_url) as store, store.read() as conn:
        data, rows = read(conn, job_id)
        if data is None:
            operation, others = queries.resolve_operation(conn, job_id)
            if operation is not None and operation["label"] == job_id:
                labelled, shown = (operation, others), operation["parent_id"]
                data, rows = read(conn, shown)
        kind = None if data is not None else queries.find_kind(conn, job_id)
    return data, rows, shown, labelled, kind


@spawn.command(cls=CeleryCommand)
@click.option("--hours", "-H", type=FiniteFloatRange(min=0, min_open=True, max=24 * 366 * 100), default=24.0,
              show_default=True, help="Window: operations created in the last HOURS.")
@queue_option("Only operations whose parent ran on this queue.")
@click.option("--detailed", "-d", is_flag=True, help="Add children per task, the largest and slowest operations.")
@format_option(LIST_FORMATS)
@store_options
@click.pass_context
@usage_errors
def stats(ctx: click.Context, hours: float, queue: str | None, detailed: bool, fmt: str,
          database_url: str | None) -> None:
    """Operations, children per spawn, success rates, durations.

    Broken down by queue and by handler; --detailed adds children per task
    and the largest and slowest operations.
    """
    from .. import render
    from ..store import queries

    with open_store(ctx, database_url) as store, store.read() as conn:
        result = queries.stats(conn, hours=hours, queue=queue, detailed=detailed)
    if fmt == "json":
        emit(ctx, render.to_json(result))
    else:
        emit(ctx, render.stats_text(result, color=use_colour(ctx)))


@spawn.command(cls=CeleryCommand)
@click.option("--interval", "-i", type=FiniteFloatRange(min=0.1, max=3600), default=2.0, show_default=True,
              help="Seconds between refreshes.")
@queue_option("Only operations and children of this queue.")
@limit_option(15, "Running operations to show.")
@click.option("--iterations", type=click.IntRange(min=1), default=None, hidden=True,
              help="Stop after this many refreshes (for tests).")
@store_options
@click.pass_context
@usage_errors
def monitor(ctx: click.Context, interval: float, queue: str | None, limit: int, iterations: int | None,
            database_url: str | None) -> None:
    """A live view of running operations (Ctrl-C quits).

    The screen is redrawn in place every --interval seconds on a terminal;
    piped, each refresh is printed after a blank line.
    """
    from .. import render

    colour = use_colour(ctx)
    frames = 0
    with open_store(ctx, database_url) as store:
        snapshot_of = functools.partial(_snapshot, store, queue=queue, limit=limit, interval=interval)
        first = snapshot_of()  # an unreachable store fails here, with its exit code
        try:
            while True:
                snapshot = first if frames == 0 else snapshot_of(tolerate=True)
                frame = render.monitor_text(snapshot, color=colour)
                if colour:
                    click.clear()
                elif frames:
                    click.echo("")
                emit(ctx, frame)
                frames += 1
                if iterations is not None and frames >= iterations:
                    break
                time.sleep(interval)
        except KeyboardInterrupt:
            click.echo("")
    ctx.exit(RET_OK)


def _snapshot(store: SpawnStore, *, queue: str | None, limit: int, interval: float, tolerate: bool = False) -> dict:
    """One frame's data: a bounded number of statements whatever the store's size."""
    from ..errors import StoreError
    from ..store import queries, utcnow
    from ..store import schema as s

    snapshot: dict[str, Any] = {"store": store.safe_url, "queue": queue, "at": utcnow(), "interval": interval}
    try:
        with store.read() as conn:
            now = snapshot["at"] = utcnow()  # once connected: the database server's clock
            snapshot["running"] = queries.list_operations(conn, limit=limit, queue=queue, state=s.OP_RUNNING)
            snapshot["stats"] = queries.stats(conn, hours=MONITOR_HOURS, queue=queue, now=now)
            waiting = queries.pending(conn, queue=queue, limit=100, jobs_per_operation=1)
    except StoreError as exc:
        if not tolerate:
            raise
        return {**snapshot, "running": [], "stats": _empty_stats(), "pending_children": 0,
                "pending_operations": 0, "error": str(exc)}
    snapshot["pending_operations"] = len(waiting)
    snapshot["pending_more"] = len(waiting) >= 100
    snapshot["pending_children"] = sum(e["pending"] + e["held"] + e.get("scheduled", 0) for e in waiting)
    return snapshot


def _empty_stats() -> dict:
    return {"operations": 0, "operations_by_state": {}, "children": 0, "children_by_state": {},
            "success_rate": None, "child_success_rate": None, "durations": {"child_avg_seconds": None}}


@spawn.command(cls=CeleryCommand)
@click.argument("job_id", type=JOB_ID)
@click.option("--depth", "-D", type=click.IntRange(min=1, max=1000), default=None,
              help="Levels to follow in each direction (default: all).")
@click.option("--ancestors", "only_ancestors", is_flag=True, help="Only the parent chain up to the root.")
@click.option("--descendants", "only_descendants", is_flag=True, help="Only the jobs below.")
@format_option(TREE_FORMATS)
@store_options
@click.pass_context
@usage_errors
def lineage(ctx: click.Context, job_id: str, depth: int | None, only_ancestors: bool, only_descendants: bool,
            fmt: str, database_url: str | None) -> None:
    """Ancestors and descendants of JOB_ID.

    Text, Mermaid and DOT draw one tree from the root down through JOB_ID
    (marked ◀); JSON gives the job and flat lists with each job's distance.
    """
    from .. import render
    from ..store import queries

    want_up = only_ancestors or not only_descendants
    want_down = only_descendants or not only_ancestors
    with open_store(ctx, database_url) as store, store.read() as conn:
        job = queries.get_job(conn, job_id)
        if job is None:
            kind = queries.find_kind(conn, job_id)
            hint = " (that is an operation id)" if kind == "operation" else ""
            fail_not_found("job", job_id, hint)
        up = queries.ancestors(conn, job_id, depth=depth) if want_up else []
        if fmt == "json":
            down = queries.descendants(conn, job_id, depth=depth) if want_down else []
        else:
            subtree = queries.spawn_tree(conn, job_id, max_depth=depth) if want_down else None
    if fmt == "json":
        result: dict[str, Any] = {"job": job}
        if want_up:
            result["ancestors"] = up
        if want_down:
            result["descendants"] = down
        emit(ctx, render.to_json(result))
        return
    combined = render.lineage_tree(job, up, subtree)
    emit(ctx, render.render_tree(combined, fmt, color=use_colour(ctx), highlight=job_id,
                              cut_option="--depth"))


@spawn.command(cls=CeleryCommand)
@queue_option("Only children bound for this queue.")
@limit_option(50, "Operations to show, longest waiting first.")
@format_option(LIST_FORMATS)
@store_options
@click.pass_context
@usage_errors
def pending(ctx: click.Context, queue: str | None, limit: int, fmt: str, database_url: str | None) -> None:
    """Children not yet dispatched: pending, held on dependencies, or scheduled for later."""
    from .. import render
    from ..store import queries

    with open_store(ctx, database_url) as store, store.read() as conn:
        entries = queries.pending(conn, queue=queue, limit=limit)
    if fmt == "json":
        emit(ctx, render.to_json(entries))
    else:
        emit(ctx, render.pending_text(entries, color=use_colour(ctx)))
