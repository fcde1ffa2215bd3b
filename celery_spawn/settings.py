"""Per-app settings, read once from ``app.conf`` (``spawn_*``) and the environment (``CELERY_SPAWN_*``).

Order of precedence: named defaults, then ``app.conf``, then environment
variables, then explicit arguments given to :func:`celery_spawn.install`.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import re
from typing import Any, Mapping

from celery.exceptions import ImproperlyConfigured

from .config import (DEFAULT_MAX_PAYLOAD_BYTES, DEFAULT_MAX_PAYLOAD_DEPTH, DEFAULT_MAX_SPAWN_COUNT,
                     HARD_MAX_PAYLOAD_BYTES, HARD_MAX_PAYLOAD_DEPTH, HARD_MAX_SPAWN_COUNT)

DEFAULT_DATABASE_URL = "sqlite:///celery_spawn.sqlite3"
ENV_PREFIX = "CELERY_SPAWN_"
CONF_PREFIX = "spawn_"
#: What SQLAlchemy's ``make_url`` accepts as the start of a URL: ``name[+driver]://``.
_URL_FORM = re.compile(r"^[\w+]+://")


@dataclasses.dataclass(frozen=True)
class SpawnSettings:
    """The app-wide settings of celery-spawn (``app.conf.spawn_<name>``)."""

    #: SQLAlchemy URL of the lineage store; SQLite in the working directory by default.
    database_url: str = DEFAULT_DATABASE_URL
    #: Hard ceiling on children per spawn, whatever a payload asks.
    max_spawn_count_ceiling: int = HARD_MAX_SPAWN_COUNT
    #: ``max_spawn_count`` when neither the task nor the call sets one.
    default_max_spawn_count: int = DEFAULT_MAX_SPAWN_COUNT
    #: Levels of lists and dicts a ``_spawn_config`` (its ``metadata`` included) and each child's arguments
    #: and options may nest; a deeper one refuses the spawn before anything is recorded or published.
    max_payload_depth: int = DEFAULT_MAX_PAYLOAD_DEPTH
    #: Bytes a spawn's config and each child's message may take encoded (JSON); a larger one refuses the spawn.
    max_payload_bytes: int = DEFAULT_MAX_PAYLOAD_BYTES
    #: Seconds between recovery sweeps in each worker; 0 turns the sweep off.
    recovery_interval: float = 30.0
    #: Seconds between a worker's looks for scheduled children that are due (how late a delayed child may
    #: start at most); 0 turns publishing them off in that worker.
    schedule_interval: float = 0.5
    #: Seconds an operation may sit untouched with undispatched children before the sweep publishes them.
    recovery_grace: float = 60.0
    #: Seconds a dispatched SpawnTask child may go unstarted, while its operation makes no progress,
    #: before the sweep publishes it again (a message the broker lost); 0 turns that off.
    redeliver_after: float = 3600.0
    #: Times the sweep publishes again a child that never starts before it records the child ``lost``.
    redeliver_limit: int = 3
    #: Seconds a store call may wait to connect, for one statement, and for a row lock (0: no limit).
    connect_timeout: float = 10.0
    statement_timeout: float = 60.0
    lock_timeout: float = 30.0
    #: Create or upgrade the store's tables on first use.
    auto_migrate: bool = True
    #: Track the state of spawned children from worker signals.
    track_states: bool = True
    #: Record when a plain (non-SpawnTask) child starts; off saves one commit per child.
    track_started: bool = True
    #: Inside workers, write child starts and finishes from a background thread in batches (one
    #: transaction for whatever gathered) instead of a commit per event on the task's path.
    batch_tracking: bool = True
    #: Wait for the database to flush each commit (PostgreSQL). Off trades the last
    #: fraction of a second of tracking writes on a database crash for far cheaper commits.
    synchronous_commit: bool = True
    #: Prepare the hot tracking statements once per connection (PostgreSQL: psycopg2 by us, psycopg 3 by itself;
    #: off sets its ``prepare_threshold=None``). Turn off behind a pooler that gives each transaction another
    #: server session (PgBouncer transaction mode).
    prepared_statements: bool = True
    #: Bearer token for the web API (required off loopback and for mutating endpoints).
    api_token: str | None = None
    #: Extra keyword arguments for ``sqlalchemy.create_engine``.
    engine_options: dict | None = None
    #: Port on which a worker's main process serves Prometheus ``/metrics`` (every interface); 0: none.
    metrics_port: int = 0

    @classmethod
    def load(cls, conf: Mapping[str, Any] | None = None, environ: Mapping[str, str] | None = None,
             **explicit: Any) -> SpawnSettings:
        conf = conf or {}
        environ = os.environ if environ is None else environ
        explicit = {k: v for k, v in explicit.items() if v is not None}  # None means "not given"
        unknown = set(explicit) - {f.name for f in dataclasses.fields(cls)}
        if unknown:
            raise ImproperlyConfigured(f"unknown celery-spawn setting(s): {', '.join(sorted(unknown))}")
        values: dict[str, Any] = {}
        for field in dataclasses.fields(cls):
            value, source = field.default, "default"
            conf_value = _conf_get(conf, CONF_PREFIX + field.name)
            if conf_value is not None:
                value, source = conf_value, "conf"
            env_value = environ.get(ENV_PREFIX + field.name.upper())
            if env_value not in (None, ""):
                value, source = env_value, "env"
            if field.name in explicit:
                value, source = explicit[field.name], "explicit"
            if source != "default":
                value = _VALIDATORS[field.name](field.name, value)
            values[field.name] = value
        return cls(**values)


def _conf_get(conf: Any, key: str) -> Any:
    try:
        return conf.get(key)
    except Exception:  # pragma: no cover - odd mapping types
        return None


def _invalid(name: str, why: str) -> ImproperlyConfigured:
    return ImproperlyConfigured(f"setting spawn_{name} (env {ENV_PREFIX}{name.upper()}) {why}")


def _integer(low: int, high: int):
    def check(name: str, value: Any) -> int:
        if isinstance(value, bool):
            raise _invalid(name, "must be a whole number, not a boolean")
        if isinstance(value, str):
            try:
                value = int(value.strip())
            except ValueError:
                raise _invalid(name, "must be a whole number") from None
        if isinstance(value, float) and value.is_integer():
            value = int(value)
        if not isinstance(value, int):
            raise _invalid(name, "must be a whole number")
        if not low <= value <= high:
            raise _invalid(name, f"must be between {low} and {high}")
        return value
    return check


def _seconds(high: float):
    def check(name: str, value: Any) -> float:
        if isinstance(value, bool):
            raise _invalid(name, "must be a number of seconds, not a boolean")
        try:
            number = float(value.strip() if isinstance(value, str) else value)
        except (TypeError, ValueError):
            raise _invalid(name, "must be a number of seconds") from None
        if math.isnan(number) or not 0 <= number <= high:
            raise _invalid(name, f"must be between 0 and {high:g} seconds")
        return number
    return check


def _boolean(name: str, value: Any) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, int) and value in (0, 1):
        return bool(value)
    if isinstance(value, str):
        lowered = value.strip().lower()
        if lowered in ("1", "true", "yes", "on"):
            return True
        if lowered in ("0", "false", "no", "off"):
            return False
    raise _invalid(name, "must be true or false")


def _database_url(name: str, value: Any) -> str:
    """A URL's form only (``dialect[+driver]://...``); the store checks the rest when it opens it."""
    if not isinstance(value, str) or not value.strip():
        raise _invalid(name, "must be a non-empty SQLAlchemy URL string")
    if not _URL_FORM.match(value):
        raise _invalid(name, "is not a valid SQLAlchemy URL") from None
    return value


def _optional_text(name: str, value: Any) -> str | None:
    if not isinstance(value, str):
        raise _invalid(name, "must be a string")
    return value or None


def _mapping(name: str, value: Any) -> dict:
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except ValueError:
            raise _invalid(name, "must be a JSON object") from None
    if not isinstance(value, dict):
        raise _invalid(name, "must be a dict (or a JSON object in the environment)")
    return value


_VALIDATORS = {
    "database_url": _database_url,
    "max_spawn_count_ceiling": _integer(1, HARD_MAX_SPAWN_COUNT),
    "default_max_spawn_count": _integer(0, HARD_MAX_SPAWN_COUNT),
    "max_payload_depth": _integer(1, HARD_MAX_PAYLOAD_DEPTH),
    "max_payload_bytes": _integer(1, HARD_MAX_PAYLOAD_BYTES),
    "recovery_interval": _seconds(86_400),
    "recovery_grace": _seconds(7 * 86_400),
    "schedule_interval": _seconds(3_600),
    "connect_timeout": _seconds(3_600),
    "statement_timeout": _seconds(86_400),
    "lock_timeout": _seconds(3_600),
    "redeliver_after": _seconds(7 * 86_400),
    "redeliver_limit": _integer(0, 1_000),
    "auto_migrate": _boolean,
    "track_states": _boolean,
    "track_started": _boolean,
    "batch_tracking": _boolean,
    "synchronous_commit": _boolean,
    "prepared_statements": _boolean,
    "api_token": _optional_text,
    "engine_options": _mapping,
    "metrics_port": _integer(0, 65535),
}
