"""with_spawn_handler / with_spawn_config (the seed's JobSpawnExt) and depends_on, on Celery signatures."""
from __future__ import annotations

import json

import pytest
from celery import Celery, signature
from celery.result import AsyncResult

from celery_spawn import (
    DependencyError,
    SpawnConfig,
    SpawnConfigError,
    depends_on,
    with_spawn_config,
    with_spawn_handler,
)
from celery_spawn.signatures import DEPENDS_ON_OPTION, IGNORE_FAILURE_OPTION
from celery_spawn.store import schema as s

app = Celery("signatures_test", broker="memory://", set_as_current=False)


def sig(**kwargs):
    return app.signature("unit.parent", args=(1,), kwargs=kwargs or None)


# ---- JobSpawnExt ----------------------------------------------------------------------------------
def test_with_spawn_handler_sets_the_reserved_kwarg_and_returns_the_signature():
    original = sig(dataset_id="ds-123")
    returned = with_spawn_handler(original, "data_processor")
    assert returned is original
    assert original.kwargs == {"dataset_id": "ds-123", "_spawn_config": {"handler": "data_processor"}}


def test_with_spawn_handler_on_a_signature_without_kwargs():
    plain = app.signature("unit.parent", args=(1,))
    assert with_spawn_handler(plain, "h").kwargs == {"_spawn_config": {"handler": "h"}}


@pytest.mark.parametrize("name", ["", "  ", 5, ["h"], "h" * 256])
def test_with_spawn_handler_validates_the_name(name):
    target = sig()
    with pytest.raises(SpawnConfigError, match="handler"):
        with_spawn_handler(target, name)
    assert "_spawn_config" not in (target.kwargs or {})


def test_with_spawn_config_merges_key_by_key_over_what_the_signature_carries():
    target = with_spawn_handler(sig(), "data_processor")
    with_spawn_config(target, SpawnConfig().with_max_spawn_count(20).with_spawn_delay(0.1))
    with_spawn_config(target, {"max_spawn_count": 15, "operation_id": "op-dataset-123"})
    assert target.kwargs["_spawn_config"] == {"handler": "data_processor", "max_spawn_count": 15,
                                              "spawn_delay_ms": 100, "operation_id": "op-dataset-123"}
    assert SpawnConfig.from_dict(target.kwargs["_spawn_config"]).handler == "data_processor"


def test_with_spawn_config_order_matches_the_seed():
    # Job::new(...).with_spawn_handler("data_processor").with_spawn_config(spawn_config)
    config = SpawnConfig().with_max_spawn_count(20).with_inherit_priority(True)
    target = with_spawn_config(with_spawn_handler(sig(), "data_processor"), config)
    assert target.kwargs["_spawn_config"] == {"handler": "data_processor", "max_spawn_count": 20,
                                              "inherit_priority": True}


@pytest.mark.parametrize("config, key", [({"batch_size": 0}, "batch_size"), ({"colour": 1}, "colour"),
                                         (["handler"], "_spawn_config")])
def test_with_spawn_config_validates(config, key):
    with pytest.raises(SpawnConfigError, match=key):
        with_spawn_config(sig(), config)


def test_with_spawn_config_refuses_a_signature_carrying_a_non_dict_config():
    with pytest.raises(SpawnConfigError, match="_spawn_config"):
        with_spawn_config(sig(_spawn_config="h"), {"handler": "h"})


@pytest.mark.parametrize("helper, arg", [(with_spawn_handler, "h"), (with_spawn_config, {"handler": "h"})])
def test_helpers_refuse_what_is_not_a_signature(helper, arg):
    with pytest.raises(TypeError, match="signature"):
        helper({"task": "x"}, arg)


def test_the_config_survives_the_signatures_json_form():
    target = with_spawn_config(with_spawn_handler(sig(), "h"), {"batch_size": 3})
    again = signature(json.loads(json.dumps(dict(target))), app=app)
    assert again.kwargs["_spawn_config"] == {"handler": "h", "batch_size": 3}


def test_a_signature_built_with_the_helpers_spawns(sqlite_rig):
    rig = sqlite_rig
    rig.manager.register_handler("fan", lambda context: [rig.sig(i) for i in range(context.config.max_spawn_count)])
    target = with_spawn_config(with_spawn_handler(rig.parent.s("value"), "fan"), SpawnConfig(max_spawn_count=2))
    result = target.apply_async()
    assert result.get() == "value"
    assert len(rig.runs) == 2
    assert rig.operation(result.id)["handler"] == "fan"


# ---- depends_on ---------------------------------------------------------------------------------
def test_depends_on_takes_ids_frozen_signatures_and_results():
    frozen = app.signature("unit.child").set(task_id="frozen-id")
    target = app.signature("unit.child")
    returned = depends_on(target, "plain-id", frozen, AsyncResult("result-id", app=app))
    assert returned is target
    assert target.options[DEPENDS_ON_OPTION] == ["plain-id", "frozen-id", "result-id"]
    assert IGNORE_FAILURE_OPTION not in target.options


def test_depends_on_accumulates_without_duplicates():
    target = app.signature("unit.child")
    depends_on(target, "a", "b")
    depends_on(target, "b", "c", "a")
    assert target.options[DEPENDS_ON_OPTION] == ["a", "b", "c"]


def test_depends_on_with_ignore_failure_marks_those_dependencies():
    target = depends_on(app.signature("unit.child"), "strict")
    depends_on(target, "lenient", ignore_failure=True)
    assert target.options[DEPENDS_ON_OPTION] == ["strict", "lenient"]
    assert target.options[IGNORE_FAILURE_OPTION] == ["lenient"]


@pytest.mark.parametrize("job", ["", None, 3, object()])
def test_depends_on_refuses_what_is_not_a_job(job):
    with pytest.raises(DependencyError):
        depends_on(app.signature("unit.child"), job)


def test_depends_on_refuses_an_unfrozen_signature_with_a_hint():
    with pytest.raises(DependencyError, match="freeze"):
        depends_on(app.signature("unit.child"), app.signature("unit.child"))


def test_depends_on_refuses_a_target_that_is_not_a_signature():
    with pytest.raises(TypeError):
        depends_on("job-id", "other")


def test_dependencies_are_stored_as_edges_and_never_published(sqlite_rig):
    rig = sqlite_rig

    @rig.handler("chain_of_two")
    def chain_of_two(context):
        first = rig.sig("first")
        context.freeze(first)
        second = depends_on(rig.sig("second"), first, context.parent.id, ignore_failure=True)
        return [first, second]

    result = rig.spawn({"handler": "chain_of_two"})
    first, second = rig.children_of(result.id)
    edges = sorted(((e["job_id"], e["depends_on_id"], bool(e["ignore_failure"])) for e in rig.edges()))
    assert edges == sorted([(second["id"], first["id"], True), (second["id"], result.id, True)])
    for job in (first, second):
        stored = json.loads(job["message"])
        assert DEPENDS_ON_OPTION not in stored["options"] and IGNORE_FAILURE_OPTION not in stored["options"]
        assert "task_id" not in stored["options"]
    assert second["state"] in (s.HELD, s.PENDING, s.DISPATCHED, s.STARTED, s.SUCCEEDED)
