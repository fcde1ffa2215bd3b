"""celery-spawn: dynamic job spawning for Celery, with lineage in a SQL sidecar store."""
from __future__ import annotations

from .app import get_state, install
from .config import SpawnConfig
from .control import cancel, completion_task_id
from .errors import (
    DependencyError,
    HandlerError,
    HandlerNotFound,
    JobNotFound,
    OperationConflict,
    SpawnConfigError,
    SpawnDepthExceeded,
    SpawnError,
    SpawnLimitExceeded,
    SpawnValidationError,
    StoreError,
)
from .handlers import ParentJob, SpawnContext, SpawnHandler, SpawnManager, SpawnResult, child_id
from .recovery import recover
from .signatures import depends_on, with_spawn_config, with_spawn_handler
from .task import SpawnTask

__version__ = "0.1.0"

__all__ = [
    # spawning
    "SpawnTask", "SpawnHandler", "SpawnContext", "SpawnManager", "SpawnConfig", "SpawnResult", "ParentJob",
    "install", "get_state", "recover", "child_id", "cancel", "completion_task_id",
    # signatures
    "with_spawn_handler", "with_spawn_config", "depends_on",
    # errors
    "SpawnError", "SpawnConfigError", "SpawnLimitExceeded", "SpawnDepthExceeded", "HandlerNotFound",
    "HandlerError", "SpawnValidationError", "DependencyError", "OperationConflict", "StoreError", "JobNotFound",
]
