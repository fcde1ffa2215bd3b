"""SpawnConfig: the options of one spawn, with the seed's builder names and payload keys.

A config remembers which keys were set explicitly, so that a call's own
``_spawn_config`` overrides a task's defaults key by key and ``to_dict()``
carries only what the caller chose.
"""
from __future__ import annotations

import dataclasses
import json
import math
from datetime import timedelta
from typing import Any, Mapping

from .errors import PayloadTooLarge, SpawnConfigError
from .protocol import HARD_MAX_DEPTH, ID_RULE, is_valid_id

DEFAULT_MAX_SPAWN_COUNT = 100
DEFAULT_BATCH_SIZE = 500
DEFAULT_MAX_DEPTH = 10
#: Absolute limits no payload can lift (the app's ``spawn_max_spawn_count_ceiling`` may lower the first).
HARD_MAX_SPAWN_COUNT = 10_000_000
HARD_MAX_BATCH_SIZE = 100_000
HARD_MAX_SPAWN_DELAY_MS = 24 * 3600 * 1000
MAX_OPERATION_ID_LENGTH = 64
#: Levels of lists and dicts a payload may nest by default (``spawn_max_payload_depth``).
DEFAULT_MAX_PAYLOAD_DEPTH = 64
#: No setting lifts the depth above this: Celery's prefork pool fails to pickle a message whose
#: arguments nest about 480 levels, and JSON stops near 1,000.
HARD_MAX_PAYLOAD_DEPTH = 256
#: Bytes a payload may take encoded by default (``spawn_max_payload_bytes``): a spawn's config, each child's message.
DEFAULT_MAX_PAYLOAD_BYTES = 1 << 20
#: No setting lifts the size above RabbitMQ's default largest message.
HARD_MAX_PAYLOAD_BYTES = 128 << 20
MAX_HANDLER_NAME_LENGTH = 255


@dataclasses.dataclass(frozen=True)
class SpawnConfig:
    """How one spawn behaves: limits, inheritance, pacing, completion."""

    handler: str | None = None
    max_spawn_count: int = DEFAULT_MAX_SPAWN_COUNT
    operation_id: str | None = None
    inherit_priority: bool = True
    inherit_queue: bool = False
    spawn_delay_ms: int = 0
    batch_size: int = DEFAULT_BATCH_SIZE
    metadata: dict[str, Any] | None = None
    max_depth: int = DEFAULT_MAX_DEPTH
    on_complete: dict[str, Any] | None = None
    wait_for_descendants: bool = False
    fail_fast: bool = False
    inherit_trace_context: bool = True
    _explicit: frozenset[str] = dataclasses.field(default=frozenset(), repr=False, compare=False)

    def __init__(self, **options: Any) -> None:
        defaults = {f.name: f.default for f in _FIELDS}
        for key in options:
            if key not in defaults:
                raise SpawnConfigError(f"unknown spawn config option {key!r}; known: {', '.join(sorted(defaults))}")
        merged = {**defaults, **options}
        for name, value in merged.items():
            object.__setattr__(self, name, value)
        object.__setattr__(self, "_explicit", frozenset(options))
        self.validate()

    @classmethod
    def new(cls) -> SpawnConfig:
        """The seed's ``SpawnConfig::new()``: every option at its default."""
        return cls()

    # ---- builders (the seed's names) -------------------------------------------------
    def _with(self, **changes: Any) -> SpawnConfig:
        return SpawnConfig(**{**self._explicit_values(), **changes})

    def with_handler(self, name: str) -> SpawnConfig:
        return self._with(handler=name)

    def with_max_spawn_count(self, count: int) -> SpawnConfig:
        return self._with(max_spawn_count=count)

    def with_inherit_priority(self, inherit: bool = True) -> SpawnConfig:
        return self._with(inherit_priority=inherit)

    def with_inherit_queue(self, inherit: bool = True) -> SpawnConfig:
        return self._with(inherit_queue=inherit)

    def with_spawn_delay(self, delay: timedelta | float | int) -> SpawnConfig:
        """Space child dispatches by ``delay``: a ``timedelta``, or a bare number of **seconds** (as Celery's
        ``countdown``). The payload holds milliseconds (``spawn_delay_ms``); :meth:`with_spawn_delay_ms` takes them."""
        if isinstance(delay, timedelta):
            seconds = delay.total_seconds()
        elif isinstance(delay, (int, float)) and not isinstance(delay, bool):
            seconds = float(delay)
        else:
            raise SpawnConfigError(f"spawn delay must be a timedelta or seconds, not {type(delay).__name__}")
        if not math.isfinite(seconds):
            raise SpawnConfigError(f"spawn_delay_ms must be a finite number of milliseconds, got {seconds!r} s")
        return self._with(spawn_delay_ms=round(seconds * 1000))

    def with_spawn_delay_ms(self, milliseconds: int) -> SpawnConfig:
        """Space child dispatches by a whole number of **milliseconds** (the seed's ``Duration::from_millis``)."""
        if isinstance(milliseconds, bool) or not isinstance(milliseconds, int):
            raise SpawnConfigError(f"spawn_delay_ms must be a whole number of milliseconds, not {milliseconds!r}")
        return self.with_spawn_delay(timedelta(milliseconds=milliseconds))

    def with_operation_id(self, operation_id: str) -> SpawnConfig:
        return self._with(operation_id=operation_id)

    def with_batch_size(self, size: int) -> SpawnConfig:
        return self._with(batch_size=size)

    def with_metadata(self, metadata: dict[str, Any]) -> SpawnConfig:
        return self._with(metadata=metadata)

    def with_max_depth(self, depth: int) -> SpawnConfig:
        return self._with(max_depth=depth)

    def with_on_complete(self, signature: Any, *, wait_for_descendants: bool | None = None) -> SpawnConfig:
        """Apply ``signature`` once every child (or descendant) is final."""
        changes: dict[str, Any] = {"on_complete": dict(signature)}
        if wait_for_descendants is not None:
            changes["wait_for_descendants"] = wait_for_descendants
        return self._with(**changes)

    def with_fail_fast(self, fail_fast: bool = True) -> SpawnConfig:
        return self._with(fail_fast=fail_fast)

    def with_inherit_trace_context(self, inherit: bool = True) -> SpawnConfig:
        """Put the children in the parent's trace (OpenTelemetry, Sentry), or (False) let each start its own."""
        return self._with(inherit_trace_context=inherit)

    # ---- conversions ------------------------------------------------------------------
    @property
    def spawn_delay(self) -> timedelta:
        return timedelta(milliseconds=self.spawn_delay_ms)

    def _explicit_values(self) -> dict[str, Any]:
        return {name: getattr(self, name) for name in self._explicit}

    def to_dict(self) -> dict[str, Any]:
        """The payload form (the seed's keys), holding the keys that were set explicitly."""
        return {f.name: getattr(self, f.name) for f in _FIELDS if f.name in self._explicit}

    @classmethod
    def from_dict(cls, payload: Mapping[str, Any]) -> SpawnConfig:
        """Parse a ``_spawn_config`` payload; every problem names its key."""
        if isinstance(payload, SpawnConfig):
            return payload
        if not isinstance(payload, Mapping):
            raise SpawnConfigError(f"_spawn_config must be a dict, not {type(payload).__name__}")
        for key in payload:
            if not isinstance(key, str):
                raise SpawnConfigError(f"_spawn_config keys must be strings, got {key!r}")
        return cls(**dict(payload))

    def merged(self, overrides: SpawnConfig | Mapping[str, Any] | None) -> SpawnConfig:
        """This config with ``overrides`` applied key by key."""
        if overrides is None:
            return self
        other = overrides if isinstance(overrides, SpawnConfig) else SpawnConfig.from_dict(overrides)
        return SpawnConfig(**{**self._explicit_values(), **other._explicit_values()})

    # ---- validation -------------------------------------------------------------------
    def validate(self) -> None:
        _check_optional_str("handler", self.handler, MAX_HANDLER_NAME_LENGTH)
        _check_optional_str("operation_id", self.operation_id, MAX_OPERATION_ID_LENGTH)
        if self.operation_id is not None and not is_valid_id(self.operation_id):
            raise SpawnConfigError(f"operation_id {self.operation_id!r} must be {ID_RULE}: the label every tool "
                                   f"takes (celery spawn list --operation, tree, cancel, the web API)")
        _check_int("max_spawn_count", self.max_spawn_count, 0, HARD_MAX_SPAWN_COUNT)
        _check_int("spawn_delay_ms", self.spawn_delay_ms, 0, HARD_MAX_SPAWN_DELAY_MS)
        _check_int("batch_size", self.batch_size, 1, HARD_MAX_BATCH_SIZE)
        _check_int("max_depth", self.max_depth, 0, HARD_MAX_DEPTH)
        for name in ("inherit_priority", "inherit_queue", "wait_for_descendants", "fail_fast", "inherit_trace_context"):
            if not isinstance(getattr(self, name), bool):
                raise SpawnConfigError(f"{name} must be true or false, not {getattr(self, name)!r}")
        if self.metadata is not None and not isinstance(self.metadata, dict):
            raise SpawnConfigError(f"metadata must be a dict, not {type(self.metadata).__name__}")
        for name in ("metadata", "on_complete"):
            value = getattr(self, name)
            if value is not None:
                check_depth(name, value, HARD_MAX_PAYLOAD_DEPTH, setting=None)
                try:
                    json.dumps(value)
                except (TypeError, ValueError, RecursionError) as exc:
                    raise SpawnConfigError(f"{name} must be JSON-serialisable: {exc}") from None
        if self.on_complete is not None:
            if not isinstance(self.on_complete, dict) or not isinstance(self.on_complete.get("task"), str):
                raise SpawnConfigError("on_complete must be a signature or its dict form with a 'task' name")


_FIELDS = [f for f in dataclasses.fields(SpawnConfig) if not f.name.startswith("_")]
CONFIG_KEYS = frozenset(f.name for f in _FIELDS)


_CONTAINERS = (Mapping, list, tuple, set, frozenset)


def nesting_depth(value: Any, limit: int = HARD_MAX_PAYLOAD_DEPTH) -> int:
    """How many lists, tuples, sets and dicts ``value`` nests on its deepest path (a scalar: 0, ``{"a": 1}``: 1).

    Walks without recursion and stops past ``limit`` (returning ``limit + 1``), so no nesting, not even
    a list that holds itself, can exhaust the stack or take long.
    """
    if not isinstance(value, _CONTAINERS):
        return 0
    deepest = 0
    stack = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if depth > deepest:
            deepest = depth
            if deepest > limit:
                return limit + 1
        for inner in (item.values() if isinstance(item, Mapping) else item):
            if isinstance(inner, _CONTAINERS):
                stack.append((inner, depth + 1))
    return deepest


def check_depth(what: str, value: Any, limit: int, setting: str | None = "spawn_max_payload_depth") -> None:
    """Refuse ``value`` with :class:`PayloadTooLarge` when it nests more than ``limit`` levels."""
    if nesting_depth(value, limit) > limit:
        raise too_deep(what, limit, setting)


def too_deep(what: str, limit: int, setting: str | None = "spawn_max_payload_depth") -> PayloadTooLarge:
    """The error of a payload nested past ``limit``, naming the setting that bounds it."""
    bound = f"{setting}={limit}" if setting else "the most any payload may nest"
    return PayloadTooLarge(f"{what}: nested more than {limit} levels of lists and dicts deep ({bound})")


def check_size(what: str, encoded: str | bytes | None, limit: int) -> None:
    """Refuse an encoded payload with :class:`PayloadTooLarge` when it is longer than ``limit`` bytes."""
    if encoded is not None and len(encoded) > limit:
        raise PayloadTooLarge(f"{what}: {len(encoded)} bytes encoded, more than spawn_max_payload_bytes={limit}")


def _check_int(name: str, value: Any, low: int, high: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise SpawnConfigError(f"{name} must be an integer, not {value!r}")
    if not low <= value <= high:
        raise SpawnConfigError(f"{name} must be between {low} and {high}, got {value}")


def _check_optional_str(name: str, value: Any, max_length: int) -> None:
    if value is None:
        return
    if not isinstance(value, str) or not value.strip():
        raise SpawnConfigError(f"{name} must be a non-empty string, not {value!r}")
    if not value.isprintable():
        raise SpawnConfigError(f"{name} must not contain control characters, got {value!r}")
    if len(value) > max_length:
        raise SpawnConfigError(f"{name} must be at most {max_length} characters, got {len(value)}")
