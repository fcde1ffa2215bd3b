"""SpawnConfig: the seed's builder names and payload keys, key-by-key merging, and refusal of bad values."""
from __future__ import annotations

import json
import math
from datetime import timedelta

import pytest

from celery_spawn import SpawnConfig, SpawnConfigError, SpawnError
from celery_spawn.config import (
    DEFAULT_BATCH_SIZE,
    DEFAULT_MAX_DEPTH,
    DEFAULT_MAX_SPAWN_COUNT,
    HARD_MAX_BATCH_SIZE,
    HARD_MAX_DEPTH,
    HARD_MAX_SPAWN_COUNT,
    HARD_MAX_SPAWN_DELAY_MS,
)

#: The payload keys of the seed, which to_dict()/from_dict() must speak.
SEED_KEYS = {"handler", "max_spawn_count", "operation_id", "inherit_priority", "inherit_queue",
             "spawn_delay_ms", "batch_size", "metadata", "max_depth"}


# ---- defaults and builders ----------------------------------------------------------------------
def test_defaults_are_the_named_constants():
    config = SpawnConfig()
    assert config.handler is None
    assert config.max_spawn_count == DEFAULT_MAX_SPAWN_COUNT == 100
    assert config.operation_id is None
    assert config.inherit_priority is True
    assert config.inherit_queue is False
    assert config.spawn_delay_ms == 0
    assert config.spawn_delay == timedelta(0)
    assert config.batch_size == DEFAULT_BATCH_SIZE
    assert config.metadata is None
    assert config.max_depth == DEFAULT_MAX_DEPTH
    assert config.to_dict() == {}


def test_builders_use_the_seed_names_and_set_every_option():
    config = (SpawnConfig()
              .with_handler("batch_processor")
              .with_max_spawn_count(50)
              .with_inherit_priority(True)
              .with_inherit_queue(False)
              .with_spawn_delay(timedelta(milliseconds=100))
              .with_operation_id("custom-op-123")
              .with_batch_size(10)
              .with_metadata({"image_format": "jpeg", "quality": {"thumbnail": "low"}})
              .with_max_depth(3))
    assert config.to_dict() == {
        "handler": "batch_processor",
        "max_spawn_count": 50,
        "inherit_priority": True,
        "inherit_queue": False,
        "spawn_delay_ms": 100,
        "operation_id": "custom-op-123",
        "batch_size": 10,
        "metadata": {"image_format": "jpeg", "quality": {"thumbnail": "low"}},
        "max_depth": 3,
    }
    assert set(config.to_dict()) == SEED_KEYS


def test_builders_return_new_configs_and_leave_the_original_alone():
    base = SpawnConfig(handler="a")
    changed = base.with_batch_size(7)
    assert changed is not base
    assert base.batch_size == DEFAULT_BATCH_SIZE and base.to_dict() == {"handler": "a"}
    assert changed.to_dict() == {"handler": "a", "batch_size": 7}
    with pytest.raises(Exception):
        base.handler = "b"  # frozen


def test_boolean_builders_default_to_true():
    assert SpawnConfig().with_inherit_queue().inherit_queue is True
    assert SpawnConfig().with_inherit_priority(False).with_inherit_priority().inherit_priority is True


@pytest.mark.parametrize("delay, expected_ms", [
    (timedelta(milliseconds=250), 250),
    (timedelta(seconds=2), 2000),
    (timedelta(0), 0),
    (1.5, 1500),
    (2, 2000),
    (0, 0),
    (0.0004, 0),
])
def test_with_spawn_delay_takes_a_timedelta_or_seconds(delay, expected_ms):
    config = SpawnConfig().with_spawn_delay(delay)
    assert config.spawn_delay_ms == expected_ms
    assert config.spawn_delay == timedelta(milliseconds=expected_ms)
    assert config.to_dict() == {"spawn_delay_ms": expected_ms}


@pytest.mark.parametrize("delay", ["1", None, True, [1], b"1"])
def test_with_spawn_delay_refuses_other_types(delay):
    with pytest.raises(SpawnConfigError, match="delay"):
        SpawnConfig().with_spawn_delay(delay)


@pytest.mark.parametrize("delay", [-1, -0.5, timedelta(seconds=-1), timedelta(days=2), 10 ** 9])
def test_with_spawn_delay_refuses_negative_and_absurd_delays(delay):
    with pytest.raises(SpawnConfigError, match="spawn_delay_ms"):
        SpawnConfig().with_spawn_delay(delay)


@pytest.mark.parametrize("delay", [math.nan, math.inf, -math.inf])
def test_with_spawn_delay_refuses_nan_and_infinity(delay):
    with pytest.raises(SpawnConfigError, match="spawn_delay_ms"):
        SpawnConfig().with_spawn_delay(delay)


# ---- payload form -------------------------------------------------------------------------------
def test_to_dict_holds_only_explicit_keys_even_when_they_equal_a_default():
    config = SpawnConfig(batch_size=DEFAULT_BATCH_SIZE, inherit_priority=True)
    assert config.to_dict() == {"batch_size": DEFAULT_BATCH_SIZE, "inherit_priority": True}


def test_seed_payload_round_trips_through_json():
    payload = {"handler": "data_processor", "max_spawn_count": 15, "operation_id": "op-dataset-123",
               "inherit_priority": True, "spawn_delay_ms": 200}
    config = SpawnConfig.from_dict(payload)
    assert config.handler == "data_processor"
    assert config.max_spawn_count == 15
    assert config.operation_id == "op-dataset-123"
    assert config.spawn_delay == timedelta(milliseconds=200)
    assert config.to_dict() == payload
    again = SpawnConfig.from_dict(json.loads(json.dumps(config.to_dict())))
    assert again == config and again.to_dict() == payload


def test_every_seed_key_round_trips():
    payload = {"handler": "h", "max_spawn_count": 3, "operation_id": "op", "inherit_priority": False,
               "inherit_queue": True, "spawn_delay_ms": 5, "batch_size": 2, "metadata": {"a": [1, 2]},
               "max_depth": 4}
    assert SpawnConfig.from_dict(payload).to_dict() == payload


def test_from_dict_returns_a_config_unchanged():
    config = SpawnConfig(handler="h")
    assert SpawnConfig.from_dict(config) is config


def test_from_dict_does_not_keep_a_reference_to_the_callers_mapping():
    payload = {"handler": "h"}
    config = SpawnConfig.from_dict(payload)
    payload["handler"] = "changed"
    assert config.handler == "h"


@pytest.mark.parametrize("payload", [None, [], ["handler"], "handler", 3, 1.5, True, b"{}", {("handler",)}])
def test_from_dict_refuses_a_non_mapping(payload):
    with pytest.raises(SpawnConfigError, match="_spawn_config must be a dict"):
        SpawnConfig.from_dict(payload)


@pytest.mark.parametrize("key", [1, None, ("handler",), b"handler"])
def test_from_dict_refuses_non_string_keys(key):
    with pytest.raises(SpawnConfigError, match="keys must be strings"):
        SpawnConfig.from_dict({key: "x"})


# ---- merging ------------------------------------------------------------------------------------
def test_merge_overrides_key_by_key():
    task_default = SpawnConfig(handler="h", max_spawn_count=5, batch_size=2)
    merged = task_default.merged({"max_spawn_count": 9, "metadata": {"m": 1}})
    assert merged.to_dict() == {"handler": "h", "max_spawn_count": 9, "batch_size": 2, "metadata": {"m": 1}}
    assert task_default.to_dict() == {"handler": "h", "max_spawn_count": 5, "batch_size": 2}


def test_merge_with_a_config_applies_only_its_explicit_keys():
    base = SpawnConfig(handler="h", batch_size=2, inherit_priority=False)
    merged = base.merged(SpawnConfig(handler="other"))
    # The override's defaults (batch_size=500, inherit_priority=True) do not clobber the base.
    assert merged.handler == "other"
    assert merged.batch_size == 2
    assert merged.inherit_priority is False


def test_merge_with_nothing_is_the_same_config():
    base = SpawnConfig(handler="h")
    assert base.merged(None) is base
    assert base.merged({}).to_dict() == {"handler": "h"}


def test_merge_validates_the_override():
    with pytest.raises(SpawnConfigError, match="batch_size"):
        SpawnConfig(handler="h").merged({"batch_size": 0})
    with pytest.raises(SpawnConfigError, match="colour"):
        SpawnConfig(handler="h").merged({"colour": "red"})


# ---- bad values ---------------------------------------------------------------------------------
BAD_VALUES = [
    # (key, value)
    ("handler", ""), ("handler", "   "), ("handler", 3), ("handler", ["h"]), ("handler", True), ("handler", "h" * 256),
    ("operation_id", ""), ("operation_id", " \t"), ("operation_id", 12), ("operation_id", "o" * 65),
    ("operation_id", {"id": 1}),
    ("max_spawn_count", -1), ("max_spawn_count", True), ("max_spawn_count", False), ("max_spawn_count", 1.0),
    ("max_spawn_count", "10"), ("max_spawn_count", None), ("max_spawn_count", HARD_MAX_SPAWN_COUNT + 1),
    ("max_spawn_count", 10 ** 30), ("max_spawn_count", math.inf), ("max_spawn_count", math.nan),
    ("batch_size", 0), ("batch_size", -5), ("batch_size", True), ("batch_size", 2.5), ("batch_size", "2"),
    ("batch_size", HARD_MAX_BATCH_SIZE + 1), ("batch_size", 2 ** 63),
    ("spawn_delay_ms", -1), ("spawn_delay_ms", True), ("spawn_delay_ms", 1.5), ("spawn_delay_ms", "100"),
    ("spawn_delay_ms", HARD_MAX_SPAWN_DELAY_MS + 1),
    ("max_depth", -1), ("max_depth", True), ("max_depth", 2.0), ("max_depth", HARD_MAX_DEPTH + 1),
    ("max_depth", None),
    ("inherit_priority", 1), ("inherit_priority", 0), ("inherit_priority", "true"), ("inherit_priority", None),
    ("inherit_queue", 1), ("inherit_queue", "yes"), ("inherit_queue", []),
    ("metadata", []), ("metadata", "x"), ("metadata", 1), ("metadata", True), ("metadata", [("a", 1)]),
]


@pytest.mark.parametrize("key, value", BAD_VALUES)
def test_bad_values_raise_spawn_config_error_naming_the_key(key, value):
    for build in (lambda: SpawnConfig(**{key: value}), lambda: SpawnConfig.from_dict({key: value}),
                  lambda: SpawnConfig(handler="h").merged({key: value})):
        with pytest.raises(SpawnConfigError) as raised:
            build()
        assert key in str(raised.value)
        assert isinstance(raised.value, SpawnError) and isinstance(raised.value, ValueError)


@pytest.mark.parametrize("key, value", [
    ("max_spawn_count", 0), ("max_spawn_count", HARD_MAX_SPAWN_COUNT), ("batch_size", 1),
    ("batch_size", HARD_MAX_BATCH_SIZE), ("spawn_delay_ms", HARD_MAX_SPAWN_DELAY_MS), ("max_depth", 0),
    ("max_depth", HARD_MAX_DEPTH), ("handler", "h" * 255), ("operation_id", "o" * 64), ("metadata", {}),
    ("handler", None), ("operation_id", None), ("metadata", None),
])
def test_boundary_values_are_accepted(key, value):
    assert getattr(SpawnConfig(**{key: value}), key) == value


@pytest.mark.parametrize("builder, value, key", [
    ("with_handler", "", "handler"), ("with_max_spawn_count", -1, "max_spawn_count"),
    ("with_max_spawn_count", True, "max_spawn_count"), ("with_batch_size", 0, "batch_size"),
    ("with_operation_id", "", "operation_id"), ("with_metadata", ["x"], "metadata"),
    ("with_max_depth", -1, "max_depth"), ("with_inherit_queue", "no", "inherit_queue"),
    ("with_inherit_priority", 1, "inherit_priority"),
])
def test_builders_validate_too(builder, value, key):
    with pytest.raises(SpawnConfigError, match=key):
        getattr(SpawnConfig(), builder)(value)


@pytest.mark.parametrize("key", ["colour", "max_children", "Handler", "_explicit", "handler ", ""])
def test_unknown_keys_are_refused_with_their_name(key):
    with pytest.raises(SpawnConfigError) as raised:
        SpawnConfig.from_dict({key: 1})
    assert repr(key) in str(raised.value)
    assert "known:" in str(raised.value)


def test_an_unknown_key_is_refused_even_beside_valid_ones():
    with pytest.raises(SpawnConfigError, match="'max_spawn'"):
        SpawnConfig.from_dict({"handler": "h", "max_spawn": 3})


def test_with_spawn_delay_ms_takes_whole_milliseconds():
    assert SpawnConfig().with_spawn_delay_ms(250).to_dict() == {"spawn_delay_ms": 250}
    assert SpawnConfig().with_spawn_delay_ms(250) == SpawnConfig().with_spawn_delay(timedelta(milliseconds=250))
    for bad in (0.5, "250", True):
        with pytest.raises(SpawnConfigError, match="milliseconds"):
            SpawnConfig().with_spawn_delay_ms(bad)
    with pytest.raises(SpawnConfigError, match="spawn_delay_ms"):
        SpawnConfig().with_spawn_delay_ms(-1)
