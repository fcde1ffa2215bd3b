"""Celery-style result handles for spawn operations: wait for one, follow its progress, read its children.

An :class:`OperationResult` is to a spawn what ``GroupResult`` is to a
``group``: it answers from the lineage store (the operation's state and its
children's counts) and from the result backend (the children's return values).
"""
from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any

from . import errors
from .control import cancel as cancel_tree
from .errors import InvalidJobId, JobNotFound, SpawnError
from .protocol import OP_FAILED, OP_PARTIALLY_FAILED, OP_RUNNING, OP_SUCCEEDED, is_valid_id
from .state import get_state
from .store import queries

if TYPE_CHECKING:
    from celery import Celery
    from celery.result import AsyncResult, ResultSet

__all__ = ["OperationResult", "operations_of"]


class OperationResult:
    """The handle of one spawn operation: ``OperationResult(operation_id_or_label, app=None)``.

    ``operation`` is an operation id (``SpawnResult.operation_id``, or one
    from :func:`operations_of`) or a label (the ``operation_id`` a spawn
    config gave), which names the newest operation with that label once it
    exists. ``app`` defaults to Celery's current app.
    """

    def __init__(self, operation: str, app: Celery | None = None) -> None:
        if not isinstance(operation, str) or not is_valid_id(operation):
            raise InvalidJobId(f"not an operation id or label: {operation!r}")
        self.app = _app(app)
        self.operation = operation
        self._id: str | None = None

    def __repr__(self) -> str:
        return f"<OperationResult: {self.id or self.operation}>"

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, OperationResult):
            return NotImplemented
        return (self.id or self.operation) == (other.id or other.operation) and self.app is other.app

    def __hash__(self) -> int:
        return hash(self.id or self.operation)

    # ---- what the store knows -------------------------------------------------------------------
    @property
    def id(self) -> str | None:
        """The operation's id (a label resolved to its newest operation); None while it does not exist yet."""
        if self._id is None:
            store = get_state(self.app).store
            with store.read() as conn:
                operation, _ = store.resolve_operation(conn, self.operation)
            if operation is not None:
                self._id = operation["id"]
        return self._id

    def _status(self) -> dict[str, Any] | None:
        operation_id = self.id
        if operation_id is None:
            return None
        with get_state(self.app).store.read() as conn:
            return queries.operation_status(conn, operation_id)

    def _known(self) -> dict[str, Any]:
        status = self._status()
        if status is None:
            raise JobNotFound(f"no spawn operation {self.operation!r} in the store")
        return status

    @property
    def state(self) -> str:
        """``running``, ``succeeded``, ``failed``, ``partially_failed`` or ``cancelled``.

        An operation the store does not hold yet (a label asked for before
        its spawn ran) is ``running``, as Celery calls an unknown task PENDING.
        """
        status = self._status()
        return OP_RUNNING if status is None else status["state"]

    def ready(self) -> bool:
        """Whether the operation is complete: every child final, or the spawn refused."""
        status = self._status()
        return status is not None and _complete(status)

    def successful(self) -> bool:
        """Whether the operation is complete and every child succeeded."""
        status = self._status()
        return status is not None and _complete(status) and status["state"] == OP_SUCCEEDED

    def failed(self) -> bool:
        """Whether the operation is complete and it failed: refused, or some children did not succeed."""
        status = self._status()
        return status is not None and _complete(status) and status["state"] in (OP_FAILED, OP_PARTIALLY_FAILED)

    def progress(self) -> dict[str, Any]:
        """``{"done", "total", "percent", "counts"}``: children final, all children, and a count per state."""
        status = self._known()
        return {**status["progress"], "counts": dict(status["counts"])}

    # ---- waiting ----------------------------------------------------------------------------------
    def get(self, timeout: float | None = None, propagate: bool = True, interval: float = 0.5) -> dict[str, Any]:
        """Wait until the operation is complete and return its completion summary.

        The summary is the dict ``on_complete`` receives: ``operation_id``,
        ``parent_id``, ``state``, ``total``, ``counts``, ``failed`` (the
        children that did not succeed, with their errors) and ``results`` (the
        children's return values, read from the result backend in one round
        trip where it can, for up to 1,000 succeeded children).

        With ``propagate`` a refused spawn (over a limit, invalid, a handler
        error) raises its :class:`~celery_spawn.errors.SpawnError` subclass;
        children that failed do not raise: they are listed in ``failed``.
        Raises ``celery.exceptions.TimeoutError`` after ``timeout`` seconds.
        """
        from celery.exceptions import TimeoutError as CeleryTimeoutError

        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            status = self._status()
            if status is not None and _complete(status):
                break
            if deadline is not None and time.monotonic() >= deadline:
                raise CeleryTimeoutError(f"spawn operation {self.operation!r} not complete after {timeout} s")
            pause = interval if deadline is None else min(interval, max(0.0, deadline - time.monotonic()))
            time.sleep(pause)
        refusal = _refusal(status)
        if refusal is not None and propagate:
            raise refusal
        return self._summary(status)

    wait = get

    def _summary(self, status: dict[str, Any]) -> dict[str, Any]:
        summary = get_state(self.app).completion.summary(status, dict(status["counts"]), status["state"])
        if status.get("error") and not summary["total"]:
            summary["error"] = status["error"]
        return summary

    # ---- related results --------------------------------------------------------------------------
    @property
    def children(self) -> ResultSet:
        """A ``ResultSet`` of the children's ``AsyncResult``s, in spawn order (``join_native`` where it can)."""
        from celery.result import ResultSet

        status = self._known()
        with get_state(self.app).store.read() as conn:
            ids = queries.operation_child_ids(conn, status["id"])
        return ResultSet([self.app.AsyncResult(child) for child in ids], app=self.app)

    @property
    def parent(self) -> AsyncResult[Any]:
        """The ``AsyncResult`` of the job that spawned the operation."""
        return self.app.AsyncResult(self._known()["parent_id"])

    def cancel(self, terminate: bool = False) -> dict[str, Any]:
        """Cancel the operation's unfinished children (see :func:`celery_spawn.cancel`)."""
        return cancel_tree(self.app, self._known()["id"], terminate=terminate)


def operations_of(parent: AsyncResult[Any] | str, app: Celery | None = None) -> list[OperationResult]:
    """The operations a job spawned, oldest first, as :class:`OperationResult`\\ s.

    ``parent`` is the spawning job's ``AsyncResult`` or its task id. A job
    spawns once per run, so this is usually one operation; none while the
    parent has not spawned yet.
    """
    parent_id = parent if isinstance(parent, str) else parent.id
    if app is None and not isinstance(parent, str):
        app = parent.app
    app = _app(app)
    with get_state(app).store.read() as conn:
        ids = queries.operations_of(conn, parent_id)
    return [_known_result(operation_id, app) for operation_id in ids]


def _app(app: Celery | None) -> Celery:
    from celery.app import app_or_default

    return app_or_default(app)


def _known_result(operation_id: str, app: Celery) -> OperationResult:
    result = OperationResult(operation_id, app)
    result._id = operation_id
    return result


def _complete(status: dict[str, Any]) -> bool:
    return bool(status["completed"]) or _refused(status)


def _refused(status: dict[str, Any]) -> bool:
    """A spawn refused before it recorded children: failed, no children, its error kept."""
    return status["state"] == OP_FAILED and not status["total"] and bool(status.get("error"))


def _refusal(status: dict[str, Any]) -> SpawnError | None:
    """The exception a refused spawn raised (its class by name from the stored ``Class: message``)."""
    if not _refused(status):
        return None
    text = status["error"]
    name, _, message = text.partition(": ")
    cls = getattr(errors, name, None)
    if isinstance(cls, type) and issubclass(cls, SpawnError):
        return cls(message)
    return SpawnError(text)

