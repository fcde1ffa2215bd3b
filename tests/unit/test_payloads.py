"""Poison payloads: nesting depth and encoded size of configs, metadata and child arguments.

Celery's prefork pool fails to pickle a message whose arguments nest about 480
levels deep, and JSON gives up near 1,000. A spawn measures every payload
before it records or publishes anything (without recursion, so 5,000 levels
cannot blow the stack): an over-limit spawn is refused with
:class:`~celery_spawn.PayloadTooLarge`, recorded failed, and the parent's
result stands.
"""
from __future__ import annotations

import time

import pytest

from celery_spawn import PayloadTooLarge, SpawnConfig, SpawnConfigError, SpawnError, SpawnTask
from celery_spawn.config import DEFAULT_MAX_PAYLOAD_BYTES, DEFAULT_MAX_PAYLOAD_DEPTH, HARD_MAX_PAYLOAD_DEPTH
from celery_spawn.config import nesting_depth
from celery_spawn.engine.children import ChildRows
from celery_spawn.store import schema as s
from tests.unit.helpers import Rig

LIMIT = DEFAULT_MAX_PAYLOAD_DEPTH


def nested(levels: int, leaf: object = "leaf", kind: str = "dict") -> object:
    """``levels`` containers, one inside the other (``nested(2) == {"k": {"k": "leaf"}}``)."""
    value = leaf
    for _ in range(levels):
        value = {"k": value} if kind == "dict" else [value]
    return value


@pytest.fixture
def deep_rig(sqlite_url):
    """A Rig whose handlers ``args``/``kwargs``/``headers`` put ``context.parent.result`` into one child."""
    made = Rig(sqlite_url, eager=False)
    made.manager.register_handler("args", lambda context: [made.sig(context.parent.result)])
    made.manager.register_handler("kwargs", lambda context: [made.sig(payload=context.parent.result)])
    made.manager.register_handler("headers", lambda context: [
        made.sig(1).set(headers={"x": context.parent.result})])
    made.manager.register_handler("plain", lambda context: [made.sig(1), made.sig(2)])
    yield made
    made.drain()
    made.close()


# ---- measuring ----------------------------------------------------------------------------------
@pytest.mark.parametrize("value, depth", [
    (1, 0), ("text", 0), (None, 0), (b"bytes", 0), ({}, 1), ([], 1), ({"a": 1}, 1), ({"a": [1]}, 2),
    ([1, [2, [3]], {"x": (4,)}], 3), ({"a": {"b": {}}, "c": [[[[]]]]}, 5), ({1, 2}, 1), (frozenset(), 1),
])
def test_nesting_depth_counts_containers_on_the_deepest_path(value, depth):
    assert nesting_depth(value) == depth


def test_nesting_depth_stops_past_its_limit_without_recursion():
    deep = nested(100_000)
    started = time.monotonic()
    assert nesting_depth(deep, 64) == 65
    assert nesting_depth(deep, 10 ** 6) == 100_000
    assert time.monotonic() - started < 5
    loop: list = []
    loop.append(loop)
    assert nesting_depth(loop, 10) == 11  # a list that holds itself is too deep, not a hang


def test_defaults_sit_well_below_where_celery_breaks():
    assert DEFAULT_MAX_PAYLOAD_DEPTH == 64 and DEFAULT_MAX_PAYLOAD_BYTES == 1 << 20
    assert HARD_MAX_PAYLOAD_DEPTH < 480


# ---- SpawnConfig itself -------------------------------------------------------------------------
@pytest.mark.parametrize("levels", [HARD_MAX_PAYLOAD_DEPTH + 1, 600, 5_000])
def test_a_config_never_raises_recursion_error(levels):
    with pytest.raises(PayloadTooLarge, match="metadata"):
        SpawnConfig(metadata=nested(levels))
    with pytest.raises(PayloadTooLarge, match="metadata"):
        SpawnConfig.from_dict({"metadata": nested(levels)})
    with pytest.raises(PayloadTooLarge, match="on_complete"):
        SpawnConfig(on_complete={"task": "t", "kwargs": nested(levels)})
    with pytest.raises(PayloadTooLarge):
        SpawnConfig().with_metadata({"deep": nested(levels, kind="list")})


def test_payload_too_large_is_a_spawn_error_and_a_value_error():
    assert issubclass(PayloadTooLarge, SpawnError) and issubclass(PayloadTooLarge, ValueError)
    assert not issubclass(PayloadTooLarge, SpawnConfigError)


# ---- the call's _spawn_config -------------------------------------------------------------------
@pytest.mark.parametrize("levels", [LIMIT, 480, 600, 5_000])
def test_deep_metadata_is_refused_and_the_parent_result_stands(rig, levels):
    rig.manager.register_handler("plain", lambda context: [rig.sig(1)])
    result = rig.spawn({"handler": "plain", "metadata": {"deep": nested(levels)}}, value={"v": levels})
    operation = rig.assert_refused(result, {"v": levels}, PayloadTooLarge, "_spawn_config['metadata']")
    assert "spawn_max_payload_depth=64" in operation["error"]
    assert operation["handler"] == "plain"


def test_metadata_just_within_the_limit_is_accepted(sqlite_rig):
    sqlite_rig.manager.register_handler("plain", lambda context: [sqlite_rig.sig(1)])
    metadata = {"deep": nested(LIMIT - 2)}  # the config nests: _spawn_config > metadata > deep > ...
    assert nesting_depth({"metadata": metadata}) == LIMIT
    result = sqlite_rig.spawn({"handler": "plain", "metadata": metadata})
    assert result.get() == "parent-result"
    assert sqlite_rig.operation(result.id)["state"] == s.OP_SUCCEEDED
    assert len(sqlite_rig.runs) == 1


@pytest.mark.parametrize("config", [
    nested(5_000), nested(5_000, kind="list"), {"stray": nested(5_000)}, {"on_complete": nested(5_000)},
    {"handler": "plain", "on_complete": {"task": "unit.child", "kwargs": nested(600)}},
])
def test_any_deep_spawn_config_is_refused_before_it_is_parsed(sqlite_rig, config):
    sqlite_rig.manager.register_handler("plain", lambda context: [sqlite_rig.sig(1)])
    result = sqlite_rig.spawn(config, value=7)
    operation = sqlite_rig.assert_refused(result, 7, PayloadTooLarge, "_spawn_config")
    assert len(operation["config"]) <= 2000  # kept short, never a RecursionError while recording it


def test_a_deep_spawn_config_object_is_refused(sqlite_rig):
    sqlite_rig.manager.register_handler("plain", lambda context: [sqlite_rig.sig(1)])
    config = SpawnConfig(handler="plain", metadata=nested(HARD_MAX_PAYLOAD_DEPTH - 1))
    result = sqlite_rig.spawn(config, value=1)
    sqlite_rig.assert_refused(result, 1, PayloadTooLarge, "_spawn_config['metadata']")


def test_a_task_declared_deep_config_is_refused(sqlite_rig):
    sqlite_rig.manager.register_handler("plain", lambda context: [sqlite_rig.sig(1)])

    @sqlite_rig.app.task(name="unit.declared", base=SpawnTask, shared=False,
                         spawn_config={"handler": "plain", "metadata": nested(100)})
    def declared(value):
        return value

    result = declared.apply(args=(3,))
    sqlite_rig.assert_refused(result, 3, PayloadTooLarge, "spawn_config of unit.declared['metadata']")


def test_an_oversized_config_is_refused_and_kept_short(sqlite_url):
    rig = Rig(sqlite_url, max_payload_bytes=4096)
    try:
        rig.manager.register_handler("plain", lambda context: [rig.sig(1)])
        result = rig.spawn({"handler": "plain", "metadata": {"blob": "x" * 5000}}, value="kept")
        operation = rig.assert_refused(result, "kept", PayloadTooLarge, "spawn_max_payload_bytes=4096")
        assert "spawn config" in operation["error"]
        assert len(operation["config"]) <= 2000
        ok = rig.spawn({"handler": "plain", "metadata": {"blob": "x" * 3000}})
        assert rig.operation(ok.id)["state"] == s.OP_SUCCEEDED
    finally:
        rig.close()


def test_the_default_size_limit_refuses_a_two_mebibyte_metadata(sqlite_rig):
    sqlite_rig.manager.register_handler("plain", lambda context: [sqlite_rig.sig(1)])
    result = sqlite_rig.spawn({"handler": "plain", "metadata": {"blob": "x" * (2 << 20)}}, value=0)
    sqlite_rig.assert_refused(result, 0, PayloadTooLarge, "spawn_max_payload_bytes=1048576")


# ---- the children's arguments, options and messages ---------------------------------------------
@pytest.mark.parametrize("where", ["args", "kwargs", "headers"])
@pytest.mark.parametrize("levels", [LIMIT, 480, 600, 5_000])
def test_a_child_nested_too_deeply_is_refused_and_nothing_is_published(deep_rig, where, levels):
    result = deep_rig.spawn({"handler": where}, value=nested(levels, kind="list" if levels % 2 else "dict"))
    assert result.state == "SUCCESS", result.traceback
    operation = deep_rig.operation(result.id)
    assert operation["state"] == s.OP_FAILED and operation["total"] == 0
    assert operation["error"].startswith("PayloadTooLarge: child #0 (unit.child) "), operation["error"]
    assert "spawn_max_payload_depth=64" in operation["error"]
    assert deep_rig.jobs(operation["id"]) == []
    assert deep_rig.drain() == []
    assert isinstance(deep_rig.failures[-1][1], PayloadTooLarge)


def test_a_child_just_within_the_depth_limit_is_published(deep_rig):
    result = deep_rig.spawn({"handler": "kwargs"}, value=nested(LIMIT - 1))  # kwargs > payload > ...
    assert deep_rig.operation(result.id)["state"] == s.OP_RUNNING
    assert len(deep_rig.drain()) == 1


def test_the_refusal_names_the_child_that_nests_too_deeply(sqlite_rig):
    sqlite_rig.manager.register_handler("third", lambda context: [
        sqlite_rig.sig(0), sqlite_rig.sig(1), sqlite_rig.sig(nested(600))])
    result = sqlite_rig.spawn({"handler": "third"}, value="v")
    sqlite_rig.assert_refused(result, "v", PayloadTooLarge, "child #2 (unit.child) args")


def test_an_oversized_child_message_is_refused(deep_rig):
    result = deep_rig.spawn({"handler": "args"}, value="x" * (DEFAULT_MAX_PAYLOAD_BYTES + 1))
    operation = deep_rig.operation(result.id)
    assert result.get().startswith("xxx")
    assert operation["state"] == s.OP_FAILED
    assert "child #0 (unit.child) message" in operation["error"]
    assert "spawn_max_payload_bytes=1048576" in operation["error"]
    assert deep_rig.drain() == []


def test_the_app_settings_set_the_limits(sqlite_url):
    rig = Rig(sqlite_url, eager=False, max_payload_depth=8, max_payload_bytes=2048)
    try:
        rig.manager.register_handler("kwargs", lambda context: [rig.sig(payload=context.parent.result)])
        assert rig.spawn({"handler": "kwargs"}, value=nested(7)).state == "SUCCESS"
        deep = rig.spawn({"handler": "kwargs"}, value=nested(8))
        assert "spawn_max_payload_depth=8" in rig.operation(deep.id)["error"]
        big = rig.spawn({"handler": "kwargs"}, value="y" * 2048)
        assert "spawn_max_payload_bytes=2048" in rig.operation(big.id)["error"]
        assert len(rig.drain()) == 1
    finally:
        rig.drain()
        rig.close()


def test_a_later_spawn_runs_after_a_refused_one(deep_rig):
    refused = deep_rig.spawn({"handler": "kwargs"}, value=nested(5_000))
    assert deep_rig.operation(refused.id)["state"] == s.OP_FAILED
    ok = deep_rig.spawn({"handler": "plain"})
    assert deep_rig.operation(ok.id)["state"] == s.OP_RUNNING
    assert len(deep_rig.drain()) == 2


def test_a_recursion_error_anywhere_in_a_spawn_is_a_refused_spawn(sqlite_rig, monkeypatch):
    sqlite_rig.manager.register_handler("plain", lambda context: [sqlite_rig.sig(1)])

    def overflow(self, *args, **kwargs):
        raise RecursionError("maximum recursion depth exceeded")

    monkeypatch.setattr(ChildRows, "child_row", overflow)
    result = sqlite_rig.spawn({"handler": "plain"}, value="stands")
    sqlite_rig.assert_refused(result, "stands", PayloadTooLarge, "RecursionError")


def test_the_depth_counts_only_what_the_caller_and_the_handler_gave(sqlite_url):
    rig = Rig(sqlite_url, eager=False, max_payload_depth=1)
    try:
        rig.manager.register_handler("kwargs", lambda context: [rig.sig(1, payload=context.parent.result)])
        flat = rig.spawn({"handler": "kwargs"}, value="flat")  # the spawn's own headers are not counted
        assert rig.operation(flat.id)["state"] == s.OP_RUNNING
        listed = rig.spawn({"handler": "kwargs"}, value=[1])
        assert "child #0 (unit.child) kwargs" in rig.operation(listed.id)["error"]
        metadata = rig.spawn({"handler": "kwargs", "metadata": {"a": 1}}, value="flat")
        assert "_spawn_config['metadata']" in rig.operation(metadata.id)["error"]
        assert len(rig.drain()) == 1
    finally:
        rig.drain()
        rig.close()
