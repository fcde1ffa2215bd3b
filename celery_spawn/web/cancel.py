"""Cancelling an operation from the web API, through the one cancel (:mod:`celery_spawn.engine.cancel`).

With the Celery app (``serve -A proj``), undispatched children are cancelled,
running ones revoked, and the operation's ``on_complete`` callback runs.
Without one the server has no broker: the same cancel runs store-only. It
cancels the children never dispatched and leaves running ones to their
workers; a completed operation's callback is left for a worker's recovery
sweep to publish.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from celery import Celery

    from ..store import SpawnStore

__all__ = ["STORE_ONLY_NOTE", "cancel_operation"]

#: Why a store-only cancel does less, said in its response.
STORE_ONLY_NOTE = ("store only: this server has no Celery app (serve it with -A), so children already "
                   "dispatched or running were not revoked, and an on_complete callback is left to the workers")
#: The error recorded on children cancelled here.
REASON = "cancelled from the web API"


def cancel_operation(store: SpawnStore, celery_app: Celery | None, operation_id: str, *,
                     terminate: bool = False) -> dict[str, Any]:
    """Cancel an operation (it must exist) through Celery when possible, else in the store only.

    ``operation_id`` may be a label: the newest operation with that label is
    cancelled, and the answer names it and counts the ``others``.
    """
    if celery_app is not None:
        from ..control import cancel

        result = cancel(celery_app, operation_id, terminate=terminate)
        mode, note = "celery", None
    else:
        from ..engine.cancel import Canceller
        from ..engine.completion import Completion

        result = Canceller(store, Completion(store)).cancel(operation_id, reason=REASON, store_only=True)
        mode, note, terminate = "store", STORE_ONLY_NOTE, False
    return {"operation_id": result.get("operation_id") or operation_id, "label": result.get("label"),
            "others": result.get("others", 0), "mode": mode, "cancelled": result["cancelled"],
            "revoked": result["revoked"], "still_running": result["still_running"], "terminate": terminate,
            "operations": result["operations"], "completed": result["completed"], "note": note}
