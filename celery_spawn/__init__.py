"""celery-spawn: dynamic job spawning for Celery, with lineage in a SQL sidecar store.

Public names are imported on first use, so that ``celery`` commands (which all
load the ``celery spawn`` plugin) do not pay for SQLAlchemy at start-up.
"""
from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

_EXPORTS = {
    # spawning
    "SpawnTask": "task", "SpawnHandler": "handlers", "SpawnContext": "handlers", "SpawnManager": "handlers",
    "SpawnConfig": "config", "SpawnResult": "handlers", "ParentJob": "handlers", "child_id": "handlers",
    "install": "app", "get_state": "app", "recover": "control", "cancel": "control",
    "completion_task_id": "control", "resolve_operation": "control", "purge": "control",
    # results
    "OperationResult": "results", "operations_of": "results",
    # signatures
    "with_spawn_handler": "signatures", "with_spawn_config": "signatures", "depends_on": "signatures",
    # errors
    "SpawnError": "errors", "SpawnConfigError": "errors", "SpawnLimitExceeded": "errors",
    "SpawnDepthExceeded": "errors", "PayloadTooLarge": "errors", "HandlerNotFound": "errors", "HandlerError": "errors",
    "SpawnValidationError": "errors", "DependencyError": "errors", "OperationConflict": "errors",
    "InvalidJobId": "errors", "StoreError": "errors", "JobNotFound": "errors",
}

__all__ = list(_EXPORTS)


def _register_embedded_transport() -> None:
    """``spawnfs://``: the server-less broker of :mod:`celery_spawn.transport.spawnfs` (imported only when used)."""
    from kombu.transport import TRANSPORT_ALIASES

    TRANSPORT_ALIASES.setdefault("spawnfs", "celery_spawn.transport.spawnfs:Transport")


_register_embedded_transport()


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'celery_spawn' has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *__all__])


if TYPE_CHECKING:  # pragma: no cover - for type checkers and IDEs
    # ruff: noqa: F401
    from .app import get_state as get_state
    from .app import install as install
    from .config import SpawnConfig as SpawnConfig
    from .control import cancel as cancel
    from .control import completion_task_id as completion_task_id
    from .control import purge as purge
    from .control import recover as recover
    from .control import resolve_operation as resolve_operation
    from .errors import DependencyError as DependencyError
    from .errors import HandlerError as HandlerError
    from .errors import HandlerNotFound as HandlerNotFound
    from .errors import InvalidJobId as InvalidJobId
    from .errors import JobNotFound as JobNotFound
    from .errors import OperationConflict as OperationConflict
    from .errors import PayloadTooLarge as PayloadTooLarge
    from .errors import SpawnConfigError as SpawnConfigError
    from .errors import SpawnDepthExceeded as SpawnDepthExceeded
    from .errors import SpawnError as SpawnError
    from .errors import SpawnLimitExceeded as SpawnLimitExceeded
    from .errors import SpawnValidationError as SpawnValidationError
    from .errors import StoreError as StoreError
    from .handlers import ParentJob as ParentJob
    from .handlers import SpawnContext as SpawnContext
    from .handlers import SpawnHandler as SpawnHandler
    from .handlers import SpawnManager as SpawnManager
    from .handlers import SpawnResult as SpawnResult
    from .handlers import child_id as child_id
    from .results import OperationResult as OperationResult
    from .results import operations_of as operations_of
    from .signatures import depends_on as depends_on
    from .signatures import with_spawn_config as with_spawn_config
    from .signatures import with_spawn_handler as with_spawn_handler
    from .task import SpawnTask as SpawnTask
