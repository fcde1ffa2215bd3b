"""Purging finished trees older than a cutoff, in short batches, so spawns and tracking go on meanwhile.

The cutoff is taken on the store's clock (the database server's), as every
other age the store compares.
"""
from __future__ import annotations

import dataclasses
import logging
from datetime import datetime, timedelta
from typing import TYPE_CHECKING, Any, Callable

from ..store import utcnow

if TYPE_CHECKING:
    from ..store import SpawnStore

logger = logging.getLogger("celery_spawn.retention")

#: Jobs deleted per transaction unless told otherwise.
DEFAULT_BATCH_SIZE = 2000


@dataclasses.dataclass
class PurgeReport:
    """What a purge removed (or, with ``dry_run``, would remove)."""

    cutoff: datetime
    dry_run: bool
    trees: int = 0
    operations: int = 0
    jobs: int = 0
    edges: int = 0

    def as_dict(self) -> dict[str, Any]:
        return {"cutoff": self.cutoff.isoformat() + "Z", "dry_run": self.dry_run, "trees": self.trees,
                "operations": self.operations, "jobs": self.jobs, "dependencies": self.edges}


class Purger:
    """Deletes finished trees whose last operation finished before a cutoff."""

    def __init__(self, store: SpawnStore) -> None:
        self.store = store

    def cutoff(self, older_than: timedelta) -> datetime:
        return utcnow() - older_than

    def plan(self, older_than: timedelta) -> tuple[PurgeReport, list[str]]:
        """What a purge would remove now: the counts, and the roots of the trees."""
        report = PurgeReport(self.cutoff(older_than), dry_run=True)
        roots: list[str] = []
        after: str | None = None
        while True:
            page, after = self.store.expired_roots(report.cutoff, after=after)
            roots.extend(page)
            if after is None:
                break
        report.trees = len(roots)
        report.operations, report.jobs = self.store.tree_sizes(roots)
        return report, roots

    def purge(self, older_than: timedelta, *, batch_size: int = DEFAULT_BATCH_SIZE, dry_run: bool = False,
              progress: Callable[[int], None] | None = None) -> PurgeReport:
        """Remove the expired trees (or count them, with ``dry_run``).

        Each transaction deletes at most ``batch_size`` jobs; ``progress`` is
        called with the jobs each one deleted.
        """
        if batch_size < 1:
            raise ValueError(f"batch size must be 1 or more, not {batch_size}")
        if dry_run:
            return self.plan(older_than)[0]
        report = PurgeReport(self.cutoff(older_than), dry_run=False)
        after: str | None = None
        while True:
            roots, after = self.store.expired_roots(report.cutoff, after=after)
            self._delete(roots, report, batch_size, progress)
            if after is None:
                break
        if report.trees:
            logger.info("purged %d finished trees (%d operations, %d jobs) finished before %s",
                        report.trees, report.operations, report.jobs, report.cutoff.isoformat())
        return report

    def _delete(self, roots: list[str], report: PurgeReport, batch_size: int,
                progress: Callable[[int], None] | None) -> None:
        while roots:
            deleted = self.store.delete_trees(roots, report.cutoff, batch_size)
            report.trees += deleted.trees
            report.operations += deleted.operations
            report.jobs += deleted.jobs
            report.edges += deleted.edges
            if progress is not None and deleted.jobs:
                progress(deleted.jobs)
            roots = deleted.remaining


def purge(store: SpawnStore, expires: float, older_than: timedelta | float | str | None = None, *,
          batch_size: int = DEFAULT_BATCH_SIZE, dry_run: bool = False) -> dict[str, Any]:
    """:meth:`Purger.purge` with ``older_than`` in any form :func:`parse_duration` reads, else ``expires``
    seconds (0: nothing expires, nothing is purged). Returns :meth:`PurgeReport.as_dict`."""
    from ..settings import parse_duration

    seconds = expires if older_than is None else parse_duration(older_than)
    if older_than is None and not seconds:
        return {"cutoff": None, "dry_run": dry_run, "trees": 0, "operations": 0, "jobs": 0, "dependencies": 0}
    return Purger(store).purge(timedelta(seconds=seconds), batch_size=batch_size, dry_run=dry_run).as_dict()
