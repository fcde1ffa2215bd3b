"""SpawnTask: the Celery task base class that spawns children after its body returns."""
from __future__ import annotations

import logging
from typing import Any

from celery import Task

from .config import SpawnConfig
from .errors import StoreError
from .handlers import SpawnHandler, SpawnResult
from .hooks import claim_callback, is_spawned, retry_later, tracker_for, wait_for_store
from .protocol import SPAWN_CONFIG_KWARG
from .state import get_state


logger = logging.getLogger("celery_spawn.task")

#: Spawns with more children than this list none in the parent's result (each one is a few dozen bytes
#: of the parent's result, read back whole); :func:`celery_spawn.operations_of` reaches any number.
MAX_CHILDREN_IN_PARENT = 1000


class SpawnTask(Task):  # type: ignore[type-arg]
    """Base class for tasks that spawn children: ``@app.task(base=SpawnTask, bind=True)``.

    A call carrying ``_spawn_config`` (or a task declared with
    ``spawn_handler=``/``spawn_config=``) hands its finished result to a spawn
    handler. The lineage is recorded *inside* the task call, so a store
    failure fails (or retries) the parent visibly; a refused spawn leaves the
    parent's result standing and is recorded as a failed operation.
    """

    #: ``_spawn_config`` is not in the user function's signature: skip Celery's argument check.
    typing = False
    #: Name of the handler (or a SpawnHandler) every call of this task spawns through.
    spawn_handler: str | SpawnHandler | None = None
    #: Default SpawnConfig (or its dict form) of every call; a call's ``_spawn_config`` overrides it key by key.
    spawn_config: SpawnConfig | dict[str, Any] | None = None
    #: A spawned call claims its start in the store, so a second copy of its message never runs the body
    #: (what lets the recovery sweep publish again a message the broker lost).
    spawn_claims_start = True

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        call_config = kwargs.pop(SPAWN_CONFIG_KWARG, None)
        if self.request.called_directly:
            # A plain function call: no task id, so nothing to spawn from.
            return super().__call__(*args, **kwargs)
        claim_callback(self)  # an on_complete runs once, whatever its class
        tracker = tracker_for(self) if is_spawned(self) else None
        if tracker is not None:
            try:
                tracker.skip_duplicate(self)  # a child that already finished is not run twice
            except StoreError as exc:  # without the store we cannot tell a duplicate: run later, not twice
                wait_for_store(self, exc)
        result = self.run(*args, **kwargs)
        if self.spawns(call_config):
            try:
                self._add_to_parent(self.spawn(result, call_config))
            except StoreError as exc:
                # autoretry_for wraps only run(): honour it for the spawn too.
                retry_for = tuple(getattr(self, "autoretry_for", None) or ())
                if retry_for and isinstance(exc, retry_for):
                    retry_later(self, exc, **(getattr(self, "retry_kwargs", None) or {}))
                raise
        return result

    def spawns(self, call_config: Any) -> bool:
        """Whether this call spawns: it carries a config, or the task declares a handler or config."""
        return call_config is not None or self.spawn_handler is not None or self.spawn_config is not None

    def _add_to_parent(self, spawned: SpawnResult | None) -> None:
        """List the children in this task's own result (``AsyncResult(parent).children``), as Celery does
        for subtasks sent with ``add_to_parent``: for spawns of up to :data:`MAX_CHILDREN_IN_PARENT`."""
        if spawned is None or not self.trail or not get_state(self.app).settings.add_to_parent:
            return
        if len(spawned.spawned_job_ids) > MAX_CHILDREN_IN_PARENT:
            return
        children: list[Any] = self.request.children
        children.extend(self.AsyncResult(child) for child in spawned.spawned_job_ids)

    def spawn(self, result: Any, call_config: Any = None) -> SpawnResult | None:
        """Run the spawn for the current request (normally called by ``__call__``)."""
        return get_state(self.app).spawner.spawn(self, result, call_config)
