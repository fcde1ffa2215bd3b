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



class Cancelled(NamedTuple):
    """What a cancel changed."""

    #: Jobs that were never dispatched, now ``cancelled``.
    cancelled: list[str]
    #: Jobs whose message was out, now ``revoked``: the caller revokes them in the broker too.
    revoked: list[str]
    #: Jobs left running (a store-only cancel leaves dispatched and running jobs to their workers).
    still_running: list[str]


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

    def cancel_jobs(self, conn: Connection, jobs: Sequence[dict], reason: str, store_only: bool = False) -> Cancelled:
        """Cancel jobs not yet dispatched; mark those dispatched or running revoked (unless ``store_only``).

        Guarded updates: a job that ended meanwhile keeps its real outcome.
        """
        now = utcnow()
        waiting = [j["id"] for j in jobs if j["state"] in s.UNDISPATCHED_JOB_STATES]
        running = [j["id"] for j in jobs if j["state"] not in s.UNDISPATCHED_JOB_STATES]
        for chunk in chunked(waiting):
            conn.execute(
                s.jobs.update().where(s.jobs.c.id.in_(chunk), s.jobs.c.state.in_(s.UNDISPATCHED_JOB_STATES))
                .values(state=s.CANCELLED, error=reason, finished_at=now))
        cancelled = list(waiting)
        # Those dispatched since they were read (a release published them meanwhile: on PostgreSQL while these
        # updates waited on its row locks; elsewhere between the read and the update) are on their way to a
        # worker now: they are revoked like the running ones.
        escaped = {job for chunk in chunked(cancelled) for job in conn.execute(
            sa.select(s.jobs.c.id).where(s.jobs.c.id.in_(chunk), s.jobs.c.state.notin_(FINAL))).scalars()}
        if escaped:
            cancelled = [job for job in cancelled if job not in escaped]
            running = [*running, *sorted(escaped)]
        if store_only:
            return Cancelled(cancelled, [], running)
        for chunk in chunked(running):
            conn.execute(s.jobs.update().where(s.jobs.c.id.in_(chunk), s.jobs.c.state.notin_(FINAL))
                         .values(state=s.REVOKED, error=reason, finished_at=now))
        return Cancelled(cancelled, running, [])

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
