"""Per-app settings, read once from ``app.conf`` (``spawn_*``) and the environment (``CELERY_SPAWN_*``).

Order of precedence: named defaults, then ``app.conf``, then environment
variables, then explicit arguments given to :func:`celery_spawn.install`.
"""
from __future__ import annotations

import dataclasses
import os
from typing import Any, Mapping

from celery.exceptions import ImproperlyConfigured

from .config import DEFAULT_MAX_SPAWN_COUNT, HARD_MAX_SPAWN_COUNT

DEFAULT_DATABASE_URL = "sqlite:///celery_spawn.sqlite3"
ENV_PREFIX = "CELERY_SPAWN_"
CONF_PREFIX = "spawn_"


@dataclasses.dataclass(frozen=True)
class SpawnSettings:
    """The app-wide settings of celery-spawn (``app.conf.spawn_<name>``)."""

    #: SQLAlchemy URL of the lineage store; SQLite in the working directory by default.
    database_url: str = DEFAULT_DATABASE_URL
    #: Hard ceiling on children per spawn, whatever a payload asks.
    max_spawn_count_ceiling: int = HARD_MAX_SPAWN_COUNT
    #: ``max_spawn_count`` when neither the task nor the call sets one.
    default_max_spawn_count: int = DEFAULT_MAX_SPAWN_COUNT
    #: Seconds between recovery sweeps in each worker; 0 turns the sweep off.
    recovery_interval: float = 30.0
    #: Seconds an operation may sit untouched with undispatched children before the sweep publishes them.
    recovery_grace: float = 60.0
    #: Create or upgrade the store's tables on first use.
    auto_migrate: bool = True
    #: Track the state of spawned children from worker signals.
    track_states: bool = True
    #: Bearer token for the web API (required off loopback and for mutating endpoints).
    api_token: str | None = None
    #: Extra keyword arguments for ``sqlalchemy.create_engine``.
    engine_options: dict | None = None

    @classmethod
    def load(cls, conf: Mapping[str, Any] | None = None, environ: Mapping[str, str] | None = None,
             **explicit: Any) -> SpawnSettings:
        conf = conf or {}
        environ = os.environ if environ is None else environ
        values: dict[str, Any] = {}
        for field in dataclasses.fields(cls):
            value = field.default
            conf_value = _conf_get(conf, CONF_PREFIX + field.name)
            if conf_value is not None:
                value = conf_value
            env_value = environ.get(ENV_PREFIX + field.name.upper())
            if env_value not in (None, ""):
                value = env_value
            if explicit.get(field.name) is not None:
                value = explicit.pop(field.name)
            values[field.name] = _coerce(field.name, field.type, value)
        if explicit:
            raise ImproperlyConfigured(f"unknown celery-spawn setting(s): {', '.join(sorted(explicit))}")
        return cls(**values)


def _conf_get(conf: Any, key: str) -> Any:
    try:
        return conf.get(key)
    except Exception:  # pragma: no cover - odd mapping types
        return None


def _coerce(name: str, kind: str, value: Any) -> Any:
    if value is None:
        return None
    try:
        if "bool" in kind:
            if isinstance(value, str):
                lowered = value.strip().lower()
                if lowered in ("1", "true", "yes", "on"):
                    return True
                if lowered in ("0", "false", "no", "off"):
                    return False
                raise ValueError(value)
            return bool(value)
        if kind.startswith("int"):
            number = int(value)
            if number < 0:
                raise ValueError(value)
            return number
        if kind.startswith("float"):
            number = float(value)
            if number < 0:
                raise ValueError(value)
            return number
        if kind.startswith("dict"):
            if not isinstance(value, dict):
                raise ValueError(value)
            return value
        return str(value)
    except (TypeError, ValueError):
        raise ImproperlyConfigured(
            f"setting spawn_{name} (env {ENV_PREFIX}{name.upper()}) has an invalid value"
        ) from None
