"""Completing operations: when every child is final, record it once, tell the signal, apply ``on_complete``.

The winner of the guarded "mark complete" update is the only one that
announces the completion and publishes the callback, so a completion probed
by several workers at once happens once.
"""
from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

from kombu.utils.json import dumps, loads

from .. import signals
from ..handlers import child_id
from ..protocol import CALLBACK_FAILED, OP_FAILED, error_text, operation_state

if TYPE_CHECKING:
    from celery import Celery

    from ..store import SpawnStore
    from .publisher import Publisher

logger = logging.getLogger("celery_spawn.tracking")

#: Results gathered into an ``on_complete`` summary at most (beyond that, only counts and failures).
MAX_SUMMARY_RESULTS = 1000
#: Return values of eager children kept for their operation's summary at most (the oldest go first).
MAX_EAGER_RESULTS = 10_000


def completion_task_id(operation_id: str) -> str:
    """The deterministic task id of an operation's ``on_complete`` callback.

    It is derived from the operation id itself, so it needs that id, not a
    label: a spawn with the label ``nightly`` may run as ``nightly~1a2b3c4d``.
    Take the id from ``SpawnResult.operation_id``, from
    :func:`celery_spawn.resolve_operation` (``resolve_operation(app,
    "nightly")["id"]``: the newest operation of the label) or from
    ``celery spawn list --operation nightly``.
    """
    return child_id(operation_id, -1)


def has_result_backend(app: Celery) -> bool:
    from celery.backends.base import DisabledBackend

    try:
        return not isinstance(app.backend, DisabledBackend)
    except Exception:
        return False


def callback_signature(form: dict, app: Celery) -> Any:
    """A signature from its dict form, the minimal ``{"task": name}`` included."""
    from celery import signature
    from celery.canvas import Signature

    if form.get("subtask_type"):
        return signature(form, app=app)
    return Signature(form["task"], args=form.get("args") or (), kwargs=form.get("kwargs") or {},
                     options=form.get("options") or {}, immutable=bool(form.get("immutable")), app=app)


class Completion:
    """Probes operations for completion and applies their callbacks, for one app and store.

    Without a Celery app (a store-only face), a completed operation's
    ``on_complete`` stays claimed for a worker's recovery sweep to publish.
    """

    def __init__(self, store: SpawnStore, publisher: Publisher | None = None, app: Celery | None = None) -> None:
        self.store = store
        self.publisher = publisher
        self.app = app
        self._eager_results: dict[str, Any] = {}

    def remember_result(self, job_id: str, value: Any) -> None:
        """Keep an eager child's return value for its operation's summary.

        In eager mode (``task_always_eager``) Celery stores no result, and
        reading one only warns; the summary takes these instead.
        """
        self._eager_results[job_id] = value
        while len(self._eager_results) > MAX_EAGER_RESULTS:
            self._eager_results.pop(next(iter(self._eager_results)))

    def check(self, operation_id: str) -> list[str]:
        """Complete ``operation_id`` if it is done, then walk up to the operations of its ancestors.

        The walk stops at the first operation that is not done: an ancestor
        cannot be complete while part of its subtree runs. Returns the
        operations this call completed.
        """
        completed: list[str] = []
        seen: set[str] = set()
        current: str | None = operation_id
        while current and current not in seen:
            seen.add(current)
            done, won = self._try_complete(current)
            if not done:
                break
            if won:
                completed.append(current)
            current = self.store.parent_operation(current)
        return completed

    def _try_complete(self, operation_id: str) -> tuple[bool, bool]:
        """(complete now or already, completed by this call)."""
        operation, counts, rollup = self.store.completion_candidate(operation_id)
        if operation is None:
            return False, False
        if operation["completed"] or (operation["state"] == OP_FAILED and not operation["total"]):
            return True, False
        final_state = operation_state(counts)
        if not self.store.complete_operation(operation_id, final_state, rollup, bool(operation["on_complete"])):
            return True, False
        summary = self.summary(operation, counts, final_state)
        signals.operation_completed.send(sender=operation_id, operation_id=operation_id, summary=summary)
        if operation["on_complete"] and self.publisher is not None:
            self.apply_callback(operation, summary)
        return True, True

    def apply_callback(self, operation: dict, summary: dict | None = None) -> bool:
        """Publish ``on_complete(summary)`` under its deterministic id; a broker error leaves it to the sweep."""
        if self.publisher is None:
            return False
        if summary is None:
            summary = self.summary(operation, self.store.child_counts(operation["id"]), operation["state"])
        try:
            callback = callback_signature(loads(operation["on_complete"]), self.publisher.app).clone(args=(summary,))
        except Exception as exc:
            logger.error("on_complete of operation %s is not a usable signature: %s", operation["id"], exc)
            self.store.set_callback_state(operation["id"], CALLBACK_FAILED, error=f"on_complete: {error_text(exc)}")
            return False
        # One task claims its run (see engine.callbacks); a group or chain runs as Celery runs it.
        claimed = not callback.subtask_type
        try:
            self.publisher.publish_callback(callback, completion_task_id(operation["id"]), operation, claimed)
        except Exception as exc:
            logger.warning("on_complete of operation %s not published (%s); the recovery sweep will retry",
                           operation["id"], exc)
            return False
        self.store.callback_published(operation["id"], waiting=claimed)
        return True

    def callback_queue(self, operation: dict) -> str | None:
        """The queue ``operation``'s ``on_complete`` goes to (None: the default queue, or it cannot tell)."""
        if self.publisher is None:
            return None
        try:
            callback = callback_signature(loads(operation["on_complete"]), self.publisher.app)
            queue = callback.options.get("queue")
            if queue is None:
                queue = self.publisher.app.amqp.router.route(dict(callback.options), callback.task).get("queue")
        except Exception:  # an unusable signature: the default queue is the best guess
            return None
        return getattr(queue, "name", queue)

    def summary(self, operation: dict, counts: dict[str, int], final_state: str) -> dict:
        """The first argument of ``on_complete``: JSON-serialisable, like a chord header's results."""
        failures, succeeded_ids = self.store.summary_rows(operation["id"], MAX_SUMMARY_RESULTS)
        summary: dict[str, Any] = {
            "operation_id": operation["id"],
            "parent_id": operation["parent_id"],
            "state": final_state,
            "total": sum(counts.values()),
            "counts": counts,
            "failed": failures,
        }
        if self.app is None or len(succeeded_ids) > MAX_SUMMARY_RESULTS:
            return summary
        if _eager(self.app):
            summary["results"] = {job_id: _jsonable(self._eager_results.get(job_id)) for job_id in succeeded_ids}
        elif has_result_backend(self.app):
            fetched = fetch_results(self.app, succeeded_ids)
            summary["results"] = {job_id: _jsonable(fetched.get(job_id)) for job_id in succeeded_ids}
        return summary


def fetch_results(app: Celery, task_ids: list[str]) -> dict[str, Any]:
    """The stored results of finished tasks, in one round trip where the result backend can.

    Key-value backends (Redis, memcached, ...) answer one ``MGET`` through
    ``backend.get_many``; the others are read one ``AsyncResult`` at a time.
    A task whose result is missing (expired, or not stored yet) is left out,
    and a backend error leaves out what it could not read: a summary must
    never be lost to a result backend hiccup.
    """
    from celery.backends.base import KeyValueStoreBackend
    from celery.exceptions import TimeoutError as CeleryTimeoutError

    if not task_ids:
        return {}
    backend = app.backend
    results: dict[str, Any] = {}
    if isinstance(backend, KeyValueStoreBackend):
        try:
            # timeout=0: one MGET, then stop instead of waiting for ids that are not ready.
            for task_id, meta in backend.get_many(task_ids, timeout=0, interval=0):
                results[task_id] = meta.get("result")
        except CeleryTimeoutError:
            pass
        except Exception as exc:
            logger.warning("results of %d children not read from the result backend: %s", len(task_ids), exc)
        return results
    for task_id in task_ids:
        try:
            result = app.AsyncResult(task_id)
            if result.ready():
                results[task_id] = result.result
        except Exception as exc:
            logger.warning("result of %s not read from the result backend: %s", task_id, exc)
    return results


def _eager(app: Celery) -> bool:
    """Whether children run in-process and Celery stores none of their results."""
    return bool(app.conf.task_always_eager and not app.conf.task_store_eager_result)


def _jsonable(value: Any) -> Any:
    try:
        dumps(value)
        return value
    except Exception:
        return repr(value)
