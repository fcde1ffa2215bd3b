"""Arbitrary ``_spawn_config`` values thrown at a spawn in eager mode.

Whatever a caller sends, only SpawnError subclasses are recorded, the
parent's own result always stands, and no operation is half written: every
operation has exactly ``total`` child rows, and a refused one has none.
"""
from __future__ import annotations

import itertools
import uuid

import pytest
import sqlalchemy as sa
from hypothesis import HealthCheck, given, settings

from celery_spawn import SpawnError
from celery_spawn.store import schema as s
from tests.fuzzing import SPAWN_ERROR_NAMES, configs, fuzz_handlers, json_values, python_values
from tests.unit.helpers import Rig


def arm(rig: Rig) -> None:
    """The handlers the fuzzed configs may name (the parent's own name included)."""
    for name, handler in fuzz_handlers(rig.sig, "unit.parent").items():
        rig.manager.register_handler(name, handler)


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
