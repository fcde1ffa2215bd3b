"""A spawned job's state changes after dispatch, each a named, guarded transition.

Every change is a guarded UPDATE (``WHERE state NOT IN final`` or the like),
so a signal that fires twice, a redelivered message or two workers racing
change a row once, and only the caller whose update won acts on it. The
statements that differ per database are the dialect's
(:mod:`celery_spawn.store.dialects`); this module says what happens when.

Mixed into :class:`~celery_spawn.store.SpawnStore`.
"""
from __future__ import annotations

from typing import Any, NamedTuple, Sequence

import sqlalchemy as sa
from sqlalchemy.engine import Connection

from . import schema as s
from .cancels import Cancels
from .dialects import FINAL, Finish
from .schema import utcnow


__all__ = ["Finish", "Finished", "JobTransitions"]


class Finished(NamedTuple):
    """What a batch of finishes changed in the store."""

    #: ``{job id: operation id}`` of the jobs this call moved to a final state.
    won: dict[str, str | None]
    #: Rows of the dependents released (now ``pending``), to be published.
    released: list[dict]
    #: Jobs a fail-fast cancel marked revoked: their messages are out, so they are revoked too.
    to_revoke: list[str]


class JobTransitions(Cancels):
    """Starts, retries, finishes and the dependency releases that follow them."""

    def claim_start(self, job_id: str, startable: Sequence[str], worker: str | None = None,
                    taking_over: str | None = None) -> bool | None:
        """Mark a job started by ``worker`` if its state is one of ``startable``.

        With ``taking_over``, only while the claim it holds is that one (a
        copy running again a job whose run is gone). True when it changed;
        otherwise False for a job the store has in another state, None for a
        job it does not know.
        """
        with self.begin() as conn:
            update = s.jobs.update().where(s.jobs.c.id == job_id, s.jobs.c.state.in_(tuple(startable)))
            if taking_over is not None:
                update = update.where(s.jobs.c.worker == taking_over)
            changed = conn.execute(update.values(state=s.STARTED, started_at=utcnow(), worker=worker)).rowcount
            if changed:
                return True
            state = conn.execute(sa.select(s.jobs.c.state).where(s.jobs.c.id == job_id)).scalar()
        return None if state is None else False

    def free_claim(self, job_id: str, worker: str | None) -> bool:
        """Let go of ``worker``'s claim of a job's start: the job waits for its next attempt (``retrying``).

        For a claim whose commit its process could not confirm, from an attempt
        that has ended: nothing changes unless the job is still ``started`` by
        ``worker``. True when it changed.
        """
        with self.begin() as conn:
            return bool(conn.execute(
                s.jobs.update().where(s.jobs.c.id == job_id, s.jobs.c.state == s.STARTED, s.jobs.c.worker == worker)
                .values(state=s.RETRYING, worker=None)
            ).rowcount)

    def claim_of(self, job_id: str) -> tuple[str | None, str | None]:
        """A job's state and who claimed its start (``nodename/pid``), or ``(None, None)``."""
        with self.read() as conn:
            row = conn.execute(sa.select(s.jobs.c.state, s.jobs.c.worker).where(s.jobs.c.id == job_id)).first()
        return (row.state, row.worker) if row else (None, None)

    def job_state(self, job_id: str) -> str | None:
        with self.read() as conn:
            return conn.execute(sa.select(s.jobs.c.state).where(s.jobs.c.id == job_id)).scalar()

    def mark_retrying(self, job_id: str, error: str | None) -> None:
        """A Celery retry: the job waits for its next attempt (counted in ``retries``)."""
        with self.begin() as conn:
            conn.execute(
                s.jobs.update().where(s.jobs.c.id == job_id, s.jobs.c.state.notin_(FINAL))
                .values(state=s.RETRYING, retries=s.jobs.c.retries + 1, error=error)
            )

    def start_jobs(self, starts: Sequence[tuple[str, Any]], startable: Sequence[str],
                   worker: str | None = None) -> None:
        """Mark jobs started at their own times by one ``worker`` (a batch). The commit does not wait for
        the disk: a start lost in a database crash only shows the job ``dispatched`` until it finishes."""
        with self.begin() as conn:
            self.dialect.relax_commit(conn)
            self.dialect.start_jobs(conn, list(starts), startable, worker)

    def finish_and_release(self, conn: Connection, finishes: Sequence[Finish], grace_seconds: float) -> Finished:
        """Move jobs to final states, each once, and act on what that ends, in the caller's transaction.

        The dependents of a success are released; those of a failure are
        cancelled (unless they ignore it), and a failure in a ``fail_fast``
        operation cancels the rest of it.
        """
        states = {f.job_id: f.state for f in finishes}
        won = self.dialect.finish_jobs(conn, finishes)
        succeeded = [job for job in won if states[job] == s.SUCCEEDED]
        ended = [job for job in won if states[job] != s.SUCCEEDED]
        to_revoke: list[str] = []
        for job in ended:
            self.cancel_dependents(conn, [job], f"dependency {job} {states[job]}")
            operation_id = won[job]
            if operation_id and states[job] == s.FAILED and self._fails_fast(conn, operation_id):
                stopped = self.cancel_jobs(conn, self.unfinished_jobs(conn, operation_id=operation_id),
                                           f"fail_fast: sibling {job} failed")
                to_revoke.extend([*stopped.revoked, *stopped.requested])
        released = self.dialect.release(conn, succeeded, ended, grace_seconds) if won else []
        return Finished(won, released, to_revoke)

    def succeed_and_release(self, conn: Connection, finishes: Sequence[Finish], marks: Sequence[str],
                            grace_seconds: float, published: Sequence[str]) -> Finished:
        """A batch of successes in one statement, where the dialect has one (see ``succeeds_in_one_statement``)."""
        won, released = self.dialect.succeed_and_release(conn, finishes, marks, grace_seconds, published)
        return Finished(won, released, [])

    def released_by(self, conn: Connection, succeeding: Sequence[str], published: Sequence[str] = ()) -> list[dict]:
        """The rows the successes of ``succeeding`` will release, locked until ``conn``'s transaction ends."""
        return self.dialect.released_by(conn, succeeding, published)

    def _fails_fast(self, conn: Connection, operation_id: str) -> bool:
        return bool(conn.execute(
            sa.select(s.operations.c.fail_fast).where(s.operations.c.id == operation_id)).scalar())
