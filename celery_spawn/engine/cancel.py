"""The one cancel: stop the unfinished part of a tree, for the Python API, the CLI and the web alike.

Children never dispatched (held, pending) are cancelled in the store.
Children dispatched and not started are marked revoked and revoked through
Celery's remote control. Children running are revoked too, but keep their
state, marked as asked to stop, until their real outcome arrives: revoking
does not stop a running task, so the store does not pretend it did. Only
``terminate=True`` kills them, and then they are recorded revoked. A
store-only cancel, for a face with no broker, leaves every child whose
message is out to its worker. Then every operation that lost children is
probed for completion, as a finishing child would have done; one with a
child still running completes when that child ends.
"""
from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any, Callable

from .. import metrics
from ..errors import JobNotFound
from ..protocol import CANCELLED, REVOKED

if TYPE_CHECKING:
    from ..store import SpawnStore
    from .completion import Completion

logger = logging.getLogger("celery_spawn.tracking")

#: Revokes task ids in the broker: ``app.control.revoke``.
Revoke = Callable[..., Any]


class Canceller:
    """Cancels trees in one store; revokes through ``revoke`` when there is a broker."""

    def __init__(self, store: SpawnStore, completion: Completion, revoke: Revoke | None = None) -> None:
        self.store = store
        self.completion = completion
        self.revoke = revoke

    def cancel(self, target_id: str, terminate: bool = False, reason: str = "cancelled",
               store_only: bool = False) -> dict[str, Any]:
        """Stop every unfinished descendant of a job, or of an operation's parent.

        ``target_id`` is an operation's label (its newest operation), an
        operation id or a job id, tried in that order. Returns ``cancelled``
        and ``revoked`` (counts), ``still_running`` (jobs left running: asked
        to stop, or left to their workers by a store-only cancel),
        ``cancel_requested`` (of those, the ones asked to stop), ``target``,
        ``operation_id`` (the operation cancelled; None for a job),
        ``label`` (its label, or None), ``others`` (other operations with
        that label, left alone), ``root``, ``operations`` (those that lost
        children) and ``completed`` (those the cancel completed). Raises
        :class:`~celery_spawn.errors.JobNotFound` for an unknown id.
        """
        store_only = store_only or self.revoke is None
        with self.store.begin() as conn:
            operation, others = self.store.resolve_operation(conn, target_id)
            if operation is not None:
                jobs = self.store.unfinished_jobs(conn, operation_id=operation["id"])
                root = operation["parent_id"]
            elif self.store.get_job(conn, target_id) is not None:
                jobs = self.store.unfinished_jobs(conn, below_job=target_id)
                root = target_id
            else:
                raise JobNotFound(f"no spawned job or operation has id {target_id!r}")
            done = self.store.cancel_jobs(conn, jobs, reason, store_only=store_only, terminate=terminate)
            left = set(done.still_running)
            touched = {j["operation_id"] for j in jobs if j["operation_id"] and j["id"] not in left}
            if operation is not None:
                touched.add(operation["id"])
        metrics.children_finished([CANCELLED] * len(done.cancelled) + [REVOKED] * len(done.revoked))
        if done.revoked or done.requested:
            self.revoke_jobs([*done.revoked, *done.requested], terminate=terminate)
        completed: list[str] = []
        for operation_id in sorted(touched):
            completed.extend(self.completion.check(operation_id))
        return {"cancelled": len(done.cancelled), "revoked": len(done.revoked),
                "still_running": len(done.still_running) + len(done.requested),
                "cancel_requested": len(done.requested), "target": target_id,
                "operation_id": operation["id"] if operation is not None else None,
                "label": operation["label"] if operation is not None else None, "others": others, "root": root,
                "operations": sorted(touched), "completed": sorted(set(completed))}

    def revoke_jobs(self, job_ids: list[str], terminate: bool = False) -> None:
        """Revoke messages already out; a broker error is logged (claims in the store still stop SpawnTasks)."""
        if self.revoke is None or not job_ids:
            return
        try:
            self.revoke(job_ids, terminate=terminate)
        except Exception as exc:
            logger.warning("revoking %d running jobs failed: %s", len(job_ids), exc)
