"""The recovery sweep: publish children that were recorded but never reached the broker, fill in
outcomes the store missed, publish callbacks never sent, and redeliver what the broker lost.
"""
from __future__ import annotations

import logging
import time
from datetime import datetime, timedelta, timezone
from typing import TYPE_CHECKING, NamedTuple

from .. import metrics
from ..protocol import CALLBACK_ENDED, CALLBACK_SENT, CALLBACK_STARTED, FAILED, REVOKED, SUCCEEDED
from ..store import utcnow
from .completion import completion_task_id, has_result_backend
from .outbox import stored_batch_size

if TYPE_CHECKING:
    from celery import Celery

    from ..store import SpawnStore
    from .completion import Completion
    from .outbox import Outbox
    from .redelivery import Redeliverer
    from .tracker import Tracker

logger = logging.getLogger("celery_spawn.recovery")

#: The longest grace period a sweep accepts (the spawn_recovery_grace setting's own limit).
MAX_GRACE_SECONDS = 7 * 86_400


class SweepReport(NamedTuple):
    """What one sweep did, each kind counted apart."""

    #: Children recorded and never published (stranded before dispatch), now published.
    published: int = 0
    #: Dispatched children the broker lost, published again.
    redelivered: int = 0
    #: ``on_complete`` callbacks claimed and never sent, or sent and lost by the broker, now published.
    callbacks: int = 0
    #: Outcomes the store had missed, filled in from the result backend (nothing published).
    filled_in: int = 0
    #: Operations whose children had all ended and that nobody had completed, now completed.
    completed: int = 0

    @property
    def total(self) -> int:
        """Everything the sweep did (what :func:`celery_spawn.recover` returns)."""
        return self.published + self.redelivered + self.callbacks + self.filled_in + self.completed


class Sweeper:
    """One recovery sweep over a store, safe to run from every worker at once."""

    def __init__(self, app: Celery, store: SpawnStore, outbox: Outbox, tracker: Tracker, completion: Completion,
                 redeliverer: Redeliverer, grace_seconds: float) -> None:
        self.app = app
        self.store = store
        self.outbox = outbox
        self.tracker = tracker
        self.completion = completion
        self.redeliverer = redeliverer
        self.grace_seconds = grace_seconds
        #: When (this process's monotonic clock) reconcile first saw each outcome dated ahead of its own clock.
        self._ahead_since: dict[str, float] = {}

    def sweep(self, grace_seconds: float | None = None, limit: int = 50,
              redeliver_after: float | None = None) -> SweepReport:
        """Publish pending children (and claimed ``on_complete`` callbacks) left behind; says what it did.

        Also publishes again dispatched children the broker lost (see
        :mod:`celery_spawn.engine.redelivery`). Operations are leased with
        ``FOR UPDATE SKIP LOCKED`` (PostgreSQL, MySQL/MariaDB) and a refreshed
        timestamp, and a child that is published twice runs once.
        """
        grace = self.grace_seconds if grace_seconds is None else grace_seconds
        if isinstance(grace, bool) or not isinstance(grace, (int, float)) or not 0 <= grace <= MAX_GRACE_SECONDS:
            raise ValueError(f"grace_seconds must be between 0 and {MAX_GRACE_SECONDS}, not {grace!r}")
        published = callbacks = 0
        for operation_id in self.store.claim_stale_operations(grace, limit):
            try:
                published += self._recover_operation(operation_id)
            except Exception as exc:  # one bad operation must not strand the others
                logger.error("recovery of operation %s failed: %s", operation_id, exc)
        filled_in = self.reconcile(grace)
        redelivered = self.redeliverer.redeliver(redeliver_after, limit)
        completed = self.complete_overdue(grace, limit)
        for operation in self.store.claim_stale_callbacks(grace, limit):
            try:
                run = operation["callback_run"]
                seen = run if run in (CALLBACK_STARTED, CALLBACK_ENDED) else self.callback_delivered(operation["id"])
                if seen is not None:
                    # Published before a store failure hid it: a worker claimed its run, or the result backend
                    # saw it. A run still going (started) records its own end, or is taken over by a copy if its
                    # worker dies; ending it here would keep a retry of it from claiming its run again. One the
                    # backend saw retried or started, not ended, waits for its next delivery to claim it (and
                    # is sent again if the broker loses that).
                    if seen == DELIVERED:
                        self.store.callback_published(operation["id"])
                    else:
                        self.store.set_callback_state(operation["id"], CALLBACK_SENT)
                    if seen == CALLBACK_ENDED:
                        self.store.end_callback(operation["id"])
                    logger.warning("the on_complete callback of operation %s was delivered already; recorded it "
                                   "as sent", operation["id"])
                elif self.completion.apply_callback(operation):
                    logger.warning("recovery published the on_complete callback of operation %s", operation["id"])
                    callbacks += 1
            except Exception as exc:
                logger.error("recovery of the callback of operation %s failed: %s", operation["id"], exc)
        callbacks += self.redeliver_callbacks(redeliver_after, limit)
        metrics.sweep_republished("stranded", published)
        metrics.sweep_republished("redelivered", redelivered)
        return SweepReport(published, redelivered, callbacks, filled_in, completed)

    def complete_overdue(self, grace_seconds: float, limit: int = 50) -> int:
        """Complete operations whose children have all ended but were never probed; returns how many.

        A child's end is followed by a probe of its operation (deferred by the
        write-behind, or done by the caller that recorded it): a process killed
        in between, or a probe that met a store failure, leaves the operation
        running, and a copy of the child finds it final and probes nothing.
        """
        completed = 0
        for operation_id in self.store.claim_overdue_completions(grace_seconds, limit):
            try:
                done = self.completion.check(operation_id)
            except Exception as exc:  # one bad operation must not stop the others
                logger.error("recovery could not complete operation %s: %s", operation_id, exc)
                continue
            if done:
                logger.warning("recovery completed operation %s, whose children had all ended", operation_id)
            completed += len(done)
        return completed

    def redeliver_callbacks(self, after_seconds: float | None = None, limit: int = 50) -> int:
        """Publish again ``on_complete`` callbacks the broker lost; returns how many.

        The rule is the one for children (see :mod:`.redelivery`): a callback
        sent ``after_seconds`` ago (``spawn_redeliver_after``; 0: never) that
        no worker has started, while its queue holds no ready message. Every
        delivery of a callback claims its start (see :mod:`.callbacks`), so a
        copy of one that turns up after all never runs twice. One sent
        ``spawn_redeliver_limit`` times more without ever starting is given up
        (``callback_run`` lost).
        """
        after = self.redeliverer.after_seconds if after_seconds is None else after_seconds
        if not after:
            return 0
        sent = 0
        idle: dict[str | None, bool] = {}
        for operation in self.store.lease_waiting_callbacks(utcnow() - timedelta(seconds=after), limit):
            try:
                queue = self.completion.callback_queue(operation)
                if queue not in idle:
                    idle[queue] = self.redeliverer.queue_is_idle(queue, missing_is_idle=True)
                if not idle[queue]:  # it may wait there behind others
                    continue
                if operation["callback_sends"] > self.redeliverer.limit:
                    self.store.lose_callback(operation["id"])
                    logger.error("the on_complete callback of operation %s is lost: it was sent %d times and "
                                 "never started", operation["id"], operation["callback_sends"])
                elif self.completion.apply_callback(operation):
                    logger.warning("published again the on_complete callback of operation %s that no worker "
                                   "started (lost by the broker?)", operation["id"])
                    sent += 1
            except Exception as exc:  # one bad operation must not stop the others
                logger.error("redelivery of the callback of operation %s failed: %s", operation["id"], exc)
        return sent

    def callback_delivered(self, operation_id: str) -> str | None:
        """What the result backend says of the operation's ``on_complete``: ``ended`` (a final state),
        ``delivered`` (retried or started: its run goes on), or None (no state: not delivered, or unknown).

        Completion publishes the callback, then records it as sent: a store
        failure between the two leaves it claimed, and publishing it again
        would run it twice (Celery runs every message of an id). An attempt
        that met the store failure too retries, and the backend then says
        RETRY of a callback that has not run: only a final state ends it.
        Without a result backend, or for a callback that stores no result,
        this cannot tell (nor when the backend cannot be read), and the
        callback is published again.
        """
        from celery import states

        if not has_result_backend(self.app):
            return None
        try:
            meta = self.app.backend.get_task_meta(completion_task_id(operation_id))
        except Exception as exc:  # a backend that cannot answer must not hold the callback back
            logger.warning("could not read the on_complete result of operation %s (%s); publishing it again",
                           operation_id, exc)
            return None
        status = meta.get("status", states.PENDING)
        if status == states.PENDING:
            return None
        return CALLBACK_ENDED if status in states.READY_STATES else DELIVERED

    def reconcile(self, grace_seconds: float, limit: int = 200) -> int:
        """Apply outcomes the store missed, from the result backend; returns how many jobs changed.

        A child's final state is written by a worker signal. When that write is
        lost (the store was down, or the pool process died right after Celery
        stored the result), the job stays dispatched/started and its operation
        never completes. The result backend still knows: this reads it for old
        unfinished jobs and finishes them as the signal would have. An outcome
        stored less than ``grace_seconds`` ago is left alone: the worker's own
        write of it may still be on its way (it is not missed, only late).
        Without a result backend nothing can be learnt, and nothing changes.

        ``date_done`` is the clock of the worker that stored the result. One
        dated ahead of this process's clock (that worker's clock runs ahead, by
        minutes maybe) says nothing of its age: it is applied once this sweeper
        has seen it stored for ``grace_seconds`` by its own monotonic clock.
        """
        from celery import states

        if not has_result_backend(self.app):
            return 0
        changed = 0
        now = utcnow().replace(tzinfo=timezone.utc)
        settled_before = now - timedelta(seconds=grace_seconds)
        if len(self._ahead_since) > MAX_AHEAD_REMEMBERED:
            self._ahead_since.clear()
        for job in self.store.stale_unfinished_jobs(grace_seconds, limit):
            try:
                meta = self.app.backend.get_task_meta(job["id"])
                outcome = meta.get("status")
                if outcome not in states.READY_STATES:
                    continue
                done_at = meta.get("date_done")
                if not _done_before(done_at, settled_before):
                    if _done_before(done_at, now):  # stored within the grace: its own write may come yet
                        continue
                    seen = self._ahead_since.setdefault(job["id"], time.monotonic())
                    if time.monotonic() - seen < grace_seconds:
                        continue
                self._ahead_since.pop(job["id"], None)
                if outcome == states.SUCCESS:
                    done = self.tracker.finish(job["id"], SUCCEEDED, operation_id=job["operation_id"])
                elif outcome == states.FAILURE:
                    done = self.tracker.finish(job["id"], FAILED, f"{meta.get('result')!r}"[:4000],
                                               operation_id=job["operation_id"])
                elif outcome == states.REVOKED:
                    done = self.tracker.finish(job["id"], REVOKED, "revoked", operation_id=job["operation_id"])
                else:
                    continue
                changed += int(done)
            except Exception as exc:  # one unreadable result must not stop the others
                logger.error("reconciling job %s failed: %s", job["id"], exc)
        if changed:
            logger.warning("recovery applied %d outcomes the store had missed", changed)
        return changed

    def _recover_operation(self, operation_id: str) -> int:
        with self.store.begin() as conn:
            operation = self.store.get_operation(conn, operation_id)
            if operation is None:
                return 0
            # Held children whose dependencies ended while the spawn was being recorded.
            self.store.settle_dependencies(conn, operation_id, self.grace_seconds)
        count = self.outbox.publish_pending(operation_id, stored_batch_size(operation), operation=operation,
                                            recovered=True)
        if count:
            logger.warning("recovery published %d stranded children of operation %s", count, operation_id)
        return count


#: What :meth:`Recovery.callback_delivered` says of a callback the result backend saw retried or started.
DELIVERED = "delivered"

#: Outcomes dated ahead of the sweeper's clock it remembers at most (then it forgets them all and looks afresh).
MAX_AHEAD_REMEMBERED = 10_000


def _done_before(date_done: object, moment: datetime) -> bool:
    """Whether a result's ``date_done`` (a datetime, or its ISO text; naive means UTC) lies before ``moment``.

    A result without a readable time is taken as old (older backends, or results stored by hand).
    """
    if isinstance(date_done, str):
        try:
            date_done = datetime.fromisoformat(date_done)
        except ValueError:
            return True
    if not isinstance(date_done, datetime):
        return True
    if date_done.tzinfo is None:
        date_done = date_done.replace(tzinfo=timezone.utc)
    return date_done < moment
