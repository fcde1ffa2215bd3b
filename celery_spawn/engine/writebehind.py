"""Write-behind for tracking: a worker process's child events, written in batches off the task's path.

A commit per child start and per finish costs more than a small task
itself. Inside a worker, events are queued instead and one thread per
process writes whatever has gathered, in one transaction: the busier the
worker, the bigger the batches, and an idle worker writes each event at
once (a dependency hop waits for no timer).

What a crash can lose is what was queued and not yet written (a few
milliseconds of events): the recovery sweep reads lost outcomes back from
the result backend, as it does for a pool process killed before the signal.
"""
from __future__ import annotations

import collections
import logging
import os
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, NamedTuple, Sequence, cast

from .. import metrics
from ..errors import StoreError
from ..protocol import SUCCEEDED
from ..store import Finish, utcnow

if TYPE_CHECKING:
    from datetime import datetime

    from .tracker import HeldRelease, Tracker

logger = logging.getLogger("celery_spawn.tracking")

#: Events waiting that tell a busy worker (a chain of dependent children queues two or three at most).
BUSY = 4
#: Seconds a start waits for its job's finish to be written with it.
START_DELAY = 0.05
#: Seconds a busy write-behind waits to gather a bigger batch.
LINGER = 0.05
#: Seconds between completion probes of a write-behind that never goes quiet.
CHECK_INTERVAL = 0.5
#: Seconds without events after which the finished operations are probed for completion.
QUIET = 0.02
#: Events written in one transaction at most.
MAX_BATCH = 500
#: Events kept while the store is unreachable; beyond that the oldest are dropped (and logged).
MAX_QUEUED = 200_000
#: Batches in a row whose finishes released nothing in an operation, after which this process stops reading
#: ahead what that operation's finishes release (a fan-out's children release nothing; a chain's steps do).
QUIET_RELEASES = 2
#: Operations whose releases this process remembers, at most (the oldest are forgotten first).
REMEMBERED_OPERATIONS = 1024
#: Seconds between attempts while the store is unreachable (doubling up to the last).
RETRY_DELAYS = (0.2, 0.5, 1.0, 2.0, 5.0)

START, FINISH, RETRY = "start", "finish", "retry"
#: A claim this process could not confirm, of an attempt that has ended: let go once the store answers.
UNCLAIM = "unclaim"
_NEVER = 1 << 62


@dataclass
class Event:
    kind: str
    job_id: str
    at: datetime = field(default_factory=utcnow)
    state: str | None = None
    error: str | None = None
    operation_id: str | None = None
    started_at: datetime | None = None
    queued: float = field(default_factory=time.monotonic)


class WriteBehind:
    """The queue of one process's tracking events and the thread that writes them."""

    def __init__(self, tracker: Tracker) -> None:
        self.tracker = tracker
        self._events: deque[Event] = deque()
        self._wake = threading.Condition()
        self._idle = threading.Event()
        self._idle.set()
        self._thread: threading.Thread | None = None
        self._unchecked: set[str] = set()
        self._next_check = 0.0
        # What wakes the waiting writer (set only while it waits): a wake-up per event would cost
        # the task thread a GIL hand-over for every event of a busy worker.
        self._wake_at = _NEVER
        self._finish_wakes = False
        # Whether events came in while the last batch was written, and it released nothing:
        # events flowing, not a chain (nor the first step of one).
        self._flowing = False
        # Whether the last batch released a dependent: its start may come here soon (see Tracker.end_spare).
        self._released = False
        # Children this writer published and has not marked dispatched yet (written with the next batch).
        self._marks: list[str] = []
        # What the success of the job whose lone start waits for its finish will release, read and
        # locked while that job runs (see Tracker.hold_release), and the last job it was tried for.
        self._held: HeldRelease | None = None
        self._held_for: str | None = None
        # The last job whose release was read while it ran and found nothing: its finish alone reads no more.
        self._released_nothing: str | None = None
        self.releases = ReleaseMemory()

    def add(self, event: Event) -> None:
        with self._wake:
            if len(self._events) >= MAX_QUEUED:
                lost = self._events.popleft()
                metrics.tracking_event_dropped()
                logger.error("celery-spawn dropped the %s of job %s: %d tracking events wait for the store",
                             lost.kind, lost.job_id, MAX_QUEUED)
            self._events.append(event)
            if self._idle.is_set():
                self._idle.clear()
            if len(self._events) >= self._wake_at or (self._finish_wakes and event.kind != START):
                self._wake.notify()
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(target=self._run, name="celery-spawn-write-behind", daemon=True)
                self._thread.start()

    def flush(self, timeout: float = 10.0) -> bool:
        """Wait until everything queued is written (worker shutdown); False if it did not finish in time."""
        with self._wake:
            self._wake.notify()
        return self._idle.wait(timeout)

    def _take(self) -> list[Event]:
        with self._wake:
            while not self._events:
                if not self._unchecked and not self._marks and not self._released:
                    self._idle.set()
                    self._wait(None, wake_at=1)
                elif not self._wait(QUIET, wake_at=1):
                    self._released = False
                    self.tracker.end_spare()  # no next step came: its connection goes back to the pool
                    return []  # quiet for a moment: time to mark what was published, check what finished
            while len(self._events) < BUSY and all(e.kind == START for e in self._events):
                # Only starts: wait a little for their finishes, so that a short task costs one
                # row update, and a dependent's release does not queue behind a start.
                left = self._events[0].queued + START_DELAY - time.monotonic()
                if left <= 0:
                    break
                lone = self._events[0]
                if (len(self._events) == 1 and self._held is None and self._held_for != lone.job_id
                        and self.releases.expected(lone.operation_id)):
                    self._hold_release(lone.job_id)
                    continue
                self._wait(left, wake_at=BUSY, finish_wakes=True)
            if LINGER and (len(self._events) >= BUSY or self._flowing):
                # Busy: a moment more gathers a bigger batch (an idle worker, or one whose
                # finishes release the next steps of a chain, writes at once).
                deadline = time.monotonic() + LINGER
                while len(self._events) < MAX_BATCH and (left := deadline - time.monotonic()) > 0:
                    self._wait(left, wake_at=MAX_BATCH)
            count = min(len(self._events), MAX_BATCH)
            metrics.tracking_queue_depth(len(self._events) - count)
            return [self._events.popleft() for _ in range(count)]

    def _hold_release(self, job_id: str) -> None:
        """While a lone job runs, read and lock what its success releases (called holding ``_wake``,
        which the read does not hold: the task thread queues the finish meanwhile)."""
        self._held_for = job_id
        self._wake.release()
        try:
            self._held = self.tracker.hold_release(job_id)
            self._released_nothing = job_id if self._held is None else None
        except Exception as exc:  # an optimisation: the finish does it the usual way
            logger.debug("celery-spawn could not read ahead what %s releases: %s", job_id, exc)
        finally:
            self._wake.acquire()

    def _wait(self, timeout: float | None, wake_at: int, finish_wakes: bool = False) -> bool:
        """Wait (holding ``_wake``) until ``wake_at`` events are queued, a finish if ``finish_wakes``, or timeout."""
        self._wake_at, self._finish_wakes = wake_at, finish_wakes
        try:
            return self._wake.wait(timeout)
        finally:
            self._wake_at, self._finish_wakes = _NEVER, False

    def _run(self) -> None:
        while True:
            batch = self._take()
            if batch or self._marks:
                written = self._write_until_done(batch)
                self._released = bool(written.released)
                self._marks = list(written.unmarked)
                self._unchecked.update(written.touched)
                if batch:  # (marks alone say nothing of how events flow)
                    self._flowing = bool(self._events) and not written.released
            if self._unchecked and (not batch or time.monotonic() >= self._next_check):
                self._check_completions()

    def _check_completions(self) -> None:
        """Completion probes, once per operation for every batch written since the last check.

        A probe reads an index that finishing rows keep busy, and while events
        keep coming it finds work still running. So probes run when the events
        pause for QUIET (an operation's last finish is followed by such a
        pause, in this process or in the one that writes it) and, under
        unbroken load, every CHECK_INTERVAL.
        """
        operations, self._unchecked = self._unchecked, set()
        self._next_check = time.monotonic() + CHECK_INTERVAL
        for operation_id in operations:
            try:
                self.tracker.check_completion(operation_id)
            except Exception as exc:  # keep it, and look again after a pause
                logger.error("celery-spawn could not check operation %s for completion: %s", operation_id, exc)
                self._unchecked.add(operation_id)
        if self._unchecked:
            time.sleep(RETRY_DELAYS[-1])

    def _write_until_done(self, batch: list[Event]) -> Written:
        attempt = 0
        published: set[str] = set()  # published ahead by a failed attempt: a retry marks them, not publishes
        held, self._held = self._held, None
        # (once per batch, not per attempt)
        read_ahead = (self.releases.expected_in(batch)
                      and {e.job_id for e in _successes(batch)} != {self._released_nothing})
        while True:
            try:
                written = write_events(self.tracker, batch, self._marks, published, held, read_ahead=read_ahead)
                self.releases.learn(batch, written.touched)
                return written
            except StoreError as exc:
                held = None  # (used or ended by the failed attempt)
                delay = RETRY_DELAYS[min(attempt, len(RETRY_DELAYS) - 1)]
                if attempt == 0 or delay == RETRY_DELAYS[-1]:
                    logger.error("celery-spawn could not record %d tracking events (retrying in %gs): %s",
                                 len(batch), delay, exc)
                attempt += 1
                _pause(delay)
            except Exception as exc:  # a bug must not kill the thread and strand every later event
                logger.exception("celery-spawn lost %d tracking events: %s", len(batch), exc)
                return Written(set(), 0, ())


def _pause(seconds: float) -> None:
    """Wait before a retry. A sleep that fails (``EINVAL`` from a wrapped ``clock_nanosleep``, as under
    libfaketime) ends the wait early instead of the writer thread, which would take its batch with it."""
    try:
        time.sleep(seconds)
    except OSError as exc:
        logger.debug("celery-spawn could not sleep %gs before a retry: %s", seconds, exc)


class Written(NamedTuple):
    """What :func:`write_events` did."""

    #: Operations whose jobs finished: the caller probes them for completion.
    touched: set[str]
    #: Dependents the finishes released (and published).
    released: int
    #: Ids of those published, to be marked dispatched with the next batch.
    unmarked: Sequence[str]


def _successes(events: Sequence[Event]) -> list[Event]:
    return [e for e in events if e.kind == FINISH and e.state == SUCCEEDED]


class ReleaseMemory:
    """Which operations' finishes in this process have lately released nothing.

    Reading ahead what a success releases (PostgreSQL) takes a dependency
    hop's next step off the write's path, and costs a round trip that a
    fan-out's children, which release nothing, pay for nothing. After
    QUIET_RELEASES batches in a row with no release in an operation, its
    finishes skip that read; any release there turns it back on. Only
    speed depends on it: a finish always releases its dependents.
    """

    def __init__(self) -> None:
        self._quiet: collections.OrderedDict[str, int] = collections.OrderedDict()

    def expected(self, operation_id: str | None) -> bool:
        """Whether a finish in ``operation_id`` may release something (unknown: yes)."""
        return operation_id is None or self._quiet.get(operation_id, 0) < QUIET_RELEASES

    def expected_in(self, events: Sequence[Event]) -> bool:
        """Whether any success among ``events`` may release something."""
        return any(self.expected(e.operation_id) for e in _successes(events))

    def learn(self, events: Sequence[Event], quiet: set[str]) -> None:
        """After a write: ``quiet`` holds the operations whose finishes there released nothing."""
        for operation_id in {e.operation_id for e in events if e.kind == FINISH and e.operation_id}:
            count = self._quiet.pop(operation_id, 0) + 1 if operation_id in quiet else 0
            self._quiet[operation_id] = count
        while len(self._quiet) > REMEMBERED_OPERATIONS:
            self._quiet.popitem(last=False)


def write_events(tracker: Tracker, events: list[Event], marks: Sequence[str] = (),
                 published: set[str] | None = None, held: HeldRelease | None = None,
                 read_ahead: bool = True) -> Written:
    """Apply events in order, a run of distinct jobs at a time (a job's events never reorder).

    A start followed by its job's finish in the same batch is folded into
    that finish: one row update instead of two. ``marks`` (children published
    by the previous batch) are marked dispatched in the first finish's
    transaction, or on their own. A child published here is marked by the
    next batch: a chain's next step is on its way while its mark waits, and
    a mark that a crash loses only makes the sweep publish it again.
    ``published`` collects what was published ahead of the finishes'
    writes (see :meth:`Tracker.finish_batch`), across retries of a batch.
    ``held`` goes to the finish when the batch is its job's finish alone
    (see :meth:`Tracker.finish_batch`), and is ended before anything is
    written otherwise (its locks would stall this batch's own writes).
    """
    folded = _fold_starts(events)
    if held is not None and not (len(folded) == 1 and folded[0].kind == FINISH and folded[0].job_id == held.job_id):
        held.abandon()
        held = None
    try:
        return _write_runs(tracker, folded, marks, published, held, read_ahead)
    finally:
        if held is not None:
            held.abandon()  # (a no-op once the finish took it)


def _write_runs(tracker: Tracker, folded: list[Event], marks: Sequence[str], published: set[str] | None,
                held: HeldRelease | None, read_ahead: bool = True) -> Written:
    touched: set[str] = set()
    released = 0
    unmarked: list[str] = []
    for run in _runs_of_distinct_jobs(folded):
        starts = [e for e in run if e.kind == START]
        retries = [e for e in run if e.kind == RETRY]
        finishes = [e for e in run if e.kind == FINISH]
        if starts:
            tracker.start_many([(e.job_id, e.at) for e in starts])
        for event in retries:
            tracker.retried(event.job_id, event.error)
        for event in run:
            if event.kind == UNCLAIM:
                tracker.free_claim(event.job_id)
        if finishes:
            finished = tracker.finish_batch([Finish(e.job_id, cast(str, e.state), e.error, e.at, e.started_at)
                                             for e in finishes], marks=marks, defer_marks=True,
                                             published=published, held=held, read_ahead=read_ahead)
            marks, held = (), None
            touched.update(finished.to_check)
            released += finished.released
            unmarked.extend(finished.unmarked)
    if marks:
        tracker.store.mark_dispatched(marks)
    return Written(touched, released, unmarked)


def _fold_starts(events: list[Event]) -> list[Event]:
    folded: list[Event] = []
    open_starts: dict[str, int] = {}
    for event in events:
        if event.kind == START:
            open_starts[event.job_id] = len(folded)
        elif event.kind == FINISH and event.job_id in open_starts:
            start = folded[open_starts.pop(event.job_id)]
            event.started_at = start.at
            start.kind = "folded"
        else:
            open_starts.pop(event.job_id, None)
        folded.append(event)
    return [e for e in folded if e.kind != "folded"]


def _runs_of_distinct_jobs(events: list[Event]) -> list[list[Event]]:
    runs: list[list[Event]] = [[]]
    seen: set[str] = set()
    for event in events:
        if event.job_id in seen:
            runs.append([])
            seen = set()
        seen.add(event.job_id)
        runs[-1].append(event)
    return [run for run in runs if run]


# ---- one write-behind per tracker and process ------------------------------------------------
_in_worker = False
_queues: dict[tuple[int, int], WriteBehind] = {}
_lock = threading.Lock()


def enable_in_this_process() -> None:
    """Called in the processes that run tasks: pool processes, or the worker itself (solo, threads)."""
    global _in_worker
    _in_worker = True


def enabled_in_this_process() -> bool:
    """Whether this process queues its tracking events (it runs, or ran, a worker's tasks)."""
    return _in_worker


def disable_in_this_process() -> None:
    """Write what is queued, then write tracking events synchronously again.

    For a test process whose in-thread worker stopped: the eager runs of the
    tests after it read their tree right after they return.
    """
    global _in_worker
    flush_all()
    _in_worker = False


def queue_for(tracker: Tracker) -> WriteBehind | None:
    """This process's write-behind for ``tracker``, or None to write synchronously (outside workers)."""
    if not _in_worker or not tracker.settings.batch_tracking:
        return None
    key = (os.getpid(), id(tracker))
    queue = _queues.get(key)
    if queue is None or queue.tracker is not tracker:
        with _lock:
            queue = _queues.get(key)
            if queue is None or queue.tracker is not tracker:
                queue = _queues[key] = WriteBehind(tracker)
    return queue


def flush_all(timeout: float = 10.0) -> None:
    """Write every queued event of this process (at worker and pool-process shutdown)."""
    pid = os.getpid()
    for (owner, _), queue in list(_queues.items()):
        if owner == pid and not queue.flush(timeout):
            logger.error("celery-spawn shut down with tracking events unwritten; the recovery sweep "
                         "reconciles them from the result backend")


def submit(tracker: Tracker, event: Event, write_now: Callable[[], Any]) -> None:
    """Queue ``event`` in a worker, or call ``write_now`` outside one."""
    queue = queue_for(tracker)
    if queue is None:
        write_now()
    else:
        queue.add(event)
