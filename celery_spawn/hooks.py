"""Celery's worker signals, turned into tracking events for the app's :class:`~celery_spawn.engine.tracker.Tracker`.

Connected once, at import (``install()`` imports this module). Each receiver
finds the task's app's spawn state without creating one, and never lets a
store error reach the worker: tracking is logged and retried, the task's
own outcome stands.
"""
from __future__ import annotations

import functools
import logging
import os
from typing import TYPE_CHECKING, Any, Callable, NoReturn

from celery import signals as celery_signals
from celery.exceptions import Reject

from . import metrics
from .engine import copies
from .engine.completion import completion_task_id
from .engine.redelivery import claims_its_start
from .errors import StoreError
from .engine.writebehind import FINISH, RETRY, START, UNCLAIM, Event, enable_in_this_process, flush_all, submit
from .protocol import (FAILED, HEADER_CALLBACK, HEADER_OPERATION, REVOKED, SUCCEEDED, error_text, request_header,
                       request_headers)
from .state import peek_state
from .store.clock import hold_if_ahead, server_eta

if TYPE_CHECKING:
    from celery import Task

    from .engine.tracker import Tracker

logger = logging.getLogger("celery_spawn.tracking")

#: Seconds before a spawned child whose start could not be claimed (store down) runs again.
STORE_RETRY_DELAY = 5.0


def is_spawned(task: Task) -> bool:
    """Whether the running task was spawned: a header check, no database round trip."""
    return bool(request_header(task.request, HEADER_OPERATION))


def callback_of(task: Any) -> str | None:
    """The operation whose ``on_complete`` the running task is, from its message's header; else None.

    Only the task that carries the callback's own id claims it: the members
    of a group (or the first task of a chain) given as ``on_complete`` get the
    header too, under ids of their own, and run as they would without claims.
    """
    operation_id = request_header(task.request, HEADER_CALLBACK)
    if not operation_id or task.request.id != completion_task_id(operation_id):
        return None
    return operation_id


def tracker_for(task: Any) -> Tracker | None:
    """The tracker of the task's app, when spawning is in use there and tracks states."""
    app = getattr(task, "app", None)
    if app is None:
        return None
    state = peek_state(app)
    if state is None or not state.settings.track_states:
        return None
    return state.tracker


def _operation_of(request: Any) -> str | None:
    """The operation a spawned child's request belongs to (its message header)."""
    return request_headers(request).get(HEADER_OPERATION) or getattr(request, HEADER_OPERATION, None)


def _record(tracker: Tracker, action: str, event: Event, write_now: Callable[..., Any], *args: Any) -> None:
    """Queue ``event`` for the write-behind inside a worker; elsewhere write it now."""
    try:
        submit(tracker, event, lambda: write_now(*args))
    except Exception as exc:  # tracking must never take the worker down
        logger.error("celery-spawn could not record %s: %s", action, exc)


@celery_signals.task_prerun.connect(weak=False)
def _on_prerun(sender=None, task_id=None, task=None, **_: Any) -> None:
    if task is None:
        return
    if callback_of(task):
        copies.entered(task_id)  # (a copy of the callback asks whether the run that claimed it goes on)
        return
    if not is_spawned(task):
        return
    copies.entered(task_id)
    if claims_its_start(task) or copies.is_copy(task.request):
        return  # it claims its start itself, before its body runs (and can skip a duplicate)
    tracker = tracker_for(task)
    if tracker is not None and tracker.settings.track_started:
        tracker.worker = copies.worker_identity(task.request.hostname) or tracker.worker
        _record(tracker, "a start", Event(START, task_id, operation_id=_operation_of(task.request)),
                tracker.claim_start, task_id)


@celery_signals.task_postrun.connect(weak=False)
def _on_postrun(sender=None, task_id=None, task=None, **_: Any) -> None:
    if task is not None and task_id is not None and (is_spawned(task) or callback_of(task)):
        copies.left(task_id)
        if copies.left_unconfirmed(task_id):  # it waits for the store: its claim may have been written
            tracker = tracker_for(task)
            if tracker is not None:
                _record(tracker, "the end of an unconfirmed claim", Event(UNCLAIM, task_id), tracker.free_claim,
                        task_id)


def guard_copies(app: Any) -> None:
    """Give every task of ``app`` that does not claim its own start the claim a copy of a child needs.

    Called in a worker's main process before its pool starts: the tracers the
    pool builds call the guarded ``run``. A first delivery runs as before
    (its start is tracked in the background); a delivery that may be a copy
    (see :mod:`celery_spawn.engine.copies`) claims the start in the store
    first, and is skipped when the job already succeeded or still runs.
    """
    for task in list(app.tasks.values()):
        if claims_its_start(task) or task.name.startswith("celery.") or getattr(task.run, GUARDED, False):
            continue
        task.run = _guarded(task, task.run)


GUARDED = "__spawn_guarded__"
#: Set on the request of an attempt that could not claim its start (the store was out): it never started.
UNCLAIMED = "spawn_unclaimed"


def wait_for_store(task: Task, exc: StoreError) -> NoReturn:
    """Retry a child that could not claim its start for want of the store: later, never twice at once.

    The attempt never started, so its retry is not recorded: by the time the
    write reached the store, a copy of the child may have claimed the start,
    and a retry written over that claim would free it for a second run.
    """
    logger.warning("%s[%s] waits for the spawn store: %s", task.name, task.request.id, exc)
    setattr(task.request, UNCLAIMED, True)
    # Without limit: the attempt never started (Celery's max_retries=None would mean the task's own limit).
    retry_later(task, exc, countdown=STORE_RETRY_DELAY, max_retries=(task.request.retries or 0) + 1)


def retry_later(task: Task, exc: Exception, **options: Any) -> NoReturn:
    """``task.retry(exc=exc, **options)`` for a store failure; the message back to the broker if that fails.

    When the retry cannot be sent (the broker is out too), Celery rejects
    the message without requeue: dropped, and recorded as a failure of a
    task whose spawn, or whose very start, only waited for the store. It
    goes back to the broker instead (an early-acknowledged message is then
    lost; a child of it is published again by the recovery sweep, as it is
    still recorded dispatched). A ``countdown`` becomes an ``eta`` on the
    database server's clock, so that a host whose clock runs ahead does not
    hold its retries back by as much on the other workers.
    """
    if options.get("countdown") is not None and options.get("eta") is None:
        countdown = options.pop("countdown")
        options["eta"] = server_eta(countdown)
        hold_if_ahead(countdown, STORE_RETRY_DELAY)
    overrides = hasattr(task, "override_max_retries")
    try:
        raise task.retry(exc=exc, **options) from exc
    except Reject as unsent:
        if getattr(unsent, "requeue", False):
            raise
        reason = getattr(unsent, "reason", None)
        logger.warning("%s[%s] goes back to the broker: its retry could not be sent (%s)", task.name,
                       task.request.id, reason)
        raise Reject(reason, requeue=True) from exc
    finally:
        if not overrides and hasattr(task, "override_max_retries"):
            del task.override_max_retries  # set by Celery's retry(max_retries=...) on the task, for this call only


def claim_callback(task: Task) -> None:
    """Claim the start of the ``on_complete`` callback the task runs as, if it is one (every delivery does:
    see :mod:`celery_spawn.engine.callbacks`); a delivery that must not run raises Ignore."""
    operation_id = callback_of(task)
    tracker = tracker_for(task) if operation_id else None
    if tracker is None or operation_id is None:
        return
    try:
        tracker.callbacks.claim(task, operation_id)
    except StoreError as exc:  # without the store a copy cannot be told: run later, not twice
        wait_for_store(task, exc)


def _guarded(task: Task, run: Callable[..., Any]) -> Callable[..., Any]:
    @functools.wraps(run)
    def guarded(*args: Any, **kwargs: Any) -> Any:
        claim_callback(task)
        if copies.is_copy(task.request) and is_spawned(task):
            tracker = tracker_for(task)
            if tracker is not None:
                try:
                    tracker.skip_duplicate(task)
                except StoreError as exc:  # without the store a copy cannot be told: run later, not twice
                    wait_for_store(task, exc)
        return run(*args, **kwargs)

    setattr(guarded, GUARDED, True)
    return guarded


def _callback_ended(task: Any, task_id: str, operation_id: str) -> None:
    """An ``on_complete`` returned or failed for good: this process, and then the store, remember it."""
    copies.finished(task_id)
    tracker = tracker_for(task)
    if tracker is not None:
        try:
            tracker.callbacks.ended(operation_id)
        except Exception as exc:  # tracking must never take the worker down
            logger.error("celery-spawn could not record the end of the on_complete of operation %s: %s",
                         operation_id, exc)


@celery_signals.task_success.connect(weak=False)
def _on_success(sender=None, result=None, **_: Any) -> None:
    if sender is None:
        return
    callback = callback_of(sender)
    if callback:
        _callback_ended(sender, sender.request.id, callback)
        return
    if not is_spawned(sender):
        return
    tracker = tracker_for(sender)
    if tracker is not None:
        job_id = sender.request.id
        copies.finished(job_id)
        if getattr(sender.request, "is_eager", False):  # no result is stored: the summary keeps it
            tracker.completion.remember_result(job_id, result)
        operation_id = _operation_of(sender.request)
        _record(tracker, "a success", Event(FINISH, job_id, state=SUCCEEDED, operation_id=operation_id),
                tracker.succeeded, job_id, operation_id)


@celery_signals.task_failure.connect(weak=False)
def _on_failure(sender=None, task_id=None, exception=None, **_: Any) -> None:
    if sender is None or task_id is None:
        return
    callback = callback_of(sender) if getattr(sender.request, "id", None) == task_id else None
    if callback:
        _callback_ended(sender, task_id, callback)
        return
    # In the worker's main process (hard time limit, lost worker) the request is empty:
    # then the id alone tells, with one primary-key update.
    if getattr(sender.request, "id", None) == task_id and not is_spawned(sender):
        return
    tracker = tracker_for(sender)
    if tracker is not None:
        copies.finished(task_id)
        _record(tracker, "a failure", Event(FINISH, task_id, state=FAILED, error=error_text(exception)),
                tracker.failed, task_id, exception)


@celery_signals.task_retry.connect(weak=False)
def _on_retry(sender=None, request=None, reason=None, **_: Any) -> None:
    if sender is None or request is None or getattr(request, UNCLAIMED, False):  # (see wait_for_store)
        return
    callback = request_headers(request).get(HEADER_CALLBACK)
    if callback and request.id == completion_task_id(callback):
        tracker = tracker_for(sender)
        try:
            if tracker is not None:
                tracker.callbacks.retried(callback, request)
        except Exception as exc:  # tracking must never take the worker down
            logger.error("celery-spawn could not free the on_complete of operation %s for its retry: %s",
                         callback, exc)
        return
    if not request_headers(request).get(HEADER_OPERATION):
        return
    tracker = tracker_for(sender)
    if tracker is not None:
        _record(tracker, "a retry", Event(RETRY, request.id, error=error_text(reason)),
                tracker.retried, request.id, reason)


@celery_signals.task_revoked.connect(weak=False)
def _on_revoked(sender=None, request=None, terminated=None, expired=None, **_: Any) -> None:
    if sender is None or request is None or getattr(request, "id", None) is None:
        return
    tracker = tracker_for(sender)
    if tracker is not None:
        reason = "expired" if expired else ("terminated" if terminated else "revoked")
        _record(tracker, "a revoke", Event(FINISH, request.id, state=REVOKED, error=reason),
                tracker.failed, request.id, reason, REVOKED)


@celery_signals.worker_init.connect(weak=False)
def _worker_starts(sender=None, **_: Any) -> None:
    # A prefork main process forks new pool processes at any time: a thread of ours writing
    # to the store at that moment would leave locks held in the child. Its few events (revokes,
    # lost workers, time limits) are written synchronously; the pool processes batch theirs.
    if not _forks_pool_processes(sender):
        enable_in_this_process()


@celery_signals.worker_process_init.connect(weak=False)
def _pool_process_starts(**_: Any) -> None:
    enable_in_this_process()


def _forks_pool_processes(worker: Any) -> bool:
    pool_cls = getattr(worker, "pool_cls", None)
    return getattr(pool_cls, "__module__", "").startswith("celery.concurrency.prefork")


@celery_signals.worker_process_shutdown.connect(weak=False)
@celery_signals.worker_shutdown.connect(weak=False)
def _worker_stops(**_: Any) -> None:
    flush_all()


@celery_signals.worker_process_shutdown.connect(weak=False)
def _pool_process_stops(**_: Any) -> None:
    # After the write-behind's flush (connected first): the live gauges of this process go with it.
    metrics.process_exited(os.getpid())
