"""A user's module, type-checked with ``mypy --strict`` against the installed package
(``tests/unit/test_typing.py``): every public name must reach a user's type checker typed."""
from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from celery import Celery
from celery.canvas import Signature

import celery_spawn
from celery_spawn import (
    DependencyError,
    HandlerError,
    HandlerNotFound,
    JobNotFound,
    OperationConflict,
    ParentJob,
    PayloadTooLarge,
    SpawnConfig,
    SpawnConfigError,
    SpawnContext,
    SpawnDepthExceeded,
    SpawnError,
    SpawnHandler,
    SpawnLimitExceeded,
    SpawnManager,
    SpawnResult,
    SpawnTask,
    SpawnValidationError,
    StoreError,
    cancel,
    child_id,
    completion_task_id,
    depends_on,
    install,
    recover,
    resolve_operation,
    with_spawn_config,
    with_spawn_handler,
)

app = Celery("proj", broker="memory://")
manager = SpawnManager()
install(app, manager, database_url="sqlite://")


class Chunks(SpawnHandler):
    def validate_spawn(self, parent: ParentJob, config: SpawnConfig) -> None:
        if not parent.arguments.get("dataset_id"):
            raise ValueError("no dataset_id")

    def spawn_jobs(self, context: SpawnContext) -> Iterator[Signature]:
        previous: str = context.parent.id
        for i in range(3):
            sig = process.s(i)
            context.freeze(sig)
            yield depends_on(sig, previous)
            previous = sig.id or previous

    def on_spawn_complete(self, result: SpawnResult) -> None:
        ids: list[str] = list(result.spawned_job_ids)
        first: str = child_id(result.operation_id, 0)
        assert first in ids or not ids


manager.register_handler("chunks", Chunks)


@app.task(base=SpawnTask, spawn_handler="chunks")
def parent(dataset_id: str) -> str:
    return dataset_id


@app.task
def process(i: int) -> int:
    return i


config: SpawnConfig = SpawnConfig(max_spawn_count=10).with_max_spawn_count(20).with_inherit_priority(True)
sig: Signature = with_spawn_config(with_spawn_handler(parent.s("ds"), "chunks"), config)
counts: dict[str, Any] = cancel(app, "op-1")
published: int = recover(app, grace_seconds=1.0)
found: dict[str, Any] | None = resolve_operation(app, "op-1")
callback_id: str = completion_task_id("op-1")
version: str = celery_spawn.__version__

errors: tuple[type[SpawnError], ...] = (
    SpawnConfigError, SpawnLimitExceeded, SpawnDepthExceeded, PayloadTooLarge, HandlerNotFound, HandlerError,
    SpawnValidationError, DependencyError, OperationConflict, StoreError, JobNotFound,
)
