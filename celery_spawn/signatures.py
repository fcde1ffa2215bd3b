"""Helpers on Celery signatures: the seed's ``JobSpawnExt`` and ``depends_on_jobs``."""
from __future__ import annotations

from typing import Any, Mapping, cast

from celery.canvas import Signature

from .config import SpawnConfig
from .errors import DependencyError, SpawnConfigError
from .protocol import DEPENDS_ON_OPTION, IGNORE_FAILURE_OPTION, SPAWN_CONFIG_KWARG

__all__ = ["DEPENDS_ON_OPTION", "IGNORE_FAILURE_OPTION", "SPAWN_CONFIG_KWARG", "depends_on", "with_spawn_config",
           "with_spawn_handler"]


def _spawn_kwarg(sig: Signature) -> dict[str, Any]:
    if not isinstance(sig, Signature):
        raise TypeError(f"expected a Celery signature, not {type(sig).__name__}")
    kwargs = sig.kwargs if sig.kwargs is not None else {}
    current = kwargs.get(SPAWN_CONFIG_KWARG) or {}
    if not isinstance(current, Mapping):
        raise SpawnConfigError(f"{SPAWN_CONFIG_KWARG} must be a dict, not {type(current).__name__}")
    current = dict(current)
    kwargs[SPAWN_CONFIG_KWARG] = current
    sig["kwargs"] = kwargs
    return current


def with_spawn_handler(sig: Signature, name: str) -> Signature:
    """Make the task of ``sig`` spawn through the handler registered as ``name``."""
    SpawnConfig(handler=name)  # validates the name
    _spawn_kwarg(sig)["handler"] = name
    return sig


def with_spawn_config(sig: Signature, config: SpawnConfig | Mapping[str, Any]) -> Signature:
    """Attach ``config`` (merged key by key over what ``sig`` already carries)."""
    parsed = SpawnConfig.from_dict(config) if not isinstance(config, SpawnConfig) else config
    _spawn_kwarg(sig).update(parsed.to_dict())
    return sig


def _job_id_of(item: Any) -> str:
    if isinstance(item, str) and item:
        return item
    if isinstance(item, Signature):
        task_id = item.options.get("task_id")
        if not task_id:
            raise DependencyError("depends_on() got a signature without an id: freeze it first (context.freeze)")
        return cast(str, task_id)
    job_id = getattr(item, "id", None)  # AsyncResult and friends
    if isinstance(job_id, str) and job_id:
        return job_id
    raise DependencyError(f"depends_on() takes job ids, frozen signatures or results, not {item!r}")


def depends_on(sig: Signature, *jobs: Any, ignore_failure: bool = False) -> Signature:
    """Record that ``sig`` may run only after every job in ``jobs`` has succeeded.

    With ``ignore_failure=True`` these dependencies count as met when they end
    in failure too, instead of cancelling ``sig``.
    """
    if not isinstance(sig, Signature):
        raise TypeError(f"expected a Celery signature, not {type(sig).__name__}")
    ids = [_job_id_of(job) for job in jobs]
    existing = list(sig.options.get(DEPENDS_ON_OPTION) or [])
    sig.options[DEPENDS_ON_OPTION] = existing + [i for i in ids if i not in existing]
    if ignore_failure:
        ignored = list(sig.options.get(IGNORE_FAILURE_OPTION) or [])
        sig.options[IGNORE_FAILURE_OPTION] = ignored + [i for i in ids if i not in ignored]
    return sig
