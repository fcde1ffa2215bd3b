"""Purging finished trees older than a cutoff, in short batches, so spawns and tracking go on meanwhile.

The cutoff is taken on the store's clock (the database server's), as every
other age the store compares.
"""
from __future__ import annotations

import dataclasses
import logging
import time
from datetime import datetime, timedelta
from typing import TYPE_CHECKING, Any, Callable, TypeVar

from ..settings import DEFAULT_PURGE_BATCH_SIZE, DEFAULT_PURGE_PAUSE_RATIO
from ..store import utcnow

if TYPE_CHECKING:
    from ..store import SpawnStore

logger = logging.getLogger("celery_spawn.retention")

_T = TypeVar("_T")

DEFAULT_BATCH_SIZE = DEFAULT_PURGE_BATCH_SIZE
DEFAULT_PAUSE_RATIO = DEFAULT_PURGE_PAUSE_RATIO
#: The longest rest after one step, in seconds: a step slowed by a stall does not stop the purge for long.
MAX_PAUSE = 5.0


class Pace:
    """Rests after each step of a purge for ``ratio`` times as long as the step took.

    A purge at full speed keeps the database and a core busy, and every spawn
    and tracking write beside it waits its turn; resting in proportion to the
    work leaves them a fixed share of the time, on a fast server as on a slow
    one. ``ratio`` 0 runs flat out; 1 purges at about half its full speed.
    """

    def __init__(self, ratio: float, sleep: Callable[[float], None] | None = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        if not ratio >= 0:  # NaN too
            raise ValueError(f"pause ratio must be 0 or more, not {ratio}")
        self.ratio, self._sleep, self._clock = ratio, sleep or time.sleep, clock
        self.rested = 0.0

    def step(self, work: Callable[..., _T], *args: Any, **kwargs: Any) -> _T:
        """``work(*args, **kwargs)``, then the rest it earns."""
        begin = self._clock()
        result = work(*args, **kwargs)
        rest = min(MAX_PAUSE, self.ratio * (self._clock() - begin))
        if rest > 0:
            self._sleep(rest)
            self.rested += rest
        return result


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
              pause_ratio: float = DEFAULT_PAUSE_RATIO,
              progress: Callable[[int], None] | None = None) -> PurgeReport:
        """Remove the expired trees (or count them, with ``dry_run``).

        Each transaction deletes at most ``batch_size`` jobs; ``progress`` is
        called with the jobs each one deleted. After each query or batch the
        purge rests ``pause_ratio`` times as long as it took (see :class:`Pace`).
        """
        if batch_size < 1:
            raise ValueError(f"batch size must be 1 or more, not {batch_size}")
        pace = Pace(pause_ratio)
        if dry_run:
            return self.plan(older_than)[0]
        report = PurgeReport(self.cutoff(older_than), dry_run=False)
        after: str | None = None
        while True:
            roots, after = pace.step(self.store.expired_roots, report.cutoff, after=after)
            self._delete(roots, report, batch_size, pace, progress)
            if after is None:
                break
        if report.trees:
            logger.info("purged %d finished trees (%d operations, %d jobs) finished before %s",
                        report.trees, report.operations, report.jobs, report.cutoff.isoformat())
        return report

    def _delete(self, roots: list[str], report: PurgeReport, batch_size: int, pace: Pace,
                progress: Callable[[int], None] | None) -> None:
        while roots:
            deleted = pace.step(self.store.delete_trees, roots, report.cutoff, batch_size)
            report.trees += deleted.trees
            report.operations += deleted.operations
            report.jobs += deleted.jobs
            report.edges += deleted.edges
            if progress is not None and deleted.jobs:
                progress(deleted.jobs)
            roots = deleted.remaining


def purge(store: SpawnStore, expires: float, older_than: timedelta | float | str | None = None, *,
          batch_size: int = DEFAULT_BATCH_SIZE, dry_run: bool = False,
          pause_ratio: float = DEFAULT_PAUSE_RATIO) -> dict[str, Any]:
    """:meth:`Purger.purge` with ``older_than`` in any form :func:`parse_duration` reads, else ``expires``
    seconds (0: nothing expires, nothing is purged). Returns :meth:`PurgeReport.as_dict`."""
    from ..settings import parse_duration

    seconds = expires if older_than is None else parse_duration(older_than)
    if older_than is None and not seconds:
        return {"cutoff": None, "dry_run": dry_run, "trees": 0, "operations": 0, "jobs": 0, "dependencies": 0}
    return Purger(store).purge(timedelta(seconds=seconds), batch_size=batch_size, dry_run=dry_run,
                               pause_ratio=pause_ratio).as_dict()
