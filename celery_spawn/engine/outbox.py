"""Persist, then publish: sending an operation's recorded children, a page at a time.

A spawn records its children first; this sends those that have not reached
the broker: first the ones recorded ``dispatched`` after the operation's
publish watermark, then ``pending`` ones (released from dependencies, or
put back after a broker failure). The spawn itself, the recovery sweep and
nobody else call it.
"""
from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any, Iterable, Iterator

from kombu.utils.json import loads

from ..config import SpawnConfig
from ..errors import StoreError
from .children import describe

if TYPE_CHECKING:
    from ..store import SpawnStore
    from .publisher import Publisher

logger = logging.getLogger("celery_spawn.spawner")

#: Children published per producer batch at least (small ``batch_size`` values only shape recording).
MIN_PUBLISH_PAGE = 500


def stored_batch_size(operation: dict) -> int:
    """The batch size an operation was recorded with; the default when its stored config is unreadable."""
    try:
        return SpawnConfig.from_dict(_loads(operation["config"]) or {}).batch_size
    except Exception:  # recorded under older rules, or damaged: publishing must go on
        return SpawnConfig().batch_size


class Outbox:
    """Publishes what one store holds recorded and unpublished, through one publisher."""

    def __init__(self, store: SpawnStore, publisher: Publisher) -> None:
        self.store = store
        self.publisher = publisher

    def publish_pending(self, operation_id: str, page_size: int, operation: dict | None = None,
                        pending: bool = True, recorded: list[dict] | None = None, recovered: bool = False) -> int:
        """Publish every child of an operation that has not reached the broker, a page at a time.

        First the children recorded ``dispatched`` after the operation's
        publish watermark (``published_through``, moved on once per page),
        then, unless ``pending`` is false, the ``pending`` ones (released from
        dependencies, or put back after a broker failure), marked one by one.
        ``operation`` (a row, or the id, watermark and total of one) saves
        reading it, and ``recorded`` (every child recorded ``dispatched``, by
        position, as the spawn just wrote them) reading them back. The
        recovery sweep sends ``recovered`` messages: a child may have gone out
        before, so it claims its start when it comes. Returns how many
        children were published.
        """
        page_size = max(page_size, MIN_PUBLISH_PAGE)
        if operation is None:
            with self.store.read() as conn:
                operation = self.store.get_operation(conn, operation_id)
            if operation is None:
                return 0
        watermark, total = operation.get("published_through"), operation["total"]
        published = 0
        if watermark is not None and watermark < total - 1:
            count, complete = self._publish_recorded(operation_id, watermark, total, page_size, recorded, recovered)
            published += count
            if not complete:
                return published
        if pending:
            published += self._publish_pending_rows(operation_id, page_size, recovered)
        return published

    def _publish_recorded(self, operation_id: str, watermark: int, total: int, page_size: int,
                          recorded: list[dict] | None = None, recovered: bool = False) -> tuple[int, bool]:
        """Publish the children recorded ``dispatched`` after ``watermark``; returns (count, finished)."""
        if recorded is not None:
            pages: Iterable[list[dict]] = (recorded[i:i + page_size] for i in range(0, len(recorded), page_size))
        else:
            pages = self._unpublished_pages(operation_id, watermark, page_size)
        published = 0
        after = watermark
        for page in pages:
            if page:
                try:
                    self.publisher.publish(_marked(page, recovered))
                except Exception as exc:  # broker trouble: back to pending, for the recovery sweep
                    logger.warning("publishing children of %s failed (%s); the recovery sweep will retry",
                                   operation_id, describe(exc))
                    self._unpublish(operation_id, after)
                    return published, False
                published += len(page)
            # A short page is the last one: nothing recorded dispatched lies beyond it.
            after = page[-1]["position"] if len(page) == page_size else total - 1
            self.store.advance_watermark(operation_id, after)
        if after < total - 1:
            self.store.advance_watermark(operation_id, total - 1)
        return published, True

    def _unpublished_pages(self, operation_id: str, after: int, page_size: int) -> Iterator[list[dict]]:
        while True:
            with self.store.read() as conn:
                page = self.store.unpublished_page(conn, operation_id, after, page_size)
            yield page
            if len(page) < page_size:
                return
            after = page[-1]["position"]

    def _unpublish(self, operation_id: str, after: int) -> None:
        try:
            self.store.unpublish(operation_id, after)
        except StoreError as exc:  # the watermark still tells the sweep where publishing stopped
            logger.warning("could not mark the unpublished children of %s pending: %s", operation_id, exc)

    def _publish_pending_rows(self, operation_id: str, page_size: int, recovered: bool = False) -> int:
        """Publish pending (not held) children, marking each published one dispatched."""
        published = 0
        after = -1
        while True:
            with self.store.read() as conn:
                page = self.store.pending_page(conn, operation_id, after, page_size)
            if not page:
                return published
            after = page[-1]["position"]
            try:
                ids = self.publisher.publish(_marked(page, recovered))
            except Exception as exc:  # broker trouble: the recovery sweep publishes them later
                logger.warning("publishing children of %s failed (%s); the recovery sweep will retry",
                               operation_id, describe(exc))
                return published
            self.store.mark_dispatched(ids)
            self.store.touch_operation(operation_id)
            published += len(ids)

    # ---- reporting ---------------------------------------------------------------------


def _marked(page: list[dict], recovered: bool) -> list[dict]:
    """The page's rows, each marked ``recovered`` when the recovery sweep sends them."""
    if recovered:
        for row in page:
            row["recovered"] = True
    return page


def _loads(raw: str | None) -> Any:
    return loads(raw) if raw else None
