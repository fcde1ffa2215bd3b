"""The commands that change things: ``migrate``, ``recover``, ``cancel``, ``purge``."""
from __future__ import annotations

import contextlib
import sys
from collections.abc import Iterator
from typing import Any

import click
from celery.bin.base import CeleryCommand

from ..options import (
    DURATION,
    JOB_ID,
    RET_NOT_FOUND,
    RET_STORE,
    CommandError,
    FiniteFloatRange,
    emit,
    explain,
    format_option,
    limit_option,
    note_label,
    open_store,
    store_options,
    user_app,
)
from ..settings import DEFAULT_PURGE_BATCH_SIZE, DEFAULT_PURGE_PAUSE_RATIO
from .group import spawn
from .progress import on_terminal, working


@spawn.command(cls=CeleryCommand)
@store_options
@click.pass_context
def migrate(ctx: click.Context, database_url: str | None) -> None:
    """Create or upgrade the store's tables."""
    with open_store(ctx, database_url, create=True) as store:
        before = store.revision()
        with working(f"migrating {store.safe_url}"):
            revision = store.migrate()
        if before == revision:
            emit(ctx, f"spawn store {store.safe_url} is up to date (revision {revision})")
        else:
            emit(ctx, f"spawn store {store.safe_url} migrated from {before or 'nothing'} to revision {revision}")


@spawn.command(cls=CeleryCommand)
@click.option("--grace", type=FiniteFloatRange(min=0, max=7 * 86_400), default=None,
              help="Seconds an operation must be untouched (default: the app's spawn_recovery_grace).")
@click.option("--redeliver-after", type=FiniteFloatRange(min=0, max=7 * 86_400), default=None,
              help="Seconds a dispatched SpawnTask child may go unstarted, its operation idle, before it is "
                   "published again (default: the app's spawn_redeliver_after; 0: never).")
@limit_option(50, "Operations to recover in this run.")
@store_options
@click.pass_context
def recover(ctx: click.Context, grace: float | None, redeliver_after: float | None, limit: int,
            database_url: str | None) -> None:
    """Publish children recorded but never dispatched, or dispatched and lost by the broker.

    This is what every worker's recovery sweep does; it needs the app (-A) to publish.
    """
    from ..control import sweep
    from ..errors import StoreError
    from ..state import get_state

    app = user_app(ctx)
    if app is None:
        raise click.UsageError("recover publishes through your Celery app: give it with `celery -A proj spawn recover`")
    state = get_state(app)
    if database_url:
        state.reload(database_url=database_url)
    try:
        with working(f"recovering up to {limit} operations"):
            report = sweep(app, grace_seconds=grace, limit=limit, redeliver_after=redeliver_after)
    except StoreError as exc:
        raise CommandError(explain(state.store, exc), RET_STORE) from None
    emit(ctx, f"published {_count(report.published, 'stranded child', 'stranded children')} "
              f"from {state.store.safe_url}\n"
              f"published again {_count(report.redelivered, 'child', 'children')} lost by the broker, "
              f"{_count(report.callbacks, 'on_complete callback', 'on_complete callbacks')}; "
              f"filled in {_count(report.filled_in, 'outcome', 'outcomes')} from the result backend")


def _count(number: int, one: str, many: str) -> str:
    return f"{number} {one if number == 1 else many}"


@spawn.command(cls=CeleryCommand)
@click.argument("target", metavar="JOB_OR_OPERATION", type=JOB_ID)
@click.option("--terminate", is_flag=True, help="Also kill children that are running (revoke with terminate).")
@click.option("--store-only", is_flag=True,
              help="No broker: cancel the children never dispatched and leave running ones to their workers "
                   "(works without -A).")
@click.option("--force", is_flag=True, help="Do not ask for confirmation on a terminal.")
@format_option(("text", "json"))
@store_options
@click.pass_context
def cancel(ctx: click.Context, target: str, terminate: bool, store_only: bool, force: bool, fmt: str,
           database_url: str | None) -> None:
    """Stop every unfinished descendant of a job or operation.

    Held and pending children are marked cancelled, dispatched and running ones
    are revoked; finished ones stay as they are. Needs the app (-A) to revoke,
    unless --store-only. A label (the operation_id a spawn config gave) names
    the newest operation with that label; cancel an older one by its own id
    or its parent job's id (`celery spawn list --operation LABEL` shows both).
    """
    from .. import render
    from ..errors import JobNotFound, StoreError

    app = user_app(ctx)
    if app is None and not store_only:
        raise click.UsageError("cancel revokes through your Celery app: give it with `celery -A proj spawn cancel` "
                               "(or cancel in the store only with --store-only)")
    if store_only and terminate:
        raise click.UsageError("--terminate needs a broker: it cannot go with --store-only")
    if not force and sys.stdin.isatty():
        click.confirm(f"Cancel everything unfinished below {target}?", abort=True)
    with _canceller(ctx, app, database_url) as (canceller, store):
        try:
            with working(f"cancelling below {target}"):
                result = canceller.cancel(target, terminate=terminate, store_only=store_only)
        except JobNotFound:
            raise CommandError(f"no spawned job or operation has id {target}", RET_NOT_FOUND) from None
        except StoreError as exc:
            raise CommandError(explain(store, exc), RET_STORE) from None
    operation_id = result.get("operation_id")
    if operation_id is not None and result.get("label") == target:
        note_label(target, operation_id, result.get("others", 0), doing="cancelling")
    if fmt == "json":
        emit(ctx, render.to_json(result))
        return
    below = target if operation_id in (None, target) else f"{operation_id} (label {target})"
    text = (f"cancelled {result['cancelled']} waiting and revoked {result['revoked']} running "
            f"job{'s' if result['revoked'] != 1 else ''} below {below}"
            + (" (terminated)" if terminate and result["revoked"] else ""))
    if result["cancel_requested"]:
        text += f"; {result['cancel_requested']} running asked to stop (recorded as they end)"
    left = result["still_running"] - result["cancel_requested"]
    if left:
        text += f"; {left} dispatched or running left to their workers (store only)"
    emit(ctx, text)


@contextlib.contextmanager
def _canceller(ctx: click.Context, app: Any, database_url: str | None) -> Iterator[tuple[Any, Any]]:
    """The one cancel: the app's (it revokes through the broker), or store-only over the command's store."""
    if app is not None:
        from ..state import get_state

        state = get_state(app)
        if database_url:
            state.reload(database_url=database_url)
        yield state.canceller, state.store
        return
    from ..engine.cancel import Canceller
    from ..engine.completion import Completion

    with open_store(ctx, database_url) as store:
        yield Canceller(store, Completion(store)), store


@spawn.command(cls=CeleryCommand)
@click.option("--older-than", "older_than", type=DURATION, default=None,
              help="Purge trees whose last operation finished longer ago than this: 30d, 12h, 90m or seconds "
                   "(default: the app's spawn_expires, env CELERY_SPAWN_EXPIRES; 30 days unless set).")
@click.option("--dry-run", is_flag=True, help="Only count what would go.")
@click.option("--batch-size", type=click.IntRange(min=1, max=100_000), default=DEFAULT_PURGE_BATCH_SIZE,
              show_default=True,
              help="Jobs deleted per transaction (short transactions let spawns and tracking go on).")
@click.option("--pause-ratio", type=FiniteFloatRange(min=0, max=100), default=DEFAULT_PURGE_PAUSE_RATIO,
              show_default=True,
              help="After each batch, rest this many times as long as the batch took (0: full speed).")
@click.option("--yes", "-y", is_flag=True, help="Do not ask for confirmation on a terminal.")
@format_option(("text", "json"))
@store_options
@click.pass_context
def purge(ctx: click.Context, older_than: float | None, dry_run: bool, batch_size: int, pause_ratio: float,
          yes: bool, fmt: str, database_url: str | None) -> None:
    """Delete finished trees older than a duration: their operations, jobs and dependency edges.

    A tree (everything under one root job) goes only when every operation in
    it is complete and the last one finished before the cutoff, none of its
    jobs is unfinished, and no unfinished job elsewhere depends on one of its
    jobs. Running trees are never touched. Works without -A (--database-url).
    """
    from datetime import timedelta

    from .. import render
    from ..engine.retention import Purger

    seconds = older_than if older_than is not None else _expires(ctx)
    if not seconds and older_than is None:
        if fmt == "json":
            emit(ctx, render.to_json({"cutoff": None, "dry_run": dry_run, "trees": 0, "operations": 0, "jobs": 0,
                                      "dependencies": 0}))
        else:
            emit(ctx, "spawn_expires is 0: finished trees are kept; give --older-than to purge")
        return
    with open_store(ctx, database_url) as store:
        purger = Purger(store)
        age = timedelta(seconds=seconds)
        with working("counting finished trees"):
            plan, _ = purger.plan(age)
        if dry_run or not plan.jobs and not plan.operations:
            report = plan
            report.dry_run = dry_run
        else:
            if not yes and sys.stdin.isatty():
                click.confirm(f"Delete {_count(plan.trees, 'finished tree', 'finished trees')} "
                              f"({_count(plan.jobs, 'job', 'jobs')}) from {store.safe_url}?", abort=True)
            with _purge_progress(plan.jobs) as advance:
                report = purger.purge(age, batch_size=batch_size, pause_ratio=pause_ratio, progress=advance)
    if fmt == "json":
        emit(ctx, render.to_json(report.as_dict()))
        return
    verb = "would purge" if report.dry_run else "purged"
    parts = [_count(report.operations, "operation", "operations"), _count(report.jobs, "job", "jobs")]
    if not report.dry_run:
        parts.append(_count(report.edges, "dependency edge", "dependency edges"))
    emit(ctx, f"{verb} {_count(report.trees, 'tree', 'trees')} ({', '.join(parts)}) "
              f"that finished before {report.cutoff.isoformat(timespec='seconds')}Z")


def _expires(ctx: click.Context) -> float:
    """The app's ``spawn_expires``, else the environment's, else the default."""
    app = user_app(ctx)
    if app is not None:
        from ..state import get_state

        return get_state(app).settings.expires
    from ..settings import SpawnSettings

    return SpawnSettings.load({}).expires


@contextlib.contextmanager
def _purge_progress(total: int) -> Iterator[Any]:
    """A progress bar of deleted jobs on a terminal; otherwise a count in the log after each batch."""
    if on_terminal() and total:
        with click.progressbar(length=total, label="purging", file=sys.stderr) as bar:
            yield bar.update
        return
    import logging

    logger = logging.getLogger("celery_spawn.retention")
    done = 0

    def advance(jobs: int) -> None:
        nonlocal done
        done += jobs
        logger.info("purged %d of %d jobs", done, total)

    yield advance
