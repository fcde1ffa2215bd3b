"""Per-app settings, read once from ``app.conf`` (``spawn_*``) and the environment (``CELERY_SPAWN_*``).

Order of precedence: named defaults, then ``app.conf``, then environment
variables, then explicit arguments given to :func:`celery_spawn.install`.

An app configured from Django's settings (``app.config_from_object('django.conf:settings',
namespace='CELERY')``, where ``CELERY_SPAWN_DATABASE_URL`` is ``spawn_database_url``) whose
``INSTALLED_APPS`` has ``celery_spawn.contrib.django`` keeps its store in a Django database when no
``spawn_database_url`` is given: ``DATABASES["default"]``, or the alias ``spawn_database_alias`` names.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import re
from datetime import timedelta
from typing import Any, Mapping

from celery.exceptions import ImproperlyConfigured

from .config import (DEFAULT_MAX_PAYLOAD_BYTES, DEFAULT_MAX_PAYLOAD_DEPTH, DEFAULT_MAX_SPAWN_COUNT,
                     HARD_MAX_PAYLOAD_BYTES, HARD_MAX_PAYLOAD_DEPTH, HARD_MAX_SPAWN_COUNT)
from .dburl import DJANGO_APP, django_database_url, mask_password

DEFAULT_DATABASE_URL = "sqlite:///celery_spawn.sqlite3"
#: ``spawn_expires``: finished trees are kept 30 days, as Celery keeps results a day by default.
DEFAULT_EXPIRES = 30 * 86_400.0
#: A purge's jobs per transaction, and the rest after each step as a multiple of the step's time.
DEFAULT_PURGE_BATCH_SIZE = 2000
DEFAULT_PURGE_PAUSE_RATIO = 1.0
ENV_PREFIX = "CELERY_SPAWN_"
CONF_PREFIX = "spawn_"
#: What SQLAlchemy's ``make_url`` accepts as the start of a URL: ``name[+driver]://``.
_URL_FORM = re.compile(r"^[\w+]+://")
#: The Django database the store uses when no URL is given (Django's settings as the app's configuration).
DEFAULT_DATABASE_ALIAS = "default"

logger = logging.getLogger("celery_spawn")


@dataclasses.dataclass(frozen=True)
class SpawnSettings:
    """The app-wide settings of celery-spawn (``app.conf.spawn_<name>``)."""

    #: SQLAlchemy URL of the lineage store; SQLite in the working directory by default.
    database_url: str = DEFAULT_DATABASE_URL
    #: With Django's settings as the app's configuration and no ``database_url``: the ``DATABASES`` alias
    #: whose database holds the store (``default`` when not set).
    database_alias: str | None = None
    #: With the Django app installed, ``manage.py migrate`` brings the store's tables up to date too.
    django_migrate: bool = True
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
    #: Seconds after its last operation finished that a finished tree is purged (``purge_expired``,
    #: ``celery spawn purge`` without ``--older-than``); a ``timedelta`` or ``"30d"`` too. 0 or None: never.
    expires: float = DEFAULT_EXPIRES
    #: List a spawn's children (up to 1,000) in the parent's own result, ``AsyncResult(parent).children``.
    add_to_parent: bool = True
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
        sources: dict[str, str] = {}
        for field in dataclasses.fields(cls):
            value, source = field.default, "default"
            conf_value = _conf_get(conf, CONF_PREFIX + field.name)
            if conf_value is not None:
                value, source = conf_value, "conf"
            elif field.name in _NONE_MEANS_OFF and _conf_has(conf, CONF_PREFIX + field.name):
                value, source = 0, "conf"  # ``spawn_expires = None``: as Celery's ``result_expires = None``
            env_value = environ.get(ENV_PREFIX + field.name.upper())
            if env_value not in (None, ""):
                value, source = env_value, "env"
            if field.name in explicit:
                value, source = explicit[field.name], "explicit"
            if source != "default":
                value = _VALIDATORS[field.name](field.name, value)
            values[field.name] = value
            sources[field.name] = source
        if sources["database_url"] == "default":
            django_url = _django_database_url(conf, values["database_alias"], sources["database_alias"] != "default")
            if django_url is not None:
                values["database_url"] = django_url
        return cls(**values)

    def __repr__(self) -> str:
        """The settings with the store's password and the API token masked (the repr may reach a log)."""
        shown = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        shown["database_url"] = mask_password(self.database_url)
        if self.api_token:
            shown["api_token"] = "***"
        return f"{type(self).__name__}({', '.join(f'{k}={v!r}' for k, v in shown.items())})"


def _django_database_url(conf: Any, alias: str | None, alias_given: bool) -> str | None:
    """The URL of the Django database the store uses, or None when the app's configuration is not Django's
    settings with celery-spawn's Django app installed (and no alias was asked for)."""
    databases = _conf_get(conf, "DATABASES")
    installed = _conf_get(conf, "INSTALLED_APPS") or ()
    ours = any(isinstance(app, str) and (app == DJANGO_APP or app.startswith(DJANGO_APP + ".apps."))
               for app in installed)
    if not isinstance(databases, Mapping) or not (ours or alias_given):
        if alias_given:
            raise _invalid("database_alias", f"names a Django database ({alias!r}), but the app is not configured "
                           "from Django's settings (app.config_from_object('django.conf:settings', "
                           "namespace='CELERY'))")
        return None
    alias = alias or DEFAULT_DATABASE_ALIAS
    url = django_database_url(databases, alias)
    logger.info("celery-spawn store: Django database %r (%s)", alias, mask_password(url))
    return url


def _conf_get(conf: Any, key: str) -> Any:
    try:
        return conf.get(key)
    except Exception:  # pragma: no cover - odd mapping types
        return None


def _conf_has(conf: Any, key: str) -> bool:
    try:
        return key in conf
    except Exception:  # pragma: no cover - odd mapping types
        return False


_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([smhdw]?)\s*$")
_UNIT_SECONDS = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86_400, "w": 7 * 86_400}


def parse_duration(value: Any) -> float:
    """Seconds from a ``timedelta``, a number of seconds, or text such as ``30d``, ``12h``, ``90m``, ``45s``, ``600``.

    Raises ValueError naming the value for anything else, a negative duration included.
    """
    if isinstance(value, timedelta):
        seconds = value.total_seconds()
    elif isinstance(value, bool):
        raise ValueError(f"not a duration: {value!r}")
    elif isinstance(value, (int, float)):
        seconds = float(value)
    elif isinstance(value, str):
        match = _DURATION.match(value.lower())
        if match is None:
            raise ValueError(f"not a duration: {value!r} (write 30d, 12h, 90m, 45s or a number of seconds)")
        seconds = float(match.group(1)) * _UNIT_SECONDS[match.group(2)]
    else:
        raise ValueError(f"not a duration: {value!r}")
    if math.isnan(seconds) or math.isinf(seconds) or seconds < 0:
        raise ValueError(f"not a duration: {value!r} (it must be 0 or more)")
    return seconds


def _expires(name: str, value: Any) -> float:
    if value is None or (isinstance(value, str) and value.strip().lower() in ("none", "never", "off")):
        return 0.0
    try:
        return parse_duration(value)
    except ValueError as exc:
        raise _invalid(name, f"must be a duration: a timedelta, seconds, or 30d/12h/90m ({exc})") from None


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


#: Settings whose ``None`` in ``app.conf`` means "off", not "the default".
_NONE_MEANS_OFF = frozenset({"expires"})

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
    "add_to_parent": _boolean,
    "expires": _expires,
    "track_started": _boolean,
    "batch_tracking": _boolean,
    "synchronous_commit": _boolean,
    "prepared_statements": _boolean,
    "api_token": _optional_text,
    "database_alias": _optional_text,
    "django_migrate": _boolean,
    "engine_options": _mapping,
    "metrics_port": _integer(0, 65535),
}
