"""The life of spawned jobs after dispatch: worker events, then store transitions, then what they released
is published.

Every transition is guarded in the store, so a signal that fires twice, a
redelivered message or two workers racing change a row once, and only the
winner of that change acts on it (publishes released dependents, probes
completion). Inside a worker the events reach :class:`Tracker` in batches
from the write-behind (:mod:`celery_spawn.engine.writebehind`).
"""
from __future__ import annotations

import logging
import threading
import sys
from typing import TYPE_CHECKING, Any, NamedTuple, NoReturn, Sequence, cast

from celery.exceptions import Ignore, Reject

from .. import metrics
from ..errors import StoreError
from ..protocol import FAILED, HEADER_DEFERRALS, REVOKED, STARTABLE, STARTED, SUCCEEDED, error_text, request_header
from . import copies
from .copies import Liveness, finished_here, is_copy, worker_identity
from ..store import Finish, utcnow
from ..store.clock import hold_if_ahead, server_eta
from .callbacks import CallbackClaims
from .completion import has_result_backend

if TYPE_CHECKING:
    from celery import Celery, Task

    from ..settings import SpawnSettings
    from ..store import SpawnStore
    from .cancel import Canceller
    from .completion import Completion
    from .publisher import Publisher

logger = logging.getLogger("celery_spawn.tracking")

#: The states a first delivery may start from (a job already started is claimed by another delivery).
_NOT_STARTED = tuple(state for state in STARTABLE if state != STARTED)
#: Seconds before a copy whose child runs elsewhere is looked at again; doubled at each look, up to
#: DEFER_MOST (under Redis's visibility timeout, so the delayed message is never restored early).
DEFER_FIRST = 1.0
DEFER_MOST = 60.0


def defer_countdown(deferrals: int, visibility_timeout: float | None = None) -> float:
    """Seconds until the next look at a copy already sent back ``deferrals`` times: doubling, up to
    DEFER_MOST and to half the broker's visibility timeout (a delayed message held longer is restored)."""
    most = min(DEFER_MOST, visibility_timeout / 2) if visibility_timeout else DEFER_MOST
    return min(most, DEFER_FIRST * 2 ** min(deferrals, 32))

#: Successes written together at most for which the dependents they release are published ahead of the write.
PUBLISH_AHEAD = 8


def may_publish_ahead(app: Celery) -> bool:
    """Whether a release may be published while its transaction holds row locks.

    Not in eager mode (the child would run at once and wait on those locks),
    nor on gevent or eventlet without a cooperative psycopg2 (psycogreen):
    a task greenlet waiting on such a lock there blocks the whole process,
    the greenlet holding it included.
    """
    if app.conf.task_always_eager:
        return False
    try:
        from psycopg2.extensions import get_wait_callback
    except ImportError:  # psycopg (3)
        get_wait_callback = None
    if get_wait_callback is not None and get_wait_callback() is not None:
        return True
    gevent_monkey = sys.modules.get("gevent.monkey")
    eventlet_patcher = sys.modules.get("eventlet.patcher")
    return not ((gevent_monkey is not None and gevent_monkey.is_module_patched("socket"))
                or (eventlet_patcher is not None and eventlet_patcher.is_monkey_patched("socket")))


class Finished(NamedTuple):
    """What :meth:`Tracker.finish_batch` did."""

    #: ``{job id: operation id}`` of the jobs this call moved to a final state.
    won: dict[str, str | None]
    #: Operations to probe for completion.
    to_check: list[str]
    #: Dependents released (and published) by these finishes.
    released: int
    #: With ``defer_marks``: the ids published and not yet marked ``dispatched``.
    unmarked: Sequence[str] = ()


class HeldRelease:
    """An open transaction holding the rows a running job's success will release, read and locked meanwhile.

    The write-behind opens one when a lone start waits for its finish
    (:meth:`Tracker.hold_release`): when the success comes, the next steps
    are published at once, and the finish is written and committed in this
    transaction (:meth:`Tracker.finish_batch`). Anything else ends it
    with :meth:`abandon`, which writes nothing.
    """

    def __init__(self, job_id: str, conn: Any, rows: list[dict]) -> None:
        self.job_id = job_id
        self.conn: Any = conn
        self.rows = rows

    def take(self) -> Any:
        """The connection, handed over once to the caller that ends its transaction."""
        conn, self.conn = self.conn, None
        if conn is None:
            raise RuntimeError(f"the held release of {self.job_id} was already ended")
        return conn

    def abandon(self) -> None:
        """Roll back (the locks go, nothing was written) and give the connection back to the pool."""
        conn, self.conn = self.conn, None
        if conn is not None:
            _close_quietly(conn)


def _close_quietly(conn: Any) -> None:
    try:
        conn.close()  # rolls back what is open
    except Exception as exc:  # a dead connection: the pool drops it
        logger.debug("closing a held tracking connection failed: %s", exc)


class Tracker:
    """Applies worker events to the store for one app, and publishes what they release."""

    def __init__(self, app: Celery, settings: SpawnSettings, store: SpawnStore, publisher: Publisher,
                 completion: Completion, canceller: Canceller) -> None:
        self.app = app
        self.settings = settings
        self.store = store
        self.publisher = publisher
        self.completion = completion
        self.canceller = canceller
        #: The recovery sweep's grace (seconds): how fresh a released child's operation lease must stay.
        self.grace = settings.recovery_grace
        #: ``nodename/pid`` of this process once it has run a spawned task (what its claims record).
        self.worker: str | None = None
        self.liveness = Liveness(app)
        self.callbacks = CallbackClaims(self)
        # Per thread: the connection a hop's finish kept, its next transaction begun (see finish_batch).
        self._spares = threading.local()

    # ---- job transitions -------------------------------------------------------------------
    def claim_start(self, job_id: str) -> bool:
        """Mark a job started; False when it has started or finished already (see :meth:`skip_duplicate`).

        A job the store does not know (not recorded here) may run.
        """
        return self._claim(job_id, _NOT_STARTED) is not False

    def _claim(self, job_id: str, startable: Sequence[str], taking_over: str | None = None) -> bool | None:
        """The store's claim; a store error leaves the claim unconfirmed in this process (its commit may
        have reached the store), to be let go once the attempt has ended (see :meth:`free_claim`)."""
        try:
            return self.store.claim_start(job_id, startable, self.worker, taking_over=taking_over)
        except StoreError:
            copies.claim_unconfirmed(job_id)
            raise

    def free_claim(self, job_id: str) -> None:
        """Let go of this process's claim of ``job_id`` whose commit it could not confirm, once that attempt
        ended (it waits for the store and retries): the retry, delivered to another process, would otherwise
        find the start claimed by a live sibling and be sent back again and again. A run of the job here
        now holds the claim: then nothing changes."""
        with copies.freeing(job_id) as free:
            if free and self.store.free_claim(job_id, self.worker):
                logger.warning("celery-spawn let go of the start of %s claimed by %s: the store failed as it "
                               "was claimed, and that attempt waits for its retry", job_id, self.worker)

    def retried(self, job_id: str, reason: Any) -> None:
        self.store.mark_retrying(job_id, error_text(reason))

    def succeeded(self, job_id: str, operation_id: str | None = None) -> None:
        self.finish(job_id, SUCCEEDED, operation_id=operation_id)

    def failed(self, job_id: str, error: Any, state: str = FAILED) -> None:
        self.finish(job_id, state, error_text(error))

    def start_many(self, starts: Sequence[tuple[str, Any]]) -> None:
        """Mark jobs started at their own times (the write-behind's batch)."""
        self.store.start_jobs(list(dict(starts).items()), STARTABLE, self.worker)

    def finish(self, job_id: str, state: str, error: str | None = None, operation_id: str | None = None) -> bool:
        """Move a job to a final state once; the winner releases or cancels its dependents (returns True)."""
        return bool(self.finish_many([Finish(job_id, state, error, utcnow())]))

    def finish_many(self, finishes: Sequence[Finish]) -> dict[str, str | None]:
        """Move jobs to final states, each once; returns ``{job id: operation id}`` of the jobs this call moved.

        Then checks each touched operation for completion (see :meth:`finish_batch`).
        """
        finished = self.finish_batch(finishes)
        for operation_id in finished.to_check:
            self.check_completion(operation_id)
        return finished.won

    def check_completion(self, operation_id: str) -> None:
        """Probe an operation (and the ones above it) for completion (the write-behind calls it when idle)."""
        self.completion.check(operation_id)

    def hold_release(self, job_id: str) -> HeldRelease | None:
        """While ``job_id`` runs, read and lock what its success will release (see :meth:`finish_batch`).

        None when it would release nothing, or where publishing ahead is
        off; a database error is only logged (the finish does it the usual way).
        """
        if not self.store.dialect.reads_releases_ahead or not may_publish_ahead(self.app):
            return None
        conn = self._take_spare()
        rows: list[dict] = []
        try:
            if conn is None:
                conn = self.store.transaction()
            rows = self.store.released_by(conn, [job_id])
        except Exception as exc:
            logger.debug("could not read ahead what %s releases: %s", job_id, exc)
        if conn is None or not rows:
            if conn is not None:
                _close_quietly(conn)
            return None
        return HeldRelease(job_id, conn, rows)

    def end_spare(self) -> None:
        """Give back the connection this thread kept from a hop's finish (no next step came for it)."""
        conn = self._take_spare()
        if conn is not None:
            _close_quietly(conn)

    def _take_spare(self) -> Any:
        conn = getattr(self._spares, "conn", None)
        self._spares.conn = None
        return conn

    def _keep_spare(self, conn: Any) -> None:
        self.end_spare()
        self._spares.conn = conn

    def finish_batch(self, finishes: Sequence[Finish], marks: Sequence[str] = (),
                     defer_marks: bool = False, published: set[str] | None = None,
                     held: HeldRelease | None = None, read_ahead: bool = True) -> Finished:
        """Finish jobs and publish what that releases (see :class:`Finished`).

        One transaction: the jobs still unfinished change, their dependents
        are released or cancelled. An operation that just released a child
        of its own cannot be complete, so it is not among those to check.
        ``marks`` (ids published earlier) are marked dispatched in the same
        transaction; ``defer_marks`` leaves the marks of what this call
        publishes to the caller (the write-behind writes them with its next
        batch, so that a chain's next step does not wait for them).

        Where the dialect reads releases ahead (PostgreSQL), a small batch of
        successes publishes the dependents it releases first, then writes: a
        dependency hop waits for one locked read, not for the write and its
        commit. ``published`` collects the ids so published; a caller that
        retries the same batch after an error passes the same set, so that a
        retry marks them instead of publishing them again. ``held`` (see
        :meth:`hold_release`) is used when this is its job's success alone,
        and ended otherwise: then the read was done while the job ran.
        ``read_ahead=False`` skips that read where the caller expects these
        finishes to release nothing (their dependents, if any, are then
        released and published after the write, as on other databases).
        """
        first = list({f.job_id: f for f in reversed(finishes)}.values())  # a job's first finish counts
        states = {f.job_id: f.state for f in first}
        published = set() if published is None else published
        ahead: list[dict] = []
        if held is not None and states != {held.job_id: SUCCEEDED}:
            held.abandon()
            held = None
        dialect = self.store.dialect
        # A hop's held transaction, once committed, begins the next: the released step's own read ahead,
        # likely in this thread, takes it instead of checking a connection out (see end_spare).
        with (self.store.begun(held.take(), keep=True) if held is not None else self.store.begin()) as conn:
            if dialect.succeeds_in_one_statement(len(first), len(marks),
                                                 all(state == SUCCEEDED for state in states.values())):
                # the common case: one round trip, or two with the next steps published between them
                if held is not None:
                    ahead = self._publish_ahead([r for r in held.rows if r["id"] not in published], published)
                elif read_ahead and len(first) <= PUBLISH_AHEAD and may_publish_ahead(self.app):
                    ahead = self._publish_ahead(self.store.released_by(conn, list(states), sorted(published)),
                                                published)
                changed = self.store.succeed_and_release(conn, first, marks, self.grace, sorted(published))
            else:
                if marks:
                    self.store.lock_jobs(conn, [*marks, *states])  # one lock order for marks and finishes
                    self.store.mark_dispatched_in(conn, marks)
                changed = self.store.finish_and_release(conn, first, self.grace)
        if held is not None:
            if changed.released or ahead:
                self._keep_spare(conn)
            else:
                _close_quietly(conn)
        self.canceller.revoke_jobs(changed.to_revoke)
        to_publish = changed.released
        unmarked = self._publish(to_publish, mark=not defer_marks)
        _count(first, changed.won, len(to_publish) + len(ahead), changed.to_revoke)
        busy = {row["operation_id"] for row in (*to_publish, *ahead)}
        return Finished(changed.won, [op for op in dict.fromkeys(changed.won.values()) if op and op not in busy],
                        len(to_publish) + len(ahead), unmarked)

    def _publish_ahead(self, rows: list[dict], published: set[str]) -> list[dict]:
        """Publish dependents about to be released, inside the releasing transaction (their rows locked);
        returns the rows published.

        A broker error leaves them to be released and published the usual
        way once the finishes are written.
        """
        if not rows:
            return []
        try:
            ids = set(self.publisher.publish(rows))
        except Exception as exc:
            logger.debug("publishing %d released jobs ahead failed (%s); they follow the write", len(rows), exc)
            return []
        published.update(ids)
        return [row for row in rows if row["id"] in ids]

    def _publish(self, rows: list[dict], mark: bool = True) -> list[str]:
        """Publish released rows; returns the ids published and left unmarked (``mark=False``)."""
        if not rows:
            return []
        try:
            ids = self.publisher.publish(rows)
        except Exception as exc:  # the recovery sweep publishes pending rows later
            logger.warning("publishing released jobs failed (%s); the recovery sweep will retry", exc)
            for operation_id in {r["operation_id"] for r in rows if r.get("operation_id")}:
                self.store.touch_operation(operation_id)
            return []
        if not mark:
            return ids
        self.store.mark_dispatched(ids)
        return []

    # ---- duplicates ------------------------------------------------------------------------
    def skip_duplicate(self, task: Task) -> None:
        """Claim a spawned child's start before its body runs, or raise Ignore for a copy that must not run.

        Every SpawnTask child claims; any other child claims when its message
        may be a copy (see :mod:`~celery_spawn.engine.copies`). A job already
        final is never run again. A job already started is run again by a
        copy, or by a Celery retry, only when the run that claimed it is gone
        (a crash, or the attempt before the retry in this same process); one
        that finds another live process's claim is sent again for a later look
        (:meth:`defer`) until the claim changes.
        """
        request = task.request
        job_id = cast(str, request.id)  # a running task has one
        self.worker = worker_identity(request.hostname) or self.worker
        if finished_here(job_id):
            # Its run here ended for good, and the store may not know yet (the write waits for it): a start
            # freed meanwhile by a late write, or this process's own claim, must not run it again.
            logger.warning("skipping %s[%s]: it already ran in this process (its outcome may not be written "
                           "yet)", task.name, request.id)
            raise Ignore()
        copy = is_copy(request)
        if copy and self.succeeded_before(task):
            # A copy (redelivered by the broker, or sent again by the sweep) of a run that succeeded before the
            # store heard of it (its worker died, or the store was out): record the success the signal would
            # have, and do not run the body again.
            self.finish(job_id, SUCCEEDED)
            logger.warning("skipping %s[%s]: a copy of a run that had succeeded (the result backend says so)",
                           task.name, request.id)
            raise Ignore()
        if self.claim_start(job_id):
            return
        # A Celery retry follows an attempt that has ended; a start it finds may still be that attempt's (its
        # retry not recorded yet), or a copy's that runs now (a message sent twice): the claim tells them apart.
        retry = bool(request.retries) and not copy
        if copy or retry:
            state, claimed_by = self.store.claim_of(job_id)
            runs = self.liveness.still_runs(claimed_by, job_id, request.hostname) if state == STARTED else True
            if runs is None:
                # Dropping it would strand the child should that run be gone; running it could run it twice.
                logger.warning("%s[%s] goes back to the broker: cannot tell whether the run that claimed it (%s) "
                               "goes on", task.name, request.id, claimed_by)
                raise Reject("the worker that claimed it cannot be asked", requeue=True)
            if state == STARTED and not runs:
                if self._claim(job_id, (STARTED,), taking_over=claimed_by):
                    if copy:
                        logger.warning("%s[%s] runs again: the run that claimed it (%s) is gone", task.name,
                                       request.id, claimed_by)
                    return
            if state == STARTED:
                # Another live process claimed it: a run that goes on, or an attempt that has ended and whose
                # retry (or failure) the store has not heard yet, its write waiting for the store. Only time
                # tells them apart, so this message is neither run nor dropped: it comes back later.
                self.defer(task, claimed_by)
        logger.warning("skipping %s[%s]: another copy already ran or runs (duplicate delivery)",
                       task.name, request.id)
        raise Ignore()

    def defer(self, task: Task, claimed_by: str | None) -> NoReturn:
        """Send this delivery back through the publisher to be looked at again after a countdown, and drop it.

        The message goes out as it came (same id, arguments, options and
        headers), marked as recovered so it claims its start when it comes
        back. Should the publish fail, it goes back to the broker instead.
        """
        request = task.request
        if self.app.conf.task_always_eager:  # no broker to send it to: the run that claimed it is this one
            logger.warning("skipping %s[%s]: a copy of a child started by %s", task.name, request.id, claimed_by)
            raise Ignore()
        deferrals = int(request_header(request, HEADER_DEFERRALS) or 0)
        transport = self.app.conf.broker_transport_options or {}
        countdown = defer_countdown(deferrals, transport.get("visibility_timeout"))
        signature = task.signature_from_request(request, eta=server_eta(countdown))
        hold_if_ahead(countdown)
        signature.options["headers"] = {**(signature.options.get("headers") or {}), HEADER_DEFERRALS: deferrals + 1}
        try:
            self.publisher.publish([{"id": request.id, "parent_id": request.parent_id, "root_id": request.root_id,
                                     "signature": signature, "recovered": True}])
        except Exception as exc:  # the broker is out: the message stays with it
            logger.warning("%s[%s] goes back to the broker: sending it for a later look failed (%s)",
                           task.name, request.id, exc)
            raise Reject("a copy of a child another run has claimed", requeue=True) from exc
        logger.warning("%s[%s] comes back in %.0fs: it is started by %s, which still runs", task.name,
                       request.id, countdown, claimed_by)
        raise Ignore()

    @staticmethod
    def succeeded_before(task: Any) -> bool:
        """Whether the result backend holds a success for this call (False when it cannot tell)."""
        from celery import states

        if task.ignore_result or not has_result_backend(task.app) or not task.backend.persistent:
            return False  # (reading an rpc:// result would consume the reply meant for the caller)
        try:
            return task.backend.get_task_meta(task.request.id).get("status") == states.SUCCESS
        except Exception as exc:  # an unreachable backend: run it again (at least once), as without the check
            logger.warning("could not read the result of %s[%s]: %s", task.name, task.request.id, exc)
            return False


def _count(finishes: Sequence[Finish], won: dict[str, str | None], released: int,
           revoked: Sequence[str] = ()) -> None:
    """The metrics of a batch of finishes: the jobs it moved to a final state (and those a fail-fast
    cancel revoked), and how long after the newest finish the dependents it released were published."""
    if not won or metrics.active() is None:
        return
    metrics.children_finished([*(f.state for f in finishes if f.job_id in won), *(REVOKED for _ in revoked)])
    if released:
        newest = max(f.finished_at for f in finishes if f.job_id in won)
        metrics.dependency_released((utcnow() - newest).total_seconds(), released)


__all__ = ["Finished", "HeldRelease", "PUBLISH_AHEAD", "Tracker", "may_publish_ahead"]
