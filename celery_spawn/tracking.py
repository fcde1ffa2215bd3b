"""The life of spawned jobs after dispatch: states, dependency release, completion, cancellation.

Every state change is a guarded UPDATE (``WHERE state NOT IN final``), so a
signal that fires twice, a redelivered message or two workers racing change
a row once, and only the winner of that change acts on it (releases
dependents, completes the operation, applies ``on_complete``).
"""
from __future__ import annotations

import logging
import sys
from typing import TYPE_CHECKING, Any, Iterable, NamedTuple, Sequence

import sqlalchemy as sa
from celery import signals as celery_signals
from celery.exceptions import Ignore
from kombu.utils.json import dumps, loads

from . import signals
from .errors import JobNotFound
from .publisher import publish_children
from .spawner import HEADER_OPERATION, request_headers
from .store import schema as s
from .store.queries import Durations, duration_aggregates
from .store.sql import chunked, utcnow
from .store.transitions import (CHUNK, Finish, finish_jobs, lease_before, release_dependents_pg, released_by_pg,
                                start_jobs, succeed_and_release_pg)
from .writebehind import FINISH, RETRY, START, Event, enable_in_this_process, flush_all, submit

if TYPE_CHECKING:
    from celery import Celery, Task

    from .app import SpawnState

logger = logging.getLogger("celery_spawn.tracking")

FINAL = tuple(s.FINAL_JOB_STATES)
NON_FINAL = tuple(state for state in s.JOB_STATES if state not in s.FINAL_JOB_STATES)
#: States a job may be (re)started from: a redelivery after a crash restarts a started job.
STARTABLE = (s.PENDING, s.HELD, s.DISPATCHED, s.STARTED, s.RETRYING)
#: Results gathered into an ``on_complete`` summary at most (beyond that, only counts and failures).
MAX_SUMMARY_RESULTS = 1000
MAX_ERROR_TEXT = 4000
#: Successes written together at most for which the dependents they release are published ahead of the write.
PUBLISH_AHEAD = 8


def _may_publish_ahead(app: Celery) -> bool:
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


def is_spawned(task: Task) -> bool:
    """Whether the running task was spawned: a header check, no database round trip."""
    return bool(request_headers(task.request).get(HEADER_OPERATION) or getattr(task.request, HEADER_OPERATION, None))


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
    with :meth:`release`, which writes nothing.
    """

    def __init__(self, job_id: str, conn: sa.Connection, rows: list[dict]) -> None:
        self.job_id = job_id
        self.conn: sa.Connection | None = conn
        self.rows = rows

    def take(self) -> sa.Connection:
        """The connection, handed over once to the caller that ends its transaction."""
        conn, self.conn = self.conn, None
        if conn is None:
            raise RuntimeError(f"the held release of {self.job_id} was already ended")
        return conn

    def release(self) -> None:
        """Roll back (the locks go, nothing was written) and give the connection back to the pool."""
        conn, self.conn = self.conn, None
        if conn is not None:
            _close_quietly(conn)


def _close_quietly(conn: sa.Connection) -> None:
    try:
        conn.close()  # rolls back what is open
    except Exception as exc:  # a dead connection: the pool drops it
        logger.debug("closing a held tracking connection failed: %s", exc)


class Tracker:
    """Applies worker events to the store for one app."""

    def __init__(self, state: SpawnState) -> None:
        self.state = state
        self.app: Celery = state.app
        self.store = state.store

    @property
    def _grace(self) -> float:
        """The recovery sweep's grace (seconds): how fresh a released child's operation lease must stay."""
        return self.state.settings.recovery_grace

    # ---- job transitions -------------------------------------------------------------------
    def claim_start(self, job_id: str, may_restart: bool = True) -> bool:
        """Mark a job started; False for a duplicate delivery, whose body must not run.

        A job already finished is a duplicate. A job already *started* is one
        too, unless ``may_restart``: a redelivery after its worker died, or a
        Celery retry, legitimately runs it again.
        """
        startable = STARTABLE if may_restart else tuple(x for x in STARTABLE if x != s.STARTED)
        with self.store.begin() as conn:
            changed = conn.execute(
                s.jobs.update().where(s.jobs.c.id == job_id, s.jobs.c.state.in_(startable))
                .values(state=s.STARTED, started_at=utcnow())
            ).rowcount
            if changed:
                return True
            state = conn.execute(sa.select(s.jobs.c.state).where(s.jobs.c.id == job_id)).scalar()
        # Unknown to the store (not recorded here): let it run.
        return state is None or (state not in s.FINAL_JOB_STATES and (may_restart or state != s.STARTED))

    def retried(self, job_id: str, reason: Any) -> None:
        with self.store.begin() as conn:
            conn.execute(
                s.jobs.update().where(s.jobs.c.id == job_id, s.jobs.c.state.notin_(FINAL))
                .values(state=s.RETRYING, retries=s.jobs.c.retries + 1, error=_error_text(reason))
            )

    def succeeded(self, job_id: str, operation_id: str | None = None) -> None:
        self.finish(job_id, s.SUCCEEDED, operation_id=operation_id)

    def failed(self, job_id: str, error: Any, state: str = s.FAILED) -> None:
        self.finish(job_id, state, _error_text(error))

    def start_many(self, starts: Sequence[tuple[str, Any]]) -> None:
        """Mark jobs started at their own times (the write-behind's batch).

        A start lost in a database crash only shows the job ``dispatched``
        until it finishes: its commit does not wait for the flush.
        """
        with self.store.begin() as conn:
            self.store.relax_commit(conn)
            start_jobs(conn, list(dict(starts).items()), STARTABLE)

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

    def hold_release(self, job_id: str) -> HeldRelease | None:
        """While ``job_id`` runs, read and lock what its success will release (PostgreSQL; see finish_batch).

        None when it would release nothing, or where publishing ahead is
        off; a database error is only logged (the finish does it the usual way).
        """
        if self.store.backend != "postgresql" or not _may_publish_ahead(self.app):
            return None
        conn: sa.Connection | None = None
        rows: list[dict] = []
        try:
            conn = self.store.engine.connect()
            conn.begin()
            rows = released_by_pg(conn, [job_id])
        except Exception as exc:
            logger.debug("could not read ahead what %s releases: %s", job_id, exc)
        if conn is None or not rows:
            if conn is not None:
                _close_quietly(conn)
            return None
        return HeldRelease(job_id, conn, rows)

    def finish_batch(self, finishes: Sequence[Finish], marks: Sequence[str] = (),
                     defer_marks: bool = False, published: set[str] | None = None,
                     held: HeldRelease | None = None) -> Finished:
        """Finish jobs and publish what that releases (see :class:`Finished`).

        One transaction: the jobs still unfinished change, their dependents
        are released or cancelled. An operation that just released a child
        of its own cannot be complete, so it is not among those to check.
        ``marks`` (ids published earlier) are marked dispatched in the same
        transaction; ``defer_marks`` leaves the marks of what this call
        publishes to the caller (the write-behind writes them with its next
        batch, so that a chain's next step does not wait for them).

        On PostgreSQL a small batch of successes publishes the dependents it
        releases first, then writes (see :func:`released_by_pg`): a dependency
        hop waits for one locked read, not for the write and its commit.
        ``published`` collects the ids so published; a caller that retries
        the same batch after an error passes the same set, so that a retry
        marks them instead of publishing them again. ``held`` (see
        :meth:`hold_release`) is used when this is its job's success alone,
        and ended otherwise: then the read was done while the job ran.
        """
        first = list({f.job_id: f for f in reversed(finishes)}.values())  # a job's first finish counts
        states = {f.job_id: f.state for f in first}
        published = set() if published is None else published
        ahead: list[dict] = []
        if held is not None and states != {held.job_id: s.SUCCEEDED}:
            held.release()
            held = None
        with (self.store.begun(held.take()) if held is not None else self.store.begin()) as conn:
            if conn.dialect.name == "postgresql" and len(first) <= CHUNK and len(marks) <= CHUNK and all(
                    state == s.SUCCEEDED for state in states.values()):
                # the common case: one round trip, or two with the next steps published between them
                if held is not None:
                    ahead = self._publish_ahead([r for r in held.rows if r["id"] not in published], published)
                elif len(first) <= PUBLISH_AHEAD and _may_publish_ahead(self.app):
                    ahead = self._publish_ahead(released_by_pg(conn, list(states), sorted(published)), published)
                won, to_publish = succeed_and_release_pg(conn, first, marks, self._grace, sorted(published))
            else:
                if marks:
                    self.store.mark_dispatched_in(conn, marks)
                won, to_publish = self._finish_and_release(conn, first, states)
        unmarked = self._publish(to_publish, mark=not defer_marks)
        busy = {row["operation_id"] for row in (*to_publish, *ahead)}
        return Finished(won, [op for op in dict.fromkeys(won.values()) if op and op not in busy],
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
            ids = set(publish_children(self.app, rows))
        except Exception as exc:
            logger.debug("publishing %d released jobs ahead failed (%s); they follow the write", len(rows), exc)
            return []
        published.update(ids)
        return [row for row in rows if row["id"] in ids]

    def _finish_and_release(self, conn: sa.Connection, first: Sequence[Finish],
                            states: dict[str, str]) -> tuple[dict[str, str | None], list[dict]]:
        won = finish_jobs(conn, first)
        succeeded = [job for job in won if states[job] == s.SUCCEEDED]
        ended = [job for job in won if states[job] != s.SUCCEEDED]
        for job in ended:
            self.cancel_dependents(conn, [job], f"dependency {job} {states[job]}")
            if won[job] and states[job] == s.FAILED:
                self._fail_fast(conn, won[job], job)
        return won, self._release(conn, succeeded, ended)

    # ---- dependencies ----------------------------------------------------------------------
    def _release(self, conn: sa.Connection, succeeded: Sequence[str], ended: Sequence[str]) -> list[dict]:
        """Count finished jobs off their held dependents; returns the rows of those now ``pending``.

        ``ended`` jobs (failed, revoked, cancelled) count only for dependents
        that ignore their failure; the others were cancelled already.
        """
        if not succeeded and not ended:
            return []
        if conn.dialect.name == "postgresql":
            return release_dependents_pg(conn, succeeded, ended, self._grace)
        released = self._satisfy(conn, succeeded, only_ignoring=False) if succeeded else []
        if ended:
            released += self._satisfy(conn, ended, only_ignoring=True)
        return self._claim_released(conn, released)

    def _satisfy(self, conn: sa.Connection, done_ids: Sequence[str], only_ignoring: bool) -> list[str]:
        """Mark edges on ``done_ids`` satisfied and count them off their dependents; returns those."""
        query = sa.select(s.dependencies.c.job_id).where(
            s.dependencies.c.depends_on_id.in_(done_ids), s.dependencies.c.satisfied.is_(False))
        if only_ignoring:
            query = query.where(s.dependencies.c.ignore_failure.is_(True))
        dependents = list(conn.execute(query).scalars())
        if not dependents:
            return []
        edges = s.dependencies.update().where(
            s.dependencies.c.depends_on_id.in_(done_ids), s.dependencies.c.job_id.in_(dependents))
        conn.execute(edges.values(satisfied=True))
        for job in sorted(dependents):  # one row each, in a fixed order: a job may wait on several of done_ids
            conn.execute(
                s.jobs.update().where(s.jobs.c.id == job, s.jobs.c.state == s.HELD)
                .values(pending_deps=s.jobs.c.pending_deps - 1)
            )
        return dependents

    def _claim_released(self, conn: sa.Connection, candidates: Iterable[str]) -> list[dict]:
        """Held jobs whose last dependency is met become pending: exactly one caller wins each."""
        won: list[str] = []
        for job in dict.fromkeys(candidates):
            changed = conn.execute(
                s.jobs.update().where(s.jobs.c.id == job, s.jobs.c.state == s.HELD, s.jobs.c.pending_deps <= 0)
                .values(state=s.PENDING)
            ).rowcount
            if changed:
                won.append(job)
        if not won:
            return []
        rows = [dict(r) for r in conn.execute(
            sa.select(s.jobs.c.id, s.jobs.c.parent_id, s.jobs.c.root_id, s.jobs.c.message, s.jobs.c.operation_id)
            .where(s.jobs.c.id.in_(won))
        ).mappings()]
        # Refresh the leases: the recovery sweep leaves these pending rows to us to publish.
        operations = sorted({r["operation_id"] for r in rows if r["operation_id"]})
        if operations:
            now = utcnow()
            conn.execute(s.operations.update().where(s.operations.c.id.in_(operations),
                                                     s.operations.c.updated_at < lease_before(now, self._grace))
                         .values(updated_at=now))
        return rows

    def cancel_dependents(self, conn: sa.Connection, failed_ids: Sequence[str], reason: str) -> list[str]:
        """Cancel, level by level, every held job that needed one of ``failed_ids`` to succeed."""
        cancelled: list[str] = []
        frontier = list(failed_ids)
        while frontier:
            dependents = list(conn.execute(
                sa.select(s.dependencies.c.job_id).distinct()
                .join(s.jobs, s.jobs.c.id == s.dependencies.c.job_id)
                .where(s.dependencies.c.depends_on_id.in_(frontier), s.dependencies.c.ignore_failure.is_(False),
                       s.jobs.c.state.in_((s.HELD, s.PENDING)))
            ).scalars())
            if not dependents:
                break
            now = utcnow()
            for chunk in chunked(dependents):
                conn.execute(
                    s.jobs.update().where(s.jobs.c.id.in_(chunk), s.jobs.c.state.in_((s.HELD, s.PENDING)))
                    .values(state=s.CANCELLED, error=reason, finished_at=now)
                )
            cancelled.extend(dependents)
            frontier = dependents
        return cancelled

    def _fail_fast(self, conn: sa.Connection, operation_id: str, failed_id: str) -> None:
        fail_fast = conn.execute(
            sa.select(s.operations.c.fail_fast).where(s.operations.c.id == operation_id)).scalar()
        if fail_fast:
            self._cancel_jobs(conn, self._unfinished(conn, operation_id=operation_id),
                              f"fail_fast: sibling {failed_id} failed", terminate=False)

    def _publish(self, rows: list[dict], mark: bool = True) -> list[str]:
        """Publish released rows; returns the ids published and left unmarked (``mark=False``)."""
        if not rows:
            return []
        try:
            ids = publish_children(self.app, rows)
        except Exception as exc:  # the recovery sweep publishes pending rows later
            logger.warning("publishing released jobs failed (%s); the recovery sweep will retry", exc)
            for operation_id in {r["operation_id"] for r in rows if r.get("operation_id")}:
                self.store.touch_operation(operation_id)
            return []
        if not mark:
            return ids
        self.store.mark_dispatched(ids)
        return []

    # ---- completion ------------------------------------------------------------------------
    def check_completion(self, operation_id: str) -> None:
        """Complete ``operation_id`` if it is done, then walk up to the operations of its ancestors.

        The walk stops at the first operation that is not done: an ancestor
        cannot be complete while part of its subtree runs.
        """
        seen: set[str] = set()
        current: str | None = operation_id
        while current and current not in seen:
            seen.add(current)
            if not self._try_complete(current):
                return
            with self.store.read() as conn:
                parent_job = conn.execute(
                    sa.select(s.operations.c.parent_id).where(s.operations.c.id == current)).scalar()
                current = conn.execute(
                    sa.select(s.jobs.c.operation_id).where(s.jobs.c.id == parent_job)).scalar() if parent_job else None

    def _try_complete(self, operation_id: str) -> bool:
        """Complete the operation if every child is final; True when it is (now or already) complete."""
        with self.store.read() as conn:
            # Cheap first: an index probe per non-final state on (operation_id, state).
            running = conn.execute(
                sa.select(s.jobs.c.id).where(s.jobs.c.operation_id == operation_id,
                                             s.jobs.c.state.in_(NON_FINAL)).limit(1)
            ).first()
            if running is not None:
                return False
            operation = self.store.get_operation(conn, operation_id)
            if operation is None:
                return False
            if operation["completed"] or (operation["state"] == s.OP_FAILED and not operation["total"]):
                return True
            if operation["wait_for_descendants"] and self._descendants_unfinished(conn, operation):
                return False
            counts, rollup = self._tally(conn, operation_id)
        final_state = _operation_state(counts)
        now = utcnow()
        with self.store.begin() as conn:
            won = conn.execute(
                s.operations.update().where(s.operations.c.id == operation_id, s.operations.c.completed.is_(False))
                .values(completed=True, state=final_state, finished_at=now, updated_at=now,
                        callback_state=s.CALLBACK_PENDING if operation["on_complete"] else None, **rollup)
            ).rowcount
        if not won:
            return True
        summary = self.summary(operation, counts, final_state)
        signals.operation_completed.send(sender=operation_id, operation_id=operation_id, summary=summary)
        if operation["on_complete"]:
            self.apply_callback(operation, summary)
        return True

    def apply_callback(self, operation: dict, summary: dict | None = None) -> bool:
        """Publish ``on_complete(summary)`` under its deterministic id; a broker error leaves it to the sweep."""
        from .control import completion_task_id

        if summary is None:
            with self.store.read() as conn:
                counts = self._counts(conn, operation["id"])
            summary = self.summary(operation, counts, operation["state"])
        try:
            callback = callback_signature(loads(operation["on_complete"]), self.app).clone(args=(summary,))
        except Exception as exc:
            logger.error("on_complete of operation %s is not a usable signature: %s", operation["id"], exc)
            with self.store.begin() as conn:
                self.store.update_operation(conn, operation["id"], callback_state=s.CALLBACK_FAILED,
                                            error=f"on_complete: {_error_text(exc)}")
            return False
        try:
            callback.apply_async(task_id=completion_task_id(operation["id"]), parent_id=operation["parent_id"],
                                 root_id=operation["root_id"])
        except Exception as exc:
            logger.warning("on_complete of operation %s not published (%s); the recovery sweep will retry",
                           operation["id"], exc)
            return False
        with self.store.begin() as conn:
            self.store.update_operation(conn, operation["id"], callback_state=s.CALLBACK_SENT)
        return True

    def summary(self, operation: dict, counts: dict[str, int], final_state: str) -> dict:
        """The first argument of ``on_complete``: JSON-serialisable, like a chord header's results."""
        with self.store.read() as conn:
            failures = conn.execute(
                sa.select(s.jobs.c.id, s.jobs.c.state, s.jobs.c.error)
                .where(s.jobs.c.operation_id == operation["id"], s.jobs.c.state != s.SUCCEEDED)
                .order_by(s.jobs.c.position).limit(MAX_SUMMARY_RESULTS)
            ).all()
            succeeded_ids = list(conn.execute(
                sa.select(s.jobs.c.id).where(s.jobs.c.operation_id == operation["id"], s.jobs.c.state == s.SUCCEEDED)
                .order_by(s.jobs.c.position).limit(MAX_SUMMARY_RESULTS + 1)
            ).scalars())
        summary: dict[str, Any] = {
            "operation_id": operation["id"],
            "parent_id": operation["parent_id"],
            "state": final_state,
            "total": sum(counts.values()),
            "counts": counts,
            "failed": [{"id": r.id, "state": r.state, "error": r.error} for r in failures],
        }
        if has_result_backend(self.app) and len(succeeded_ids) <= MAX_SUMMARY_RESULTS:
            results = {}
            for job_id in succeeded_ids:
                try:
                    results[job_id] = _jsonable(self.app.AsyncResult(job_id).result)
                except Exception:  # a backend hiccup must not lose the callback
                    results[job_id] = None
            summary["results"] = results
        return summary

    def _counts(self, conn: sa.Connection, operation_id: str) -> dict[str, int]:
        return self._tally(conn, operation_id)[0]

    def _tally(self, conn: sa.Connection, operation_id: str) -> tuple[dict[str, int], dict[str, Any]]:
        """The children per state, and the operation's rollup columns (stats), from one GROUP BY state.

        The rollup is ``{}`` (the columns stay NULL) unless every child is final:
        only then can it never go stale.
        """
        timed, seconds, longest = duration_aggregates(conn, s.jobs.c.started_at, s.jobs.c.finished_at)
        rows = conn.execute(
            sa.select(s.jobs.c.state, sa.func.count().label("n"), timed.label("timed"), seconds.label("seconds"),
                      longest.label("longest"))
            .where(s.jobs.c.operation_id == operation_id).group_by(s.jobs.c.state)
        ).all()
        counts = {row.state: int(row.n) for row in rows}
        if any(state not in s.FINAL_JOB_STATES for state in counts):
            return counts, {}
        durations = Durations()
        for row in rows:
            durations.add(row.timed, row.seconds, row.longest)
        rollup: dict[str, Any] = {column: counts.get(state, 0) for state, column in s.CHILD_COUNT_COLUMNS.items()}
        rollup.update(children_timed=durations.timed, children_seconds=durations.seconds,
                      children_max_seconds=durations.max_seconds)
        return counts, rollup

    def _descendants_unfinished(self, conn: sa.Connection, operation: dict) -> bool:
        """Whether any job below the operation's children, at any depth, is not final (one recursive query)."""
        tree = (sa.select(s.jobs.c.id).where(s.jobs.c.operation_id == operation["id"])
                .cte("subtree", recursive=True))
        below = sa.select(s.jobs.c.id).join(tree, s.jobs.c.parent_id == tree.c.id)
        tree = tree.union_all(below)
        pending = conn.execute(
            sa.select(sa.func.count()).select_from(s.jobs.join(tree, s.jobs.c.id == tree.c.id))
            .where(s.jobs.c.state.notin_(FINAL))
        ).scalar()
        if pending:
            return True
        open_ops = conn.execute(
            sa.select(sa.func.count()).select_from(s.operations.join(tree, s.operations.c.parent_id == tree.c.id))
            .where(s.operations.c.completed.is_(False), s.operations.c.total > 0)
        ).scalar()
        return bool(open_ops)

    # ---- cancellation ----------------------------------------------------------------------
    def _unfinished(self, conn: sa.Connection, *, operation_id: str | None = None,
                    below_job: str | None = None) -> list[dict]:
        if operation_id is not None:
            roots = sa.select(s.jobs.c.id).where(s.jobs.c.operation_id == operation_id)
        else:
            roots = sa.select(s.jobs.c.id).where(s.jobs.c.parent_id == below_job)
        tree = roots.cte("cancel_tree", recursive=True)
        tree = tree.union_all(sa.select(s.jobs.c.id).join(tree, s.jobs.c.parent_id == tree.c.id))
        rows = conn.execute(
            sa.select(s.jobs.c.id, s.jobs.c.state, s.jobs.c.operation_id)
            .join(tree, s.jobs.c.id == tree.c.id).where(s.jobs.c.state.notin_(FINAL))
        ).mappings()
        return [dict(r) for r in rows]

    def _cancel_jobs(self, conn: sa.Connection, jobs: list[dict], reason: str, terminate: bool) -> dict[str, int]:
        now = utcnow()
        waiting = [j["id"] for j in jobs if j["state"] in s.UNDISPATCHED_JOB_STATES]
        running = [j["id"] for j in jobs if j["state"] not in s.UNDISPATCHED_JOB_STATES]
        for chunk in chunked(waiting):
            conn.execute(s.jobs.update().where(s.jobs.c.id.in_(chunk), s.jobs.c.state.in_(s.UNDISPATCHED_JOB_STATES))
                         .values(state=s.CANCELLED, error=reason, finished_at=now))
        if waiting and conn.dialect.name == "postgresql":
            # Published ahead of a release while these updates waited on its row locks (see finish_batch):
            # on their way to a worker now, so they are revoked like the running ones.
            escaped = {job for chunk in chunked(waiting) for job in conn.execute(
                sa.select(s.jobs.c.id).where(s.jobs.c.id.in_(chunk), s.jobs.c.state.notin_(FINAL))).scalars()}
            if escaped:
                waiting = [job for job in waiting if job not in escaped]
                running = [*running, *sorted(escaped)]
        for chunk in chunked(running):
            conn.execute(s.jobs.update().where(s.jobs.c.id.in_(chunk), s.jobs.c.state.notin_(FINAL))
                         .values(state=s.REVOKED, error=reason, finished_at=now))
        if running:
            try:
                self.app.control.revoke(running, terminate=terminate)
            except Exception as exc:  # claims in the store still stop SpawnTask children
                logger.warning("revoking %d running jobs failed: %s", len(running), exc)
        return {"cancelled": len(waiting), "revoked": len(running)}

    def cancel(self, target_id: str, terminate: bool = False, reason: str = "cancelled") -> dict[str, Any]:
        """Stop every unfinished descendant of a job, or of an operation's parent."""
        with self.store.begin() as conn:
            operation = self.store.get_operation(conn, target_id)
            if operation is not None:
                jobs = self._unfinished(conn, operation_id=target_id)
                root = operation["parent_id"]
            elif self.store.get_job(conn, target_id) is not None:
                jobs = self._unfinished(conn, below_job=target_id)
                root = target_id
            else:
                raise JobNotFound(f"no spawned job or operation has id {target_id!r}")
            result = self._cancel_jobs(conn, jobs, reason, terminate)
            touched = {j["operation_id"] for j in jobs if j["operation_id"]}
            if operation is not None:
                touched.add(target_id)
        for operation_id in touched:
            self.check_completion(operation_id)
        result.update(target=target_id, root=root, operations=sorted(touched))
        return result


def callback_signature(form: dict, app: Celery) -> Any:
    """A signature from its dict form, the minimal ``{"task": name}`` included."""
    from celery import signature
    from celery.canvas import Signature

    if form.get("subtask_type"):
        return signature(form, app=app)
    return Signature(form["task"], args=form.get("args") or (), kwargs=form.get("kwargs") or {},
                     options=form.get("options") or {}, immutable=bool(form.get("immutable")), app=app)


def _operation_state(counts: dict[str, int]) -> str:
    total = sum(counts.values())
    ok = counts.get(s.SUCCEEDED, 0)
    bad = counts.get(s.FAILED, 0)
    stopped = counts.get(s.CANCELLED, 0) + counts.get(s.REVOKED, 0)
    if ok == total:
        return s.OP_SUCCEEDED
    if bad == 0 and stopped:
        return s.OP_CANCELLED if ok == 0 else s.OP_PARTIALLY_FAILED
    return s.OP_FAILED if ok == 0 else s.OP_PARTIALLY_FAILED


def _error_text(error: Any) -> str | None:
    if error is None:
        return None
    if isinstance(error, BaseException):
        text = f"{type(error).__name__}: {error}"
    else:
        text = str(error)
    return text[:MAX_ERROR_TEXT]


def _succeeded_before(task: Any) -> bool:
    """Whether the result backend holds a success for this call (False when it cannot tell)."""
    from celery import states

    if task.ignore_result or not has_result_backend(task.app) or not task.backend.persistent:
        return False  # (reading an rpc:// result would consume the reply meant for the caller)
    try:
        return task.backend.get_task_meta(task.request.id).get("status") == states.SUCCESS
    except Exception as exc:  # an unreachable backend: run it again (at least once), as without the check
        logger.warning("could not read the result of %s[%s]: %s", task.name, task.request.id, exc)
        return False


def has_result_backend(app: Celery) -> bool:
    from celery.backends.base import DisabledBackend

    try:
        return not isinstance(app.backend, DisabledBackend)
    except Exception:
        return False


def _jsonable(value: Any) -> Any:
    try:
        dumps(value)
        return value
    except Exception:
        return repr(value)


# ---- Celery signal wiring ------------------------------------------------------------------
def _tracker_for(task: Any) -> Tracker | None:
    app = getattr(task, "app", None)
    if app is None:
        return None
    from .app import peek_state

    state = peek_state(app)
    if state is None or not state.settings.track_states:
        return None
    return state.tracker


def _safely(action: str, fn, *args: Any) -> None:
    try:
        fn(*args)
    except Exception as exc:  # tracking must never take the worker down
        logger.error("celery-spawn could not record %s: %s", action, exc)


@celery_signals.task_prerun.connect(weak=False)
def _on_prerun(sender=None, task_id=None, task=None, **_: Any) -> None:
    from .task import SpawnTask

    if task is None or isinstance(task, SpawnTask) or not is_spawned(task):
        return  # SpawnTask claims its own start (and can skip a duplicate)
    tracker = _tracker_for(task)
    if tracker is not None and tracker.state.settings.track_started:
        _record(tracker, "a start", Event(START, task_id), tracker.claim_start, task_id)


@celery_signals.task_success.connect(weak=False)
def _on_success(sender=None, **_: Any) -> None:
    if sender is None or not is_spawned(sender):
        return
    tracker = _tracker_for(sender)
    if tracker is not None:
        job_id = sender.request.id
        operation_id = request_headers(sender.request).get(HEADER_OPERATION) or getattr(
            sender.request, HEADER_OPERATION, None)
        _record(tracker, "a success", Event(FINISH, job_id, state=s.SUCCEEDED, operation_id=operation_id),
                tracker.succeeded, job_id, operation_id)


@celery_signals.task_failure.connect(weak=False)
def _on_failure(sender=None, task_id=None, exception=None, **_: Any) -> None:
    if sender is None or task_id is None:
        return
    # In the worker's main process (hard time limit, lost worker) the request is empty:
    # then the id alone tells, with one primary-key update.
    if getattr(sender.request, "id", None) == task_id and not is_spawned(sender):
        return
    tracker = _tracker_for(sender)
    if tracker is not None:
        _record(tracker, "a failure", Event(FINISH, task_id, state=s.FAILED, error=_error_text(exception)),
                tracker.failed, task_id, exception)


@celery_signals.task_retry.connect(weak=False)
def _on_retry(sender=None, request=None, reason=None, **_: Any) -> None:
    if sender is None or request is None or not request_headers(request).get(HEADER_OPERATION):
        return
    tracker = _tracker_for(sender)
    if tracker is not None:
        _record(tracker, "a retry", Event(RETRY, request.id, error=_error_text(reason)),
                tracker.retried, request.id, reason)


@celery_signals.task_revoked.connect(weak=False)
def _on_revoked(sender=None, request=None, terminated=None, expired=None, **_: Any) -> None:
    if sender is None or request is None or getattr(request, "id", None) is None:
        return
    tracker = _tracker_for(sender)
    if tracker is not None:
        reason = "expired" if expired else ("terminated" if terminated else "revoked")
        _record(tracker, "a revoke", Event(FINISH, request.id, state=s.REVOKED, error=reason),
                tracker.failed, request.id, reason, s.REVOKED)


def _record(tracker: Tracker, action: str, event: Event, write_now, *args: Any) -> None:
    """Queue ``event`` for the write-behind inside a worker; elsewhere write it now."""
    _safely(action, submit, tracker, event, lambda: write_now(*args))


@celery_signals.worker_init.connect(weak=False)
def _worker_starts(sender=None, **_: Any) -> None:
    # A prefork main process forks new pool processes at any time: a thread of ours writing
    # to the store at that moment would leave locks held in the child. Its few events (revokes,
    # lost workers, time limits) are written synchronously; the pool processes batch theirs.
    if not _forks_pool_processes(sender):
        enable_in_this_process()


@celery_signals.worker_process_init.connect(weak=False)
def _pool_process_starts(**_: Any) -> None:
    enable_in_this_process()


def _forks_pool_processes(worker: Any) -> bool:
    pool_cls = getattr(worker, "pool_cls", None)
    return getattr(pool_cls, "__module__", "").startswith("celery.concurrency.prefork")


@celery_signals.worker_process_shutdown.connect(weak=False)
@celery_signals.worker_shutdown.connect(weak=False)
def _worker_stops(**_: Any) -> None:
    flush_all()


def skip_duplicate(task: Task) -> None:
    """For a SpawnTask child: claim the start, or raise Ignore when it already finished."""
    tracker = _tracker_for(task)
    if tracker is None:
        return
    request = task.request
    redelivered = bool((request.delivery_info or {}).get("redelivered"))
    if redelivered and _succeeded_before(task):
        # Its worker died after Celery stored the result and before the store (or the broker's ack)
        # heard of it: record the success the signal would have, and do not run the body again.
        tracker.finish(request.id, s.SUCCEEDED)
        logger.warning("skipping %s[%s]: redelivered after it had succeeded (the result backend says so)",
                       task.name, request.id)
        raise Ignore()
    may_restart = redelivered or bool(request.retries)
    if not tracker.claim_start(request.id, may_restart=may_restart):
        logger.warning("skipping %s[%s]: another copy already ran or runs (duplicate delivery)",
                       task.name, request.id)
        raise Ignore()
