"""Arbitrary ``_spawn_config`` values thrown at a spawn in eager mode.

Whatever a caller sends, only SpawnError subclasses are recorded, the
parent's own result always stands, and no operation is half written: every
operation has exactly ``total`` child rows, and a refused one has none.
"""
from __future__ import annotations

import itertools
import types
import uuid

import pytest
import sqlalchemy as sa
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from celery_spawn import SpawnConfig, SpawnError
from celery_spawn.config import CONFIG_KEYS
from celery_spawn.store import schema as s
from tests.unit.helpers import Rig

HANDLERS = ["fan", "stream", "halfway", "unit.parent"]


def _all_subclasses(cls: type) -> set[type]:
    found = set()
    for sub in cls.__subclasses__():
        found |= {sub} | _all_subclasses(sub)
    return found


SPAWN_ERROR_NAMES = {cls.__name__ for cls in _all_subclasses(SpawnError)} | {"SpawnError"}

json_scalars = (st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=12)
                | st.sampled_from([0, -1, 1, 2 ** 31, 2 ** 63, 10 ** 30, "", " ", "\x00", "fan"]))
json_values = st.recursive(json_scalars, lambda inner: st.lists(inner, max_size=3)
                           | st.dictionaries(st.text(max_size=6), inner, max_size=3), max_leaves=8)
python_values = (json_values | st.binary(max_size=4) | st.sets(st.integers(), max_size=2)
                 | st.tuples(st.integers()) | st.complex_numbers() | st.builds(object)
                 | st.builds(lambda: types.SimpleNamespace(handler="fan")))

PLAUSIBLE = {
    "handler": st.sampled_from(HANDLERS + ["missing"]) | st.text(max_size=8),
    "max_spawn_count": st.integers(-2, 6) | st.sampled_from([10 ** 7, 10 ** 7 + 1, 2 ** 64]),
    "operation_id": st.none() | st.text(max_size=70),
    "inherit_priority": st.booleans(),
    "inherit_queue": st.booleans(),
    "spawn_delay_ms": st.integers(-1, 20),
    "batch_size": st.integers(-1, 4),
    "metadata": st.none() | st.dictionaries(st.text(max_size=5), json_values, max_size=3),
    "max_depth": st.integers(-1, 3),
    "on_complete": st.none() | st.fixed_dictionaries({"task": st.sampled_from(["unit.child", "missing.task"])}),
    "wait_for_descendants": st.booleans(),
    "fail_fast": st.booleans(),
}
assert set(PLAUSIBLE) == set(CONFIG_KEYS), "a new SpawnConfig key needs a strategy here"


def configs(values: st.SearchStrategy) -> st.SearchStrategy:
    """Mostly dicts of known keys (plausible or junk values) plus stray keys; sometimes not a dict at all."""
    plausible = st.fixed_dictionaries({}, optional={key: PLAUSIBLE[key] for key in sorted(CONFIG_KEYS)})
    junk = st.fixed_dictionaries({}, optional={key: PLAUSIBLE[key] | values for key in sorted(CONFIG_KEYS)})
    stray = st.dictionaries(st.text(max_size=8) | st.integers() | st.none(), values, min_size=1, max_size=2)
    mixed = st.builds(lambda a, b: {**a, **b}, plausible, stray)
    wrapped = plausible.map(types.MappingProxyType)
    configs_ = st.builds(lambda handler, count: SpawnConfig(handler=handler, max_spawn_count=count),
                         st.sampled_from(HANDLERS), st.integers(0, 5))
    return st.one_of(plausible, plausible, plausible, junk, mixed, wrapped, configs_, values)


def arm(rig: Rig) -> None:
    """The handlers the fuzzed configs may name (the parent's own name included)."""
    rig.manager.register_handler("fan", lambda context: [rig.sig(i) for i in range(3)])

    @rig.handler("stream")
    def stream(context):
        for i in range(4):
            yield rig.sig(i)

    @rig.handler("halfway")
    def halfway(context):
        yield rig.sig(0)
        yield rig.sig(1)
        raise RuntimeError("source went away")

    rig.manager.register_handler("unit.parent", lambda context: [rig.sig("own")])


def check_invariants(rig: Rig) -> None:
    counts = {row["operation_id"]: row["n"] for row in rig.rows(
        sa.select(s.jobs.c.operation_id, sa.func.count().label("n"))
        .where(s.jobs.c.operation_id.is_not(None)).group_by(s.jobs.c.operation_id))}
    operations = rig.operations()
    for operation in operations:
        rows = counts.get(operation["id"], 0)
        assert rows == operation["total"], operation
        if operation["state"] == s.OP_FAILED and operation["total"] == 0:
            assert operation["error"], operation
            assert operation["error"].split(":", 1)[0] in SPAWN_ERROR_NAMES, operation["error"]
    assert set(counts) <= {operation["id"] for operation in operations}  # no orphan children
    for _, exc in rig.failures:
        assert isinstance(exc, SpawnError), repr(exc)


def throw(rig: Rig, config, counter) -> None:
    value = {"n": next(counter)}
    before = len(rig.failures)
    result = rig.spawn(config, value=value, task_id=str(uuid.uuid4()))
    assert result.state == "SUCCESS", (config, result.result, result.traceback)
    assert result.get() == value
    if len(rig.failures) == before and config is not None:
        # Accepted (or a conflict never recorded): the operation, if any, is whole.
        for operation in rig.operations(result.id):
            assert operation["state"] != s.OP_FAILED or operation["total"] > 0, operation
    check_invariants(rig)


def fuzz(examples: int) -> settings:
    """Deterministic runs (no example database in the work tree), one rig reused across examples."""
    return settings(max_examples=examples, deadline=None, database=None, derandomize=True,
                    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])


@fuzz(150)
@given(config=configs(json_values))
def test_json_spawn_configs_on_sqlite(sqlite_rig, config):
    if not sqlite_rig.manager.has_handler("fan"):
        arm(sqlite_rig)
    throw(sqlite_rig, config, _counter(sqlite_rig))


@fuzz(100)
@given(config=configs(python_values))
def test_python_object_spawn_configs_in_eager_mode(sqlite_rig, config):
    if not sqlite_rig.manager.has_handler("fan"):
        arm(sqlite_rig)
    throw(sqlite_rig, config, _counter(sqlite_rig))


@pytest.mark.parametrize("store_url", ["postgresql", "mariadb"], indirect=True)
@fuzz(40)
@given(config=configs(json_values))
def test_json_spawn_configs_on_server_databases(rig, config):
    if not rig.manager.has_handler("fan"):
        arm(rig)
    throw(rig, config, _counter(rig))


def _counter(rig: Rig):
    if not hasattr(rig, "_fuzz_counter"):
        rig._fuzz_counter = itertools.count()
    return rig._fuzz_counter
