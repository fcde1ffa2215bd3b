"""Cancelling the unfinished part of a tree: which jobs, and what each becomes.

Mixed into :class:`~celery_spawn.store.SpawnStore`. The store decides the
rows; revoking the messages already out is the engine's
(:mod:`celery_spawn.engine.cancel`).
"""
from __future__ import annotations

from typing import NamedTuple, Sequence

import sqlalchemy as sa
from sqlalchemy.engine import Connection

from . import schema as s
from .connection import StoreBase
from . import trees
from .dialects import FINAL, chunked
from .schema import utcnow



#: What the error of a running job says once a cancel asked it to stop (its state stays until it ends).
CANCEL_REQUESTED = "cancel requested"
#: States in which a job's body may be running (or waiting for its next attempt).
RUNNING_STATES = (s.STARTED, s.RETRYING)


class Cancelled(NamedTuple):
    """What a cancel changed."""

    #: Jobs that were never dispatched, now ``cancelled``.
    cancelled: list[str]
    #: Jobs whose message was out, now ``revoked``: the caller revokes them in the broker too.
    revoked: list[str]
    #: Jobs left running (a store-only cancel leaves dispatched and running jobs to their workers).
    still_running: list[str]
    #: Running jobs asked to stop (revoked in the broker, not terminated): they keep their state, marked
    #: :data:`CANCEL_REQUESTED`, until their real outcome is recorded.
    requested: list[str] = []


class Cancels(StoreBase):
    """The unfinished jobs of a subtree, and their cancellation."""

    def unfinished_jobs(self, conn: Connection, *, operation_id: str | None = None,
                        below_job: str | None = None) -> list[dict]:
        """The unfinished jobs below an operation (its children and their descendants) or below a job."""
        tree = trees.below_operation(operation_id) if operation_id is not None else trees.below_job(str(below_job))
        rows = conn.execute(
            sa.select(s.jobs.c.id, s.jobs.c.state, s.jobs.c.operation_id)
            .join(tree, s.jobs.c.id == tree.c.id).where(s.jobs.c.state.notin_(FINAL))
        ).mappings()
        return [dict(r) for r in rows]

    def cancel_jobs(self, conn: Connection, jobs: Sequence[dict], reason: str, store_only: bool = False,
                    terminate: bool = False) -> Cancelled:
        """Cancel jobs not yet dispatched; mark those dispatched revoked; stop those running.

        A running job is marked revoked only with ``terminate`` (the broker
        kills it); otherwise it keeps its state, marked as asked to stop,
        and its real outcome is recorded when it comes. ``store_only``
        leaves every job whose message is out to its worker. Guarded
        updates: a job that ended meanwhile keeps its real outcome.
        """
        now = utcnow()
        waiting = [j["id"] for j in jobs if j["state"] in s.UNDISPATCHED_JOB_STATES]
        out = {j["id"]: j["state"] for j in jobs if j["state"] not in s.UNDISPATCHED_JOB_STATES}
        for chunk in chunked(waiting):
            conn.execute(
                s.jobs.update().where(s.jobs.c.id.in_(chunk), s.jobs.c.state.in_(s.UNDISPATCHED_JOB_STATES))
                .values(state=s.CANCELLED, error=reason, finished_at=now))
        # Those dispatched since they were read (a release published them meanwhile: on PostgreSQL while these
        # updates waited on its row locks; elsewhere between the read and the update) are on their way to a
        # worker now: they are treated as the ones whose message was out.
        escaped = self._unfinished_states(conn, waiting)
        cancelled = [job for job in waiting if job not in escaped]
        out.update(escaped)
        if store_only:
            return Cancelled(cancelled, [], list(out))
        if terminate:
            self._mark_revoked(conn, list(out), reason, now)
            return Cancelled(cancelled, list(out), [])
        not_started = [job for job, state in out.items() if state not in RUNNING_STATES]
        self._mark_revoked(conn, not_started, reason, now, only_from=(s.DISPATCHED,))
        started_meanwhile = {job for job, state in self._unfinished_states(conn, not_started).items()
                             if state in RUNNING_STATES}
        revoked = [job for job in not_started if job not in started_meanwhile]
        running = [job for job, state in out.items() if state in RUNNING_STATES or job in started_meanwhile]
        for chunk in chunked(running):
            conn.execute(s.jobs.update().where(s.jobs.c.id.in_(chunk), s.jobs.c.state.in_(RUNNING_STATES))
                         .values(error=f"{CANCEL_REQUESTED}: {reason}"[:4000]))
        return Cancelled(cancelled, revoked, [], running)

    def _mark_revoked(self, conn: Connection, ids: Sequence[str], reason: str, now: object,
                      only_from: tuple[str, ...] | None = None) -> None:
        """Mark jobs revoked: every unfinished one, or only those in a state of ``only_from``."""
        guard = s.jobs.c.state.notin_(FINAL) if only_from is None else s.jobs.c.state.in_(only_from)
        for chunk in chunked(ids):
            conn.execute(s.jobs.update().where(s.jobs.c.id.in_(chunk), guard)
                         .values(state=s.REVOKED, error=reason, finished_at=now))

    def _unfinished_states(self, conn: Connection, ids: Sequence[str]) -> dict[str, str]:
        """The current state of each of ``ids`` that is not final."""
        return {row.id: row.state for chunk in chunked(list(ids)) for row in conn.execute(
            sa.select(s.jobs.c.id, s.jobs.c.state).where(s.jobs.c.id.in_(chunk), s.jobs.c.state.notin_(FINAL)))}

    def cancel_dependents(self, conn: Connection, failed_ids: Sequence[str], reason: str) -> list[str]:
        """Cancel, level by level, every held or pending job that needed one of ``failed_ids`` to succeed."""
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
