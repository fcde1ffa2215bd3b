"""SpawnManager (the registry), SpawnHandler hooks, SpawnContext/ParentJob/SpawnResult, and install()."""
from __future__ import annotations

import json
import logging
from datetime import datetime

import pytest
from celery import Celery

from celery_spawn import (
    HandlerNotFound,
    ParentJob,
    SpawnConfig,
    SpawnContext,
    SpawnHandler,
    SpawnManager,
    SpawnResult,
    child_id,
    get_state,
    install,
)
from celery_spawn.contrib.testing import fake_context
from celery_spawn.store import schema as s
from celery_spawn.worker import RecoveryStep


class Noop(SpawnHandler):
    pass


# ---- registry -----------------------------------------------------------------------------------
def test_register_has_and_registered_types():
    manager = SpawnManager()
    assert manager.registered_types() == [] and len(manager) == 0
    handler = Noop()
    assert manager.register_handler("zeta", handler) is handler
    manager.register_handler("alpha", Noop())
    assert manager.has_handler("zeta") and manager.has_handler("alpha")
    assert not manager.has_handler("beta")
    assert manager.registered_types() == ["alpha", "zeta"]
    assert list(manager) == ["alpha", "zeta"] and len(manager) == 2
    assert manager.get_handler("zeta") is handler


def test_a_class_is_instantiated_and_a_function_adapted():
    manager = SpawnManager()
    made = manager.register_handler("cls", Noop)
    assert isinstance(made, Noop) and manager.get_handler("cls") is made

    def fan(context):
        """Doc of fan."""
        return ["x"]

    adapted = manager.register_handler("fn", fan)
    assert isinstance(adapted, SpawnHandler)
    assert adapted.spawn_jobs(None) == ["x"]
    assert adapted.validate_spawn(None, SpawnConfig()) is None
    assert "fan" in repr(adapted) and adapted.__doc__ == "Doc of fan."


def test_decorator_form_registers_and_returns_the_original():
    manager = SpawnManager()

    @manager.handler("by_function")
    def by_function(context):
        return []

    @manager.handler("by_class")
    class ByClass(SpawnHandler):
        pass

    assert callable(by_function) and by_function(None) == []
    assert isinstance(ByClass, type) and issubclass(ByClass, SpawnHandler)
    assert manager.registered_types() == ["by_class", "by_function"]
    assert isinstance(manager.get_handler("by_class"), ByClass)


def test_a_duplicate_name_is_refused_but_re_registering_the_same_handler_is_fine():
    manager = SpawnManager()
    handler = Noop()
    manager.register_handler("name", handler)
    manager.register_handler("name", handler)  # idempotent
    with pytest.raises(ValueError, match="'name'"):
        manager.register_handler("name", Noop())
    with pytest.raises(ValueError, match="already registered"):
        @manager.handler("name")
        def other(context):
            return []
    assert manager.get_handler("name") is handler


@pytest.mark.parametrize("name", ["", "   ", None, 3, b"name"])
def test_bad_names_are_refused_at_registration(name):
    with pytest.raises(ValueError, match="name"):
        SpawnManager().register_handler(name, Noop())


@pytest.mark.parametrize("handler", [3, "a string", object()])  # None: register_handler is then a decorator
def test_things_that_are_not_handlers_are_refused_at_registration(handler):
    manager = SpawnManager()
    with pytest.raises(TypeError, match="spawn handler"):
        manager.register_handler("x", handler)
    assert not manager.has_handler("x")


def test_unknown_handler_lookup_names_the_handler_and_what_is_registered():
    manager = SpawnManager()
    manager.register_handler("known", Noop())
    with pytest.raises(HandlerNotFound) as raised:
        manager.get_handler("missing")
    assert "'missing'" in str(raised.value) and "known" in str(raised.value)
    assert isinstance(raised.value, LookupError)
    with pytest.raises(HandlerNotFound, match="none"):
        SpawnManager().get_handler("x")


def test_unregister():
    manager = SpawnManager()
    manager.register_handler("x", Noop())
    manager.unregister_handler("x")
    manager.unregister_handler("x")
    assert not manager.has_handler("x")
    manager.register_handler("x", Noop())  # the name is free again


def test_handler_hooks_do_nothing_by_default():
    handler = SpawnHandler()
    parent = ParentJob("id", "t", (), {}, None, None, None, "id", 0)
    assert handler.validate_spawn(parent, SpawnConfig()) is None
    assert list(handler.spawn_jobs(None)) == []
    assert handler.on_spawn_complete(SpawnResult("id", [], datetime.now(), "op")) is None


# ---- install ------------------------------------------------------------------------------------
def _app() -> Celery:
    return Celery("handlers_test", broker="memory://", set_as_current=False)


def test_install_is_idempotent(sqlite_url):
    app = _app()
    manager = SpawnManager()
    manager.register_handler("h", Noop())
    first = install(app, manager, database_url=sqlite_url)
    second = install(app, manager, database_url=sqlite_url)
    third = install(app)
    assert first is second is third is get_state(app)
    assert third.manager is manager and manager.registered_types() == ["h"]
    assert list(app.steps["worker"]).count(RecoveryStep) == 1
    assert first.installed


def test_install_with_a_new_manager_keeps_the_handlers_registered_before(sqlite_url):
    app = _app()
    early = SpawnManager()
    early.register_handler("early", Noop())
    install(app, early, database_url=sqlite_url)
    late = SpawnManager()
    late.register_handler("late", Noop())
    state = install(app, late)
    assert state.manager is late
    assert late.registered_types() == ["early", "late"]
    assert list(app.steps["worker"]).count(RecoveryStep) == 1


def test_install_without_a_manager_makes_one():
    app = _app()
    state = install(app)
    assert isinstance(state.manager, SpawnManager) and state.manager.registered_types() == []


def test_get_state_before_install_has_defaults_and_install_adopts_it():
    app = _app()
    state = get_state(app)
    assert not state.installed
    assert install(app) is state and state.installed


def test_two_apps_do_not_share_handlers(sqlite_url):
    first, second = _app(), _app()
    install(first).manager.register_handler("only_first", Noop())
    install(second)
    assert get_state(first).manager.has_handler("only_first")
    assert not get_state(second).manager.has_handler("only_first")


# ---- what a handler sees ------------------------------------------------------------------------
def test_validate_spawn_and_spawn_jobs_see_the_same_parent(sqlite_rig):
    rig = sqlite_rig
    seen = {}

    class Watcher(SpawnHandler):
        def validate_spawn(self, parent, config):
            seen["validate"] = (parent, config)

        def spawn_jobs(self, context):
            seen["context"] = context
            return [rig.sig(1)]

        def on_spawn_complete(self, result):
            seen["result"] = result

    rig.manager.register_handler("watch", Watcher)
    result = rig.spawn({"handler": "watch", "metadata": {"bucket": "b"}, "batch_size": 3}, value={"n": 1},
                       priority=4, routing_key="qq")
    context: SpawnContext = seen["context"]
    parent, config = seen["validate"]
    assert context.parent is parent
    assert context.config is config
    assert isinstance(parent, ParentJob)
    assert (parent.id, parent.name, parent.args, parent.kwargs) == (result.id, "unit.parent", ({"n": 1},), {})
    assert parent.result == {"n": 1}
    assert (parent.priority, parent.queue, parent.root_id, parent.depth) == (4, "qq", result.id, 0)
    assert parent.parent_id is None
    assert config.handler == "watch" and config.batch_size == 3
    assert context.metadata == {"bucket": "b"}
    assert context.app is rig.app
    assert context.operation_id == rig.operation(result.id)["id"]

    spawn_result: SpawnResult = seen["result"]
    assert spawn_result.parent_job_id == result.id
    assert spawn_result.operation_id == context.operation_id
    assert spawn_result.spawned_job_ids == [job["id"] for job in rig.children_of(result.id)]
    assert isinstance(spawn_result.spawned_at, datetime)
    as_dict = spawn_result.to_dict()
    assert json.loads(json.dumps(as_dict)) == as_dict
    assert set(as_dict) == {"parent_job_id", "spawned_job_ids", "spawned_at", "operation_id"}


def test_a_fake_context_gives_a_handler_what_a_spawn_gives(sqlite_rig):
    """``fake_context`` (the testing kit) builds the parent and metadata a real spawn builds for the same call."""
    rig = sqlite_rig
    seen = {}
    rig.manager.register_handler("watch", lambda context: seen.setdefault("context", context) and [])
    rig.spawn({"handler": "watch", "metadata": {"bucket": "b"}}, value={"n": 1})
    real: SpawnContext = seen["context"]

    fake = fake_context({"n": 1}, args=({"n": 1},), task=rig.parent, bucket="b")
    assert (fake.parent.name, fake.parent.args, fake.parent.kwargs, fake.parent.result, fake.parent.arguments) == (
        real.parent.name, real.parent.args, real.parent.kwargs, real.parent.result, real.parent.arguments)
    assert fake.metadata == real.metadata and fake.app is rig.app
    first = fake.freeze(rig.sig(1))
    assert fake.generated(first) and first == child_id(fake.operation_id, 0)


def test_context_metadata_defaults_to_an_empty_dict(sqlite_rig):
    seen = []
    sqlite_rig.manager.register_handler("m", lambda context: seen.append(context.metadata) or [])
    sqlite_rig.spawn({"handler": "m"})
    assert seen == [{}]


def test_a_child_spawn_task_sees_its_parent_and_depth(sqlite_rig):
    rig = sqlite_rig
    seen = []

    @rig.handler("level")
    def level(context):
        seen.append(context.parent)
        if context.parent.depth == 0:
            return [context.app.signature("unit.parent", args=("child",),
                                          kwargs={"_spawn_config": {"handler": "level"}})]
        return []

    root = rig.spawn({"handler": "level"}, value="root")
    top, below = seen
    assert (top.depth, below.depth) == (0, 1)
    assert below.parent_id == root.id and below.root_id == root.id
    assert below.result == "child" and below.kwargs == {}
    assert below.id == rig.children_of(root.id)[0]["id"]


def test_on_spawn_complete_raising_is_logged_and_the_parent_stands(sqlite_rig, caplog):
    rig = sqlite_rig

    class Grumpy(SpawnHandler):
        def spawn_jobs(self, context):
            return [rig.sig(1)]

        def on_spawn_complete(self, result):
            raise RuntimeError("observer broke")

    rig.manager.register_handler("grumpy", Grumpy)
    with caplog.at_level(logging.ERROR, logger="celery_spawn"):
        result = rig.spawn({"handler": "grumpy"}, value="v")
    assert result.state == "SUCCESS" and result.get() == "v"
    assert rig.operation(result.id)["state"] != s.OP_FAILED and len(rig.runs) == 1
    assert "observer broke" in caplog.text


def test_on_spawn_complete_is_not_called_for_a_refused_spawn(sqlite_rig):
    rig = sqlite_rig
    completed = []

    class Refuses(SpawnHandler):
        def validate_spawn(self, parent, config):
            raise ValueError("no")

        def on_spawn_complete(self, result):
            completed.append(result)

    rig.manager.register_handler("refuses", Refuses)
    rig.spawn({"handler": "refuses"})
    assert completed == []


def test_spawn_recorded_signal_carries_the_result(sqlite_rig):
    from celery_spawn import signals

    rig = sqlite_rig
    rig.manager.register_handler("one", lambda context: [rig.sig(1)])
    got = []

    def receiver(sender=None, result=None, **_):
        if sender.app is rig.app:
            got.append(result)

    signals.spawn_recorded.connect(receiver, weak=False)
    try:
        result = rig.spawn({"handler": "one"})
    finally:
        signals.spawn_recorded.disconnect(receiver)
    (spawn_result,) = got
    assert spawn_result.parent_job_id == result.id and len(spawn_result.spawned_job_ids) == 1


def test_register_handler_is_also_a_decorator_and_config_has_new():
    from celery_spawn import SpawnConfig, SpawnManager

    manager = SpawnManager()

    @manager.register_handler("decorated")
    def decorated(context):
        return []

    assert manager.has_handler("decorated") and decorated(None) == []
    assert SpawnConfig.new() == SpawnConfig()


@pytest.mark.parametrize("operation_id", ["op", "9f3a1c2e-0b7d-5e4f-8a6b-1c2d3e4f5a6b", "tenant:42.report~1a2b3c4d",
                                          "é/ü", "x" * 255])
def test_child_ids_are_uuid5_of_the_operation_and_sequence(operation_id):
    """The hashed-once ids are exactly ``uuid5(CHILD_ID_NAMESPACE, "<operation>/<n>")``: stored ids stay valid."""
    import uuid

    from celery_spawn.handlers import CHILD_ID_NAMESPACE, ChildIds, child_id

    ids = ChildIds(operation_id)
    for sequence in [*range(20), 999, 10_000, 123_456_789]:
        expected = str(uuid.uuid5(CHILD_ID_NAMESPACE, f"{operation_id}/{sequence}"))
        assert ids.at(sequence) == child_id(operation_id, sequence) == expected
