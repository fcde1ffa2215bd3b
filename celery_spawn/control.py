"""Controlling spawn trees from code: cancel a tree, run a recovery sweep, find an operation by its label,
find an operation's callback."""
from __future__ import annotations

from datetime import timedelta
from typing import TYPE_CHECKING, Any

from .engine.completion import completion_task_id
from .settings import DEFAULT_PURGE_BATCH_SIZE, DEFAULT_PURGE_PAUSE_RATIO
from .state import get_state

if TYPE_CHECKING:
    from celery import Celery

    from .engine.recovery import SweepReport

__all__ = ["cancel", "completion_task_id", "purge", "recover", "resolve_operation", "sweep"]


def cancel(app: Celery, job_or_operation_id: str, terminate: bool = False, *,
           store_only: bool = False) -> dict[str, Any]:
    """Stop every unfinished descendant of a job or operation.

    Held and pending children are marked cancelled; dispatched and running
    ones are revoked (terminated with ``terminate=True``); finished ones stay
    as they are. ``store_only=True`` (for a place with no broker) only
    cancels the children never dispatched and leaves the others to their
    workers. ``job_or_operation_id`` may be a label (the ``operation_id`` a
    spawn config gave): it names the newest operation with that label, and
    the result says which (``operation_id``) and how many ``others`` it left
    alone; an older one is cancelled by its own id or its parent job's id.
    Raises :class:`~celery_spawn.errors.JobNotFound` for an unknown id.
    """
    return get_state(app).canceller.cancel(job_or_operation_id, terminate=terminate, store_only=store_only)


def resolve_operation(app: Celery, label_or_id: str) -> dict[str, Any] | None:
    """The operation a label or an operation id names in the app's store, or None.

    A label (the ``operation_id`` a spawn config gave, which the spawns of
    several parents may share) names the newest of its operations. The dict
    has the operation's columns as ``celery spawn list --format json`` shows
    them (``id``, ``label``, ``parent_id``, ``state``, ...) and ``others``:
    how many older operations share the label. Its ``id`` is what the helpers
    that derive ids need, e.g. ``completion_task_id(resolve_operation(app,
    "nightly")["id"])``.
    """
    store = get_state(app).store
    with store.read() as conn:
        operation, others = store.resolve_operation(conn, label_or_id)
    return None if operation is None else {**operation, "others": others}


def recover(app: Celery, grace_seconds: float | None = None, limit: int = 50,
            redeliver_after: float | None = None) -> int:
    """Publish pending children (and claimed ``on_complete`` callbacks) left behind; returns how many
    things it did (see :func:`sweep` for each kind apart).

    Also publishes again dispatched children the broker lost
    (``redeliver_after`` defaults to the app's ``spawn_redeliver_after``), and
    fills in outcomes the store missed from the result backend. Safe to run
    from every worker at once: operations are leased with ``FOR UPDATE SKIP
    LOCKED`` (PostgreSQL, MySQL/MariaDB) and a refreshed timestamp, and a child
    that is published twice runs once.
    """
    return sweep(app, grace_seconds, limit, redeliver_after).total


def sweep(app: Celery, grace_seconds: float | None = None, limit: int = 50,
          redeliver_after: float | None = None) -> SweepReport:
    """One recovery sweep, as :func:`recover`, reporting each kind of work apart: children ``published``,
    ``redelivered``, ``callbacks`` published, outcomes ``filled_in`` from the result backend, and operations
    ``completed`` whose children had all ended unnoticed."""
    return get_state(app).sweeper.sweep(grace_seconds, limit, redeliver_after)


def purge(app: Celery, older_than: timedelta | float | str | None = None, *,
          batch_size: int = DEFAULT_PURGE_BATCH_SIZE, dry_run: bool = False,
          pause_ratio: float = DEFAULT_PURGE_PAUSE_RATIO) -> dict[str, Any]:
    """Delete the trees that finished more than ``older_than`` ago (default: the app's ``spawn_expires``).

    A tree (every operation and job under one root) goes only when all its
    operations are complete, the last finished before the cutoff, none of
    its jobs is unfinished and no unfinished job elsewhere depends on one of
    its jobs; its operations, jobs and dependency edges go together.
    ``older_than`` is a ``timedelta``, seconds, or text such as ``"30d"``.
    Deletes run in transactions of at most ``batch_size`` jobs, so spawns and
    tracking go on meanwhile, and after each one the purge rests
    ``pause_ratio`` times as long as it took (0: full speed; the default 1
    leaves the database half its time). With ``spawn_expires`` 0 (or None) and no
    ``older_than``, nothing is purged. Returns the counts (``trees``,
    ``operations``, ``jobs``, ``dependencies``), the ``cutoff`` (UTC, on the
    database's clock) and ``dry_run``; with ``dry_run`` nothing is deleted.
    """
    from .engine.retention import purge as purge_trees

    state = get_state(app)
    return purge_trees(state.store, state.settings.expires, older_than, batch_size=batch_size, dry_run=dry_run,
                       pause_ratio=pause_ratio)

