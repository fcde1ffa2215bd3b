"""The run of an ``on_complete`` callback: sent, claimed by one process, ended; or sent again when lost.

``callback_state`` says whether the callback was published; ``callback_run``
what became of the run it asked for. Each delivery of the callback's message
claims its start here first (whatever the task's class), so a message
handed out twice runs once, and the recovery sweep may send again one that
never started without any risk of a second run. Mixed into
:class:`~celery_spawn.store.SpawnStore`.
"""
from __future__ import annotations

from datetime import datetime

import sqlalchemy as sa

from . import schema as s
from .connection import StoreBase
from .schema import utcnow

ops = s.operations


class CallbackRuns(StoreBase):
    """Claims on callbacks' starts, their ends, and the callbacks that never started."""

    def callback_published(self, operation_id: str, waiting: bool = True) -> None:
        """The callback went to the broker (again): sent, one more send counted, and (``waiting``) its run
        waiting for a worker to claim it (a group or chain claims nothing: its run is not followed).

        A run that began meanwhile (an eager call, a worker quicker than this
        write) keeps its claim; so does a callback already recorded unusable.
        """
        values: dict = {"callback_sends": ops.c.callback_sends + 1}
        if waiting:
            values["callback_run"] = sa.case(
                (sa.or_(ops.c.callback_run.is_(None), ops.c.callback_run == s.CALLBACK_LOST), s.CALLBACK_WAITING),
                else_=ops.c.callback_run)
        with self.begin() as conn:
            conn.execute(ops.update().where(ops.c.id == operation_id, ops.c.callback_state == s.CALLBACK_PENDING)
                         .values(callback_state=s.CALLBACK_SENT, updated_at=utcnow()))
            conn.execute(ops.update().where(ops.c.id == operation_id).values(**values))

    def claim_callback(self, operation_id: str, worker: str | None) -> bool | None:
        """Mark the callback started by ``worker`` unless a run claimed it or it ended; True when it did.

        False: another run claimed it, or it ended; None: no such operation.
        """
        startable = sa.or_(ops.c.callback_run.is_(None), ops.c.callback_run.in_(s.CALLBACK_STARTABLE))
        with self.begin() as conn:
            changed = conn.execute(ops.update().where(ops.c.id == operation_id, startable)
                                   .values(callback_run=s.CALLBACK_STARTED, callback_worker=worker)).rowcount
            if changed:
                return True
            found = conn.execute(sa.select(ops.c.id).where(ops.c.id == operation_id)).first()
        return None if found is None else False

    def take_over_callback(self, operation_id: str, worker: str | None, claimed_by: str | None) -> bool:
        """Claim a started callback for ``worker`` while the claim it holds is ``claimed_by``'s (a run that is
        gone; None: a start recorded without a worker); True when it did."""
        holder = ops.c.callback_worker.is_(None) if claimed_by is None else ops.c.callback_worker == claimed_by
        with self.begin() as conn:
            return bool(conn.execute(
                ops.update().where(ops.c.id == operation_id, ops.c.callback_run == s.CALLBACK_STARTED, holder)
                .values(callback_worker=worker)).rowcount)

    def callback_claim_of(self, operation_id: str) -> tuple[str | None, str | None]:
        """The callback's run state and who claimed it (``nodename/pid``); ``(None, None)`` if unknown."""
        with self.read() as conn:
            row = conn.execute(sa.select(ops.c.callback_run, ops.c.callback_worker)
                               .where(ops.c.id == operation_id)).first()
        return (row.callback_run, row.callback_worker) if row else (None, None)

    def end_callback(self, operation_id: str) -> None:
        """The callback's run ended for good (it returned, or failed past its retries): it never runs again."""
        with self.begin() as conn:
            conn.execute(ops.update().where(ops.c.id == operation_id).values(callback_run=s.CALLBACK_ENDED))

    def free_callback(self, operation_id: str, worker: str | None) -> None:
        """A Celery retry of the callback: its claim is freed for the retry's message (while ``worker``'s)."""
        with self.begin() as conn:
            conn.execute(ops.update().where(ops.c.id == operation_id, ops.c.callback_run == s.CALLBACK_STARTED,
                                            ops.c.callback_worker == worker)
                         .values(callback_run=s.CALLBACK_WAITING, updated_at=utcnow()))

    def lease_waiting_callbacks(self, cutoff: datetime, limit: int = 50) -> list[dict]:
        """Callbacks sent before ``cutoff`` that no worker started: leased to this caller (oldest first).

        The lease is the refreshed ``updated_at`` under ``FOR UPDATE SKIP
        LOCKED`` where the database has it: another sweeper leaves them alone
        until the cutoff passes them again.
        """
        with self.begin() as conn:
            waiting = (sa.select(ops).where(ops.c.callback_run == s.CALLBACK_WAITING, ops.c.updated_at < cutoff)
                       .order_by(ops.c.updated_at).limit(limit))
            rows = [dict(r) for r in conn.execute(self.dialect.for_update(waiting)).mappings()]
            if rows:
                conn.execute(ops.update().where(ops.c.id.in_([r["id"] for r in rows])).values(updated_at=utcnow()))
        return rows

    def lose_callback(self, operation_id: str) -> None:
        """Give up a callback sent again and again without ever starting (a late delivery may still run it)."""
        with self.begin() as conn:
            conn.execute(ops.update().where(ops.c.id == operation_id, ops.c.callback_run == s.CALLBACK_WAITING)
                         .values(callback_run=s.CALLBACK_LOST))
