"""Poison payloads and the fuzz tests on a real prefork worker, on every broker and store combination.

Celery's prefork pool fails to pickle a task whose arguments nest about 480
levels deep; with ``acks_late`` such a message comes back and kills every
worker that takes it. So a handler that builds a child nested 600 or 5,000
levels deep must never get it published: the spawn is refused with
``PayloadTooLarge``, recorded failed, nothing is published, the parent's
result stands and the worker goes on working.

The eager fuzz tests (``tests/unit/test_fuzz_config.py``,
``tests/reliability/test_fuzz_outputs.py``) also run here, on a sample of
their examples: ``_spawn_config`` values travel in the parent's message, and
handler outputs travel pickled in it (the ``fz.out`` handler unpickles them in
the worker), deeply nested ones included. Left out are what a worker cannot
receive at all (a ``_spawn_config`` nested past what Celery pickles; that is
Celery's business) and options that route children to other queues or
exchanges (a shared broker would keep what they create).
"""
from __future__ import annotations

import itertools
import types
import uuid

import pytest
import sqlalchemy as sa
from celery.canvas import Signature
from hypothesis import HealthCheck, assume, example, given, settings

from celery_spawn import SpawnConfig
from celery_spawn.config import HARD_MAX_PAYLOAD_DEPTH, nesting_depth
from celery_spawn.handlers import child_id, default_operation_id
from celery_spawn.store import schema as s
from tests.fuzzing import (
    FUZZ_CHILD,
    FUZZ_PARENT,
    SPAWN_ERROR_NAMES,
    Output,
    configs,
    deliverable_deep_values,
    json_values,
    nested,
    output_configs,
    outputs,
    pack_output,
)
from tests.harness import wait_for
from tests.reliability.helpers import (
    TIMEOUT,
    RelWorker,
    assert_worker_still_works,
    children,
    operation,
    operations_of,
    rows,
)

COUNTER = itertools.count()


@pytest.fixture(scope="module")
def fuzz_worker(backend, artifacts):
    """One real prefork worker (concurrency 2) of ``tests.reliability.app`` per combination, for the module."""
    worker = RelWorker(backend, artifacts / f"rel-poison-{backend.name}-{uuid.uuid4().hex[:6]}.log").start()
    yield worker
    worker.stop()


# ---- a handler that builds a poison child -------------------------------------------------------
@pytest.mark.parametrize("levels", [600, 5_000])
def test_a_child_nested_too_deeply_is_refused_and_the_worker_carries_on(client_app, fuzz_worker, levels):
    log_before = len(fuzz_worker.log())
    parent = client_app.signature("rel.broken", kwargs={"good": levels, "levels": levels,
                                                        "_spawn_config": {"handler": "rel_deep"}}).delay()
    assert parent.get(timeout=TIMEOUT) == f"parent result {levels}"  # the parent's own result stands
    op = wait_for(lambda: operation(client_app, parent.id), 30, what="the refused operation")
    assert op["state"] == s.OP_FAILED and op["total"] == 0, op
    assert op["error"].startswith("PayloadTooLarge: child #0 (rel.unit) kwargs"), op["error"]
    assert "spawn_max_payload_depth=64" in op["error"]
    assert children(client_app, parent.id) == []
    never = child_id(default_operation_id(parent.id), 0)
    assert rows(client_app, sa.select(s.jobs.c.id).where(s.jobs.c.id == never)) == []
    assert_worker_still_works(client_app, fuzz_worker)
    log = fuzz_worker.log()[log_before:]
    assert never not in log, "the refused child was published"
    assert "RecursionError" not in log and "WorkerLostError" not in log, log[-3000:]


@pytest.mark.parametrize("levels", [100, 300])
def test_a_deep_spawn_config_a_worker_can_receive_is_refused(client_app, fuzz_worker, levels):
    parent = client_app.signature("rel.broken", kwargs={"good": 1, "_spawn_config": {
        "handler": "rel_many", "metadata": {"deep": nested(levels)}}}).delay()
    assert parent.get(timeout=TIMEOUT) == "parent result 1"
    op = wait_for(lambda: operation(client_app, parent.id), 30, what="the refused operation")
    assert op["state"] == s.OP_FAILED and op["total"] == 0
    assert op["error"].startswith("PayloadTooLarge: _spawn_config['metadata']"), op["error"]
    assert children(client_app, parent.id) == []
    assert_worker_still_works(client_app, fuzz_worker)


# ---- the fuzz tests, on the worker ---------------------------------------------------------------
WORKER_FUZZ = settings(deadline=None, database=None, derandomize=True, print_blob=True,
                       suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                              HealthCheck.filter_too_much])


def sendable(config):
    """A config as the message carries it: JSON, so a SpawnConfig as its payload and a mapping as a dict."""
    if isinstance(config, SpawnConfig):
        return config.to_dict()
    if isinstance(config, types.MappingProxyType):
        return dict(config)
    return config


def check_on_worker(app, worker, config, **kwargs) -> None:
    """The parent's result stands; its operation is whole or failed with a documented error and no child."""
    assert worker.proc.poll() is None, "the worker died"
    value = {"n": next(COUNTER)}
    kwargs = {**kwargs, "_spawn_config": config} if config is not None else kwargs
    parent = app.signature(FUZZ_PARENT, args=(value,), kwargs=kwargs).delay()
    assert parent.get(timeout=TIMEOUT) == value, (config, kwargs)
    counts = {r["operation_id"]: r["n"] for r in rows(app, sa.select(
        s.jobs.c.operation_id, sa.func.count().label("n"))
        .where(s.jobs.c.parent_id == parent.id).group_by(s.jobs.c.operation_id))}
    operations = operations_of(app, parent.id)
    for op in operations:
        kept = counts.get(op["id"], 0)
        if op["state"] == s.OP_FAILED and not op["total"]:
            assert kept == 0, f"a failed operation kept {kept} child rows: {op}"
            assert op["error"] and op["error"].split(":", 1)[0] in SPAWN_ERROR_NAMES, op["error"]
        else:
            assert kept == op["total"], f"half-written operation: {kept} rows, total {op['total']}: {op}"
    assert set(counts) <= {op["id"] for op in operations}, "child rows without an operation"


@settings(WORKER_FUZZ, max_examples=40)
@given(config=configs(json_values, parent=FUZZ_PARENT, child=FUZZ_CHILD, deep=deliverable_deep_values))
def test_spawn_configs_on_a_real_worker(client_app, fuzz_worker, config):
    config = sendable(config)
    assume(nesting_depth(config, HARD_MAX_PAYLOAD_DEPTH) <= HARD_MAX_PAYLOAD_DEPTH)
    check_on_worker(client_app, fuzz_worker, config)


def poison(levels: int, where: str) -> Output:
    """A good child, then one whose ``where`` nests ``levels`` deep."""
    deep = nested(levels, kind="list" if levels % 2 else "dict")
    odd = {"args": Signature(FUZZ_CHILD, args=[deep]), "kwargs": Signature(FUZZ_CHILD, kwargs={"p": deep}),
           "headers": Signature(FUZZ_CHILD, args=[1], options={"headers": {"h": deep}})}[where]
    produced = [Signature(FUZZ_CHILD, args=[0]), odd]
    return Output(produced, produced)


@settings(WORKER_FUZZ, max_examples=40)
@given(output=outputs(routable=False), config=output_configs(deliverable_deep_values))
@example(output=poison(600, "kwargs"), config={"handler": "fz.out"})
@example(output=poison(5_001, "args"), config={"handler": "fz.out", "batch_size": 1})
@example(output=poison(5_000, "headers"), config={"handler": "fz.out"})
def test_handler_outputs_on_a_real_worker(client_app, fuzz_worker, output, config):
    packed = pack_output(output)
    assume(packed is not None)  # a lambda among the arguments cannot travel
    check_on_worker(client_app, fuzz_worker, config, output=packed)


def test_the_worker_survived_the_fuzzing(client_app, fuzz_worker):
    assert_worker_still_works(client_app, fuzz_worker)
    assert "WorkerLostError" not in fuzz_worker.log()
