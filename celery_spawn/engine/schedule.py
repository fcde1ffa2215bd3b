"""Publishing scheduled children when they are due.

A delayed child (``spawn_delay``, or its own ``countdown``/``eta``) is
recorded ``scheduled`` with a ``not_before`` time instead of being published
with a countdown: the store holds the wait, not a worker's memory, so the
delay survives restarts, cancels without a revoke, and never outlasts a
broker's visibility timeout (after which Redis would deliver it again). Each
worker's scheduler publishes what is due, in pages; the rows of a page are
locked while it is published and marked, so two workers never both send one.
"""
from __future__ import annotations

import logging
from datetime import datetime
from typing import TYPE_CHECKING

from ..store import utcnow

if TYPE_CHECKING:
    from ..store import SpawnStore
    from .publisher import Publisher

logger = logging.getLogger("celery_spawn.schedule")

#: Scheduled children published per transaction at most.
DUE_PAGE = 500


class Scheduler:
    """Publishes one store's due scheduled children through one publisher."""

    def __init__(self, store: SpawnStore, publisher: Publisher, page_size: int = DUE_PAGE) -> None:
        self.store = store
        self.publisher = publisher
        self.page_size = page_size

    def publish_due(self, now: datetime | None = None) -> int:
        """Publish every scheduled child due by ``now`` (default: the current time); returns how many.

        A page whose publishing fails is rolled back: its children stay
        scheduled, and the next call tries them again.
        """
        now = now or utcnow()
        published = 0
        while True:
            with self.store.begin() as conn:
                due = self.store.due_scheduled(conn, now, self.page_size)
                if not due:
                    break
                sent = self.publisher.publish(due)
                self.store.mark_scheduled_dispatched(conn, sent, utcnow())
            published += len(sent)
            if len(due) < self.page_size:
                break
        if published:
            logger.info("published %d scheduled children that were due", published)
        return published

    def next_due(self) -> datetime | None:
        """When the soonest scheduled child is due (None: nothing is scheduled)."""
        with self.store.read() as conn:
            return self.store.next_due(conn)
