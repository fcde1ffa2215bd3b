"""Arbitrary handler outputs and ``_spawn_config`` values at a spawn, in eager mode on a real store.

Hypothesis builds what a handler returns: lists, tuples and generators
(which may raise halfway) mixing signatures (with odd options, non-JSON or deeply nested
arguments, unknown task names), their dict form, groups, chains, chords,
None, strings and numbers, or a single one of those instead of an iterable.
The parent runs with ``task_always_eager`` (children run in-process too) on
SQLite and PostgreSQL. Whatever comes out:

* the parent's own result stands (its task state is SUCCESS);
* every refusal is a documented :class:`~celery_spawn.SpawnError` subclass,
  recorded on a failed operation whose error names it;
* the store never holds a half-written operation: each one is failed with
  no child rows, or has exactly ``total`` child rows.
"""
from __future__ import annotations

import itertools
import uuid
from typing import Any

import pytest
import sqlalchemy as sa
from celery import Celery
from celery.canvas import Signature
from hypothesis import HealthCheck, given, settings

from celery_spawn import SpawnError, SpawnManager, SpawnTask, install, signals
from celery_spawn.signatures import DEPENDS_ON_OPTION, IGNORE_FAILURE_OPTION
from celery_spawn.store import schema as s
from tests.fuzzing import SPAWN_ERROR_NAMES, Output, output_configs, outputs
from tests.harness import throwaway_database


class EagerRig:
    """A Celery app in eager mode, installed on a real store, whose handler returns whatever it is given."""

    def __init__(self, url: str) -> None:
        app = Celery("rel_fuzz", broker="memory://", set_as_current=False)
        app.conf.update(task_always_eager=True, task_default_queue=f"fz-{uuid.uuid4().hex[:8]}")
        self.app = app
        self.manager = SpawnManager()
        self.state = install(app, self.manager, database_url=url)
        self.output: Any = None
        self.failures: list[BaseException] = []
        self.counter = itertools.count()

        @app.task(name="fz.parent", base=SpawnTask, shared=False)
        def parent(value):
            return value

        @app.task(name="fz.child", shared=False)
        def child(*args, **kwargs):
            return len(args)

        self.manager.register_handler("fz.out", lambda context: self.output)
        signals.spawn_failed.connect(self._on_failed, weak=False)

    def _on_failed(self, sender=None, exception=None, **_: Any) -> None:
        if getattr(sender, "app", None) is self.app:
            self.failures.append(exception)

    def close(self) -> None:
        signals.spawn_failed.disconnect(self._on_failed)
        self.state.store.dispose()

    def spawn(self, output: Any, config: dict):
        self.output = output
        value = {"n": next(self.counter)}
        result = self.app.tasks["fz.parent"].apply(args=(value,), kwargs={"_spawn_config": config},
                                                   task_id=str(uuid.uuid4()))
        return value, result

    def rows(self, query) -> list[dict]:
        with self.state.store.read() as conn:
            return [dict(r) for r in conn.execute(query).mappings()]


# ---- the checks -----------------------------------------------------------------------------------
def check(rig: EagerRig, output: Output, config: dict) -> None:
    before = len(rig.failures)
    value, result = rig.spawn(output.value, config)
    assert result.state == "SUCCESS", f"the parent failed: {result.traceback}"
    assert result.get() == value
    for exc in rig.failures[before:]:
        assert isinstance(exc, SpawnError), repr(exc)
    counts = {r["operation_id"]: r["n"] for r in rig.rows(
        sa.select(s.jobs.c.operation_id, sa.func.count().label("n"))
        .where(s.jobs.c.operation_id.is_not(None)).group_by(s.jobs.c.operation_id))}
    operations = rig.rows(sa.select(s.operations))
    for op in operations:
        rows = counts.get(op["id"], 0)
        if op["state"] == s.OP_FAILED and not op["total"]:
            assert rows == 0, f"a failed operation kept {rows} child rows: {op}"
            assert op["error"] and op["error"].split(":", 1)[0] in SPAWN_ERROR_NAMES, op["error"]
        else:
            assert rows == op["total"], f"half-written operation: {rows} rows, total {op['total']}: {op}"
    assert set(counts) <= {op["id"] for op in operations}, "child rows without an operation"


FUZZ = settings(deadline=None, database=None, derandomize=True, print_blob=True,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                       HealthCheck.function_scoped_fixture])


@pytest.fixture(scope="module")
def sqlite_fuzz_rig(tmp_path_factory):
    rig = EagerRig(f"sqlite:///{tmp_path_factory.mktemp('fuzz') / 'spawn.sqlite3'}")
    yield rig
    rig.close()


@pytest.fixture(scope="module")
def postgres_fuzz_rig():
    with throwaway_database("postgresql") as url:
        rig = EagerRig(url)
        yield rig
        rig.close()


@settings(FUZZ, max_examples=300)
@given(output=outputs(), config=output_configs())
def test_handler_outputs_on_sqlite(sqlite_fuzz_rig, output, config):
    check(sqlite_fuzz_rig, output, config)


@settings(FUZZ, max_examples=80)
@given(output=outputs(), config=output_configs())
def test_handler_outputs_on_postgresql(postgres_fuzz_rig, output, config):
    check(postgres_fuzz_rig, output, config)


@pytest.mark.slow
@settings(FUZZ, max_examples=3000)
@given(output=outputs(), config=output_configs())
def test_handler_outputs_on_sqlite_long(sqlite_fuzz_rig, output, config):
    check(sqlite_fuzz_rig, output, config)


# ---- what the fuzzing found (fixed; kept as regressions) --------------------------------------------
ODD_OPTIONS = {
    "headers-text": {"headers": "abc"},
    "headers-list": {"headers": [1, 2]},
    "depends-int": {DEPENDS_ON_OPTION: 5},
    "ignore-failure-int": {IGNORE_FAILURE_OPTION: 5},
}


@pytest.mark.parametrize("odd", sorted(ODD_OPTIONS))
def test_child_with_malformed_options_is_refused_not_raised(sqlite_fuzz_rig, odd):
    output = [Signature("fz.child", args=[1]), Signature("fz.child", args=[2], options=ODD_OPTIONS[odd])]
    check(sqlite_fuzz_rig, Output(output, output), {"handler": "fz.out"})
    op = sqlite_fuzz_rig.rows(sa.select(s.operations).order_by(s.operations.c.created_at.desc()).limit(1))[0]
    assert op["state"] == s.OP_FAILED and op["error"].startswith("HandlerError"), op


def test_on_complete_in_its_minimal_dict_form_is_applied(sqlite_fuzz_rig):
    rig = sqlite_fuzz_rig
    output = [Signature("fz.child", args=[1])]
    value, result = rig.spawn(output, {"handler": "fz.out", "on_complete": {"task": "fz.child"}})
    assert result.state == "SUCCESS"
    op = rig.rows(sa.select(s.operations).where(s.operations.c.parent_id == result.id))[0]
    assert op["state"] == s.OP_SUCCEEDED
    assert op["callback_state"] == s.CALLBACK_SENT, (op["callback_state"], op["error"])
