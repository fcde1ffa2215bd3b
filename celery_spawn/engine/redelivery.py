"""Publishing again children whose message the broker lost after they were dispatched.

A broker can lose a message it already handed out: kombu's Redis transport
drops one when the consumer dies between taking it off the list and
recording it as unacknowledged. The store then says ``dispatched`` forever
and the operation never completes. Nothing tells such a child from one that
waits behind a long queue except time and the queue itself, so the rule is
conservative: a dispatched child is published again only when no worker
started it within ``spawn_redeliver_after`` seconds, its operation made no
progress in that time (no sibling started or finished), *and* it is not
waiting in its queue: the broker holds no ready message there, or a job sent
after it to that queue has started. The message goes out marked as
recovered, so the child claims its start in the store before it runs,
whatever its task class (see :mod:`celery_spawn.engine.copies`): should the
original turn up after all, only one of them runs. A child sent again
``spawn_redeliver_limit`` times without ever starting, or with no stored
message to send, ends ``lost``: its operation completes, and ``on_complete``
counts it.

A child that started, whose whole worker then died, waits for its message
to come back from the broker. Should that message be lost too, the same
rule applies to it (see :meth:`Redeliverer.take_over_orphans`).
"""
from __future__ import annotations

import logging
import math
from datetime import datetime, timedelta
from typing import TYPE_CHECKING, Any

from ..protocol import LOST
from ..store import utcnow

if TYPE_CHECKING:
    from celery import Celery

    from ..store import SpawnStore
    from .publisher import Publisher
    from .tracker import Tracker

logger = logging.getLogger("celery_spawn.redelivery")

#: The attribute of a task class whose children claim their start in the store (SpawnTask sets it).
CLAIMS_START = "spawn_claims_start"


def claims_its_start(task: object) -> bool:
    """Whether a copy of this task's message is dropped by the task itself when the first ran."""
    return bool(getattr(task, CLAIMS_START, False))


def _no_such_queue(exc: Exception) -> bool:
    """Whether a passive queue declaration failed because the broker has no such queue (AMQP's 404, which
    kombu's virtual transports such as Redis give too), not for want of a broker."""
    return getattr(exc, "code", None) == 404 or getattr(exc, "reply_code", None) == 404 or "NOT_FOUND" in str(exc)


class Redeliverer:
    """Finds and publishes again the lost dispatched children of one store's stalled operations."""

    def __init__(self, app: Celery, store: SpawnStore, publisher: Publisher, after_seconds: float,
                 tracker: Tracker, limit: int = 3) -> None:
        self.app = app
        self.store = store
        self.publisher = publisher
        self.after_seconds = after_seconds
        self.tracker = tracker
        self.limit = limit

    def redeliver(self, after_seconds: float | None = None, limit: int = 50) -> int:
        """Publish again the lost children of up to ``limit`` stalled operations; returns how many.

        ``after_seconds`` defaults to the app's ``spawn_redeliver_after``; 0
        turns redelivery off. Safe from every worker at once: the children
        are leased (their ``dispatched_at`` refreshed, rows locked with
        ``SKIP LOCKED`` where the database has it) before they are published.
        """
        after = self.after_seconds if after_seconds is None else after_seconds
        if isinstance(after, bool) or not isinstance(after, (int, float)) or not 0 <= after < math.inf:
            raise ValueError(f"after_seconds must be a number of seconds, not {after!r}")
        if not after:
            return 0
        cutoff = utcnow() - timedelta(seconds=after)
        published = 0
        idle: dict[str | None, bool] = {}  # queue -> holds no ready message (asked once per sweep)
        for operation_id in self.store.stalled_operations(cutoff, limit):
            try:
                published += self._redeliver_operation(operation_id, cutoff, idle)
            except Exception as exc:  # one bad operation must not strand the others
                logger.error("redelivery for operation %s failed: %s", operation_id, exc)
        try:
            published += self.take_over_orphans(cutoff, limit)
        except Exception as exc:
            logger.error("redelivery of children whose worker is gone failed: %s", exc)
        return published

    def take_over_orphans(self, cutoff: datetime, limit: int = 50) -> int:
        """Publish again, marked recovered, started children whose run is gone; returns how many.

        A child whose whole worker died while it ran is ``started`` in the
        store, and its message should come back from the broker (``acks_late``)
        to a copy that takes the run over. Should the broker have lost that
        message too, nothing would: so a child started before ``cutoff``, in
        an operation that has not moved since, whose claiming process its
        worker no longer lists (or whose worker answers no ``stats`` request),
        is sent again. The copy asks the same question before it runs, so a
        run that only looked gone is not run beside itself. A task that does
        not ack late is not run again after its worker died, as in Celery:
        it ends ``lost``.
        """
        published = 0
        gone: dict[str | None, bool] = {}  # claim -> its run is known to be gone (asked once per sweep)
        for operation_id, claims in self.store.quiet_starts(cutoff, limit).items():
            for claim in claims:
                if claim not in gone:
                    gone[claim] = self._run_is_gone(claim)
            try:
                published += self._take_over(operation_id, [c for c in claims if c and gone[c]], cutoff)
            except Exception as exc:  # one bad operation must not strand the others
                logger.error("redelivery of the children of operation %s whose worker is gone failed: %s",
                             operation_id, exc)
        return published

    def _take_over(self, operation_id: str, gone: list[str], cutoff: datetime) -> int:
        again = []
        for row in self.store.lease_orphaned_starts(operation_id, gone, cutoff):
            reason = self._orphan_lost(row)
            if reason is None:
                again.append({**row, "recovered": True})
                continue
            self.tracker.finish(row["id"], LOST, reason, operation_id=operation_id)
            logger.error("child %s of operation %s is %s", row["id"], operation_id, reason)
        if again:
            self.publisher.publish(again)
            for row in again:
                logger.warning("published again child %s of operation %s: the run that started it (%s) is gone",
                               row["id"], operation_id, row["worker"])
        return len(again)

    def _run_is_gone(self, claimed_by: str | None) -> bool:
        """Whether the run recorded as ``claimed_by`` (``nodename/pid``) is known to be gone (not: cannot tell)."""
        node, _, pid = (claimed_by or "").rpartition("/")
        if not node or not pid.isdigit():
            return False  # a start recorded outside a worker tells nothing about its run
        return self.tracker.liveness.process_of(node, int(pid)) is False

    def _orphan_lost(self, row: dict) -> str | None:
        """Why a started child whose run is gone cannot be sent again (it ends ``lost``), or None."""
        task = self.app.tasks.get(row["task_name"])
        acks_late = task.acks_late if task is not None else self.app.conf.task_acks_late
        if not acks_late:
            return "lost: its worker died while it ran, and its task does not ack late (it is not run again)"
        if not row["message"]:
            return "lost: its worker died while it ran, and no message is stored to send again"
        if row["redeliveries"] > self.limit:
            return f"lost: its worker died while it ran, and it was sent again {self.limit} times"
        return None

    def queue_is_idle(self, queue: str | None, missing_is_idle: bool = False) -> bool:
        """Whether the broker holds no message ready in ``queue`` (None: the default queue); False when
        it cannot tell. A child that waits there behind others is not lost, however long it waits.

        A queue the broker does not know holds nothing, but Redis knows only
        queues that hold a message, so "no such queue" is taken as idle only
        with ``missing_is_idle``: for messages whose every delivery claims its
        start (callbacks), where a copy sent too early costs nothing.
        """
        name = queue or self.app.conf.task_default_queue
        try:
            with self.app.connection_for_read() as conn:
                channel: Any = conn.default_channel
                ok = channel.queue_declare(queue=name, passive=True)
        except Exception as exc:  # no such queue, or no broker: it cannot tell
            logger.debug("could not size queue %s: %s", name, exc)
            return missing_is_idle and _no_such_queue(exc)
        return not getattr(ok, "message_count", 1)

    def _redeliver_operation(self, operation_id: str, cutoff, idle: dict[str | None, bool]) -> int:
        for queue in self.store.waiting_queues(operation_id, cutoff):
            if queue not in idle:
                idle[queue] = self.queue_is_idle(queue)
        rows = self.store.lease_lost_children(operation_id, cutoff,
                                              idle_queues=[queue for queue, empty in idle.items() if empty])
        again = [{**r, "recovered": True} for r in rows if r["message"] and r["redeliveries"] <= self.limit]
        for row in rows:
            if not row["message"] or row["redeliveries"] > self.limit:
                reason = (f"lost: its message was sent again {self.limit} times and never started"
                          if row["message"] else "lost: the broker lost its message and none is stored to send again")
                self.tracker.finish(row["id"], LOST, reason, operation_id=row["operation_id"])
                logger.error("child %s of operation %s is %s", row["id"], operation_id, reason)
        if not again:
            return 0
        self.publisher.publish(again)
        logger.warning("published again %d children of operation %s that no worker started (lost by the broker?)",
                       len(again), operation_id)
        return len(again)
