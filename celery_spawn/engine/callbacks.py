"""An ``on_complete`` callback runs once, however many times its message arrives.

Its message names its operation (header ``spawn_callback``). Every delivery,
whatever the task's class, claims the callback's start in the store before
the body runs; a delivery that finds the callback claimed by a run that goes
on is sent back for a later look, one that finds it ended is dropped, and one
that finds its claimant gone takes the claim over. The recovery sweep may
then send again a callback the broker lost (sent, never started, its queue
idle): a copy of it never runs twice.
"""
from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any, NoReturn, Protocol, cast

from celery.exceptions import Ignore, Reject

from ..protocol import CALLBACK_ENDED, CALLBACK_STARTED
from .copies import finished_here, worker_identity

if TYPE_CHECKING:
    from celery import Task

    from ..store import SpawnStore
    from .copies import Liveness

logger = logging.getLogger("celery_spawn.tracking")


class Tracking(Protocol):
    """What the claims use of the app's :class:`~celery_spawn.engine.tracker.Tracker`."""

    store: SpawnStore
    liveness: Liveness
    worker: str | None

    def defer(self, task: Task, claimed_by: str | None) -> NoReturn: ...

    def succeeded_before(self, task: Any) -> bool: ...


class CallbackClaims:
    """The claim, end and retry of callbacks' runs, for one app's tracker."""

    def __init__(self, tracker: Tracking) -> None:
        self.tracker = tracker
        self.store = tracker.store

    def claim(self, task: Task, operation_id: str) -> None:
        """Claim the start of ``operation_id``'s callback for this delivery, or raise what drops or defers it.

        A callback the store does not know (its operation purged, or the
        header set by hand) runs, as it would without claims.
        """
        request = task.request
        task_id = cast(str, request.id)  # a running task has one
        worker = worker_identity(request.hostname) or self.tracker.worker
        if finished_here(task_id):
            logger.warning("skipping %s[%s]: the on_complete of operation %s already ran in this process",
                           task.name, request.id, operation_id)
            raise Ignore()
        if self.store.claim_callback(operation_id, worker) is not False:
            return
        run, claimed_by = self.store.callback_claim_of(operation_id)
        if run == CALLBACK_STARTED:
            runs = self.tracker.liveness.still_runs(claimed_by, task_id, request.hostname)
            if runs is None:
                logger.warning("%s[%s] goes back to the broker: cannot tell whether the run that claimed the "
                               "on_complete of operation %s (%s) goes on", task.name, request.id, operation_id,
                               claimed_by)
                raise Reject("the worker that claimed it cannot be asked", requeue=True)
            if not runs:
                if self.tracker.succeeded_before(task):
                    # Its worker died after Celery stored the result, before the end was written: it ran.
                    self.ended(operation_id)
                    logger.warning("skipping %s[%s]: the on_complete of operation %s already ran (the result "
                                   "backend says so)", task.name, request.id, operation_id)
                    raise Ignore()
                if self.store.take_over_callback(operation_id, worker, claimed_by):
                    logger.warning("%s[%s] runs the on_complete of operation %s again: the run that claimed it "
                                   "(%s) is gone", task.name, request.id, operation_id, claimed_by)
                    return
            else:
                # A run that goes on, or an attempt whose retry the store has not heard yet: look again later.
                self.tracker.defer(task, claimed_by)
        logger.warning("skipping %s[%s]: the on_complete of operation %s already %s (duplicate delivery)",
                       task.name, request.id, operation_id, "ran" if run == CALLBACK_ENDED else "runs")
        raise Ignore()

    def ended(self, operation_id: str) -> None:
        """The callback returned, or failed for good: no delivery runs it again."""
        self.store.end_callback(operation_id)

    def retried(self, operation_id: str, request: Any) -> None:
        """A Celery retry of the callback: the retry's message may claim it (this attempt's claim is freed)."""
        self.store.free_callback(operation_id, worker_identity(request.hostname) or self.tracker.worker)
