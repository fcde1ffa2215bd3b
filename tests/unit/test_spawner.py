"""SpawnTask and the spawner, on a real Celery app in eager mode and a real SQL store.

The ``Rig`` (in ``tests/unit/helpers.py``, its fixtures in ``tests/unit/conftest.py``)
is shared with the other unit test files of this suite: it is a Celery app on
the ``memory://`` broker, installed on a real store, with a parent SpawnTask
and a child task that records every execution.
"""
from __future__ import annotations

import itertools
import json
import uuid

import pytest

from celery_spawn.handlers import labelled_operation_id
from celery import chain, chord, group

from celery_spawn import (
    DependencyError,
    HandlerError,
    HandlerNotFound,
    SpawnConfig,
    SpawnConfigError,
    SpawnDepthExceeded,
    SpawnHandler,
    SpawnLimitExceeded,
    SpawnTask,
    SpawnValidationError,
    child_id,
    depends_on,
    install,
    with_spawn_handler,
)
from celery_spawn.contrib.testing import assert_tree
from celery_spawn.store import queries
from celery_spawn.store import schema as s
from celery_spawn.engine.publisher import Publisher
from tests.unit.helpers import Rig


# ---- the reserved kwarg -------------------------------------------------------------------------
def test_spawn_config_is_removed_before_a_plain_function_runs(rig):
    @rig.handler("two")
    def two(context):
        return [rig.sig(1), rig.sig(2)]

    result = rig.spawn({"handler": "two"}, value=41)
    assert result.state == "SUCCESS" and result.get() == 41
    assert sorted(args for _, args, _ in rig.runs) == [(1,), (2,)]
    operation = rig.operation(result.id)
    assert operation["state"] == s.OP_SUCCEEDED and operation["total"] == 2
    assert [job["task_name"] for job in rig.children_of(result.id)] == ["unit.child", "unit.child"]


def test_delay_apply_async_and_a_signature_all_carry_the_config(sqlite_rig):
    rig = sqlite_rig

    @rig.handler("one")
    def one(context):
        return [rig.sig(context.parent.result)]

    assert rig.parent.delay(1, _spawn_config={"handler": "one"}).get() == 1
    assert rig.parent.apply_async(args=(2,), kwargs={"_spawn_config": {"handler": "one"}}).get() == 2
    assert with_spawn_handler(rig.parent.s(3), "one").apply_async().get() == 3
    assert sorted(args for _, args, _ in rig.runs) == [(1,), (2,), (3,)]


def test_handler_sees_the_parent_without_the_reserved_kwarg(sqlite_rig):
    rig = sqlite_rig
    seen = {}

    @rig.app.task(name="unit.kw_parent", base=SpawnTask, shared=False)
    def kw_parent(a, b=0):
        return a + b

    @rig.handler("look")
    def look(context):
        seen["parent"] = context.parent
        return []

    result = kw_parent.apply(args=(1,), kwargs={"b": 2, "_spawn_config": {"handler": "look"}})
    assert result.get() == 3
    parent = seen["parent"]
    assert parent.id == result.id and parent.name == "unit.kw_parent"
    assert parent.args == (1,) and parent.kwargs == {"b": 2}
    assert parent.result == 3 and parent.depth == 0 and parent.root_id == result.id


def test_calling_the_function_directly_spawns_nothing(sqlite_rig):
    rig = sqlite_rig

    @rig.handler("never")
    def never(context):  # pragma: no cover - must not run
        raise AssertionError("a direct call must not spawn")

    assert rig.parent(5, _spawn_config={"handler": "never"}) == 5
    assert rig.operations() == [] and rig.runs == []


def test_a_call_without_config_on_a_task_without_defaults_spawns_nothing(sqlite_rig):
    rig = sqlite_rig
    rig.manager.register_handler("other", lambda context: [rig.sig(1)])
    assert rig.parent.apply(args=(5,)).get() == 5
    assert rig.operations() == [] and rig.runs == []


def test_a_parent_whose_body_raises_spawns_nothing(sqlite_rig):
    rig = sqlite_rig
    rig.manager.register_handler("one", lambda context: [rig.sig(1)])

    @rig.app.task(name="unit.broken", base=SpawnTask, shared=False)
    def broken(value):
        raise ValueError("body failed")

    result = broken.apply(args=(1,), kwargs={"_spawn_config": {"handler": "one"}})
    assert result.state == "FAILURE" and isinstance(result.result, ValueError)
    assert rig.operations() == [] and rig.runs == []


def test_a_bound_task_that_retries_spawns_once_after_it_succeeds(sqlite_rig):
    rig = sqlite_rig
    rig.manager.register_handler("two", lambda context: [rig.sig(1), rig.sig(2)])
    attempts = []

    @rig.app.task(name="unit.flaky", base=SpawnTask, bind=True, shared=False, max_retries=3,
                  default_retry_delay=0)
    def flaky(self, value):
        attempts.append(self.request.retries)
        if self.request.retries < 2:
            raise self.retry(countdown=0)
        return value

    result = flaky.apply(args=("v",), kwargs={"_spawn_config": {"handler": "two"}})
    assert result.get() == "v"
    assert attempts == [0, 1, 2]
    (operation,) = rig.operations()
    assert operation["total"] == 2 and len(rig.runs) == 2


# ---- task-level defaults and handler lookup -----------------------------------------------------
def test_task_level_handler_and_config_spawn_on_every_call(rig):
    configs = []

    @rig.handler("fan")
    def fan(context):
        configs.append(context.config)
        return [rig.sig(i) for i in range(context.parent.result)]

    @rig.app.task(name="unit.declared", base=SpawnTask, shared=False, spawn_handler="fan",
                  spawn_config=SpawnConfig(max_spawn_count=3, batch_size=2, metadata={"m": 1}))
    def declared(n):
        return n

    assert declared.apply(args=(3,)).get() == 3
    assert len(rig.runs) == 3
    assert configs[0].handler == "fan" and configs[0].max_spawn_count == 3 and configs[0].batch_size == 2

    # A call's own _spawn_config overrides the task's defaults key by key.
    result = declared.apply(args=(4,), kwargs={"_spawn_config": {"max_spawn_count": 4}})
    assert result.get() == 4
    assert configs[1].handler == "fan"
    assert configs[1].max_spawn_count == 4
    assert configs[1].batch_size == 2 and configs[1].metadata == {"m": 1}
    assert len(rig.runs) == 7
    assert json.loads(rig.operation(result.id)["config"]) == {
        "handler": "fan", "max_spawn_count": 4, "batch_size": 2, "metadata": {"m": 1}}

    # Without the override the default still refuses a fourth child.
    refused = declared.apply(args=(4,))
    assert refused.get() == 4
    assert rig.operation(refused.id)["error"].startswith("SpawnLimitExceeded")


def test_task_level_defaults_accept_the_dict_form(sqlite_rig):
    rig = sqlite_rig
    rig.manager.register_handler("fan", lambda context: [rig.sig(1), rig.sig(2)])

    @rig.app.task(name="unit.dict_declared", base=SpawnTask, shared=False, spawn_config={"handler": "fan"})
    def declared(n):
        return n

    assert declared.apply(args=(0,)).get() == 0
    assert len(rig.runs) == 2


def test_a_call_can_name_another_handler_than_the_task(sqlite_rig):
    rig = sqlite_rig
    rig.manager.register_handler("declared", lambda context: [rig.sig("declared")])
    rig.manager.register_handler("chosen", lambda context: [rig.sig("chosen")])

    @rig.app.task(name="unit.switch", base=SpawnTask, shared=False, spawn_handler="declared")
    def switch(n):
        return n

    switch.apply(args=(1,), kwargs={"_spawn_config": {"handler": "chosen"}})
    switch.apply(args=(1,))
    assert [args for _, args, _ in rig.runs] == [("chosen",), ("declared",)]


def test_handler_is_looked_up_by_the_tasks_own_name(rig):
    @rig.handler("unit.parent")
    def by_name(context):
        return [rig.sig("by-name")]

    result = rig.spawn({}, value=1)
    assert result.get() == 1
    assert [args for _, args, _ in rig.runs] == [("by-name",)]
    assert rig.operation(result.id)["handler"] == "unit.parent"


def test_a_handler_object_can_be_declared_on_the_task(sqlite_rig):
    rig = sqlite_rig

    class Pair(SpawnHandler):
        def spawn_jobs(self, context):
            return [rig.sig("a"), rig.sig("b")]

    @rig.app.task(name="unit.object_declared", base=SpawnTask, shared=False, spawn_handler=Pair())
    def declared(n):
        return n

    assert declared.apply(args=(1,)).get() == 1
    assert sorted(args for _, args, _ in rig.runs) == [("a",), ("b",)]


def test_unknown_handler_is_refused(rig):
    rig.manager.register_handler("known", lambda context: [rig.sig(1)])
    result = rig.spawn({"handler": "missing"}, value="kept")
    operation = rig.assert_refused(result, "kept", HandlerNotFound, "'missing'")
    assert "known" in operation["error"]  # the hint lists what is registered
    assert operation["handler"] == "missing"


def test_no_handler_under_the_task_name_is_refused(sqlite_rig):
    result = sqlite_rig.spawn({}, value="kept")
    sqlite_rig.assert_refused(result, "kept", HandlerNotFound, "'unit.parent'")


# ---- validation and limits ----------------------------------------------------------------------
def test_validate_spawn_refusing_stops_the_spawn_before_any_child_is_generated(rig):
    generated = []

    class Picky(SpawnHandler):
        def validate_spawn(self, parent, config):
            if "dataset_id" not in str(parent.result):
                raise ValueError("parent job missing required dataset_id")

        def spawn_jobs(self, context):
            generated.append(context.parent.id)
            return [rig.sig(1)]

    rig.manager.register_handler("picky", Picky)
    result = rig.spawn({"handler": "picky"}, value="no id here")
    rig.assert_refused(result, "no id here", SpawnValidationError, "parent job missing required dataset_id")
    assert generated == []

    accepted = rig.spawn({"handler": "picky"}, value="dataset_id=3")
    assert rig.operation(accepted.id)["state"] == s.OP_SUCCEEDED and len(rig.runs) == 1


def test_a_spawn_error_raised_by_validate_spawn_keeps_its_type(sqlite_rig):
    class Limits(SpawnHandler):
        def validate_spawn(self, parent, config):
            raise SpawnLimitExceeded("tenant quota reached")

    sqlite_rig.manager.register_handler("limits", Limits)
    result = sqlite_rig.spawn({"handler": "limits"}, value=1)
    sqlite_rig.assert_refused(result, 1, SpawnLimitExceeded, "tenant quota reached")


def test_more_children_than_max_spawn_count_refuses_the_whole_spawn(rig):
    @rig.handler("many")
    def many(context):
        return [rig.sig(i) for i in range(context.parent.result)]

    result = rig.spawn({"handler": "many", "max_spawn_count": 3, "batch_size": 2}, value=4)
    rig.assert_refused(result, 4, SpawnLimitExceeded, "max_spawn_count=3")

    exactly = rig.spawn({"handler": "many", "max_spawn_count": 3, "batch_size": 2}, value=3)
    assert exactly.get() == 3
    assert len(rig.children_of(exactly.id)) == 3 and len(rig.runs) == 3


def test_an_endless_generator_is_cut_off_by_the_limit(sqlite_rig):
    rig = sqlite_rig
    pulled = itertools.count()

    @rig.handler("endless")
    def endless(context):
        for i in itertools.count():
            next(pulled)
            yield rig.sig(i)

    result = rig.spawn({"handler": "endless", "max_spawn_count": 5, "batch_size": 4}, value="x")
    rig.assert_refused(result, "x", SpawnLimitExceeded)
    assert next(pulled) <= 5 + 4  # consumed at most one batch past the limit


def test_default_limit_is_one_hundred(sqlite_rig):
    rig = sqlite_rig

    @rig.handler("many")
    def many(context):
        return [rig.sig(i) for i in range(context.parent.result)]

    rig.assert_refused(rig.spawn({"handler": "many"}, value=101), 101, SpawnLimitExceeded, "max_spawn_count=100")


def test_zero_children_is_a_finished_operation(rig):
    rig.manager.register_handler("none", lambda context: [])
    result = rig.spawn({"handler": "none", "max_spawn_count": 0}, value=0)
    operation = rig.operation(result.id)
    assert operation["state"] == s.OP_SUCCEEDED and operation["total"] == 0 and operation["error"] is None
    assert rig.jobs(operation["id"]) == []


def test_the_apps_default_max_spawn_count_applies(sqlite_url):
    rig = Rig(sqlite_url, default_max_spawn_count=2)
    try:
        rig.manager.register_handler("three", lambda context: [rig.sig(1), rig.sig(2), rig.sig(3)])
        rig.assert_refused(rig.spawn({"handler": "three"}, value=1), 1, SpawnLimitExceeded, "max_spawn_count=2")
        assert rig.spawn({"handler": "three", "max_spawn_count": 3}, value=2).get() == 2
        assert len(rig.runs) == 3
    finally:
        rig.close()


@pytest.mark.parametrize("how", ["conf", "install"])
def test_the_ceiling_applies_whatever_the_payload_asks(sqlite_url, how):
    if how == "install":
        rig = Rig(sqlite_url, max_spawn_count_ceiling=10)
    else:
        rig = Rig(sqlite_url)
        rig.app.conf.spawn_max_spawn_count_ceiling = 10
        install(rig.app)  # settings are read again on reinstall
    try:
        rig.manager.register_handler("n", lambda context: [rig.sig(i) for i in range(context.parent.result)])
        refused = rig.spawn({"handler": "n", "max_spawn_count": 11}, value=1)
        rig.assert_refused(refused, 1, SpawnConfigError, "spawn_max_spawn_count_ceiling=10")
        allowed = rig.spawn({"handler": "n", "max_spawn_count": 10}, value=10)
        assert len(rig.children_of(allowed.id)) == 10
    finally:
        rig.close()


def test_a_ceiling_below_the_default_limit_lowers_the_default(sqlite_url):
    # Regression: the default max_spawn_count (100) used to exceed a lower ceiling and refuse every spawn.
    rig = Rig(sqlite_url, max_spawn_count_ceiling=5)
    try:
        rig.manager.register_handler("n", lambda context: [rig.sig(i) for i in range(context.parent.result)])
        small = rig.spawn({"handler": "n"}, value=3)
        assert rig.operation(small.id)["state"] == s.OP_SUCCEEDED
        assert len(rig.runs) == 3
        rig.runs.clear()
        rig.assert_refused(rig.spawn({"handler": "n"}, value=6), 6, SpawnLimitExceeded, "max_spawn_count=5")
    finally:
        rig.close()


# ---- nesting ------------------------------------------------------------------------------------
def test_nested_spawn_tasks_record_depth_and_stop_at_max_depth(rig):
    depths_seen = []

    @rig.handler("tree")
    def tree(context):
        depths_seen.append(context.parent.depth)
        return [context.app.signature("unit.node", args=(f"{context.parent.result}.{i}",)) for i in range(2)]

    @rig.app.task(name="unit.node", base=SpawnTask, shared=False, spawn_handler="tree",
                  spawn_config=SpawnConfig(max_depth=2))
    def node(label):
        return label

    root = node.apply(args=("r",))
    assert root.get() == "r"
    jobs = [job for job in rig.jobs() if job["operation_id"] is not None]
    assert sorted(job["depth"] for job in jobs) == [1, 1, 2, 2, 2, 2]
    assert {job["root_id"] for job in jobs} == {root.id}
    level1 = {job["id"] for job in jobs if job["depth"] == 1}
    assert {job["parent_id"] for job in jobs if job["depth"] == 2} == level1
    assert sorted(depths_seen) == [0, 1, 1]
    leaf = {"task": "unit.node", "state": "succeeded", "children": []}
    assert_tree(rig.app, root.id, {"task": "unit.node", "state": "succeeded", "children": [
        {"task": "unit.node", "state": "succeeded", "children": [leaf, leaf]}] * 2})

    operations = rig.operations()
    refused = [op for op in operations if op["state"] == s.OP_FAILED]
    assert len(refused) == 4
    assert all(op["error"].startswith("SpawnDepthExceeded") and op["depth"] == 2 for op in refused)
    assert {op["parent_id"] for op in refused} == {job["id"] for job in jobs if job["depth"] == 2}
    assert [type(exc) for _, exc in rig.failures] == [SpawnDepthExceeded] * 4


def test_max_depth_zero_refuses_even_the_first_level(sqlite_rig):
    sqlite_rig.manager.register_handler("one", lambda context: [sqlite_rig.sig(1)])
    result = sqlite_rig.spawn({"handler": "one", "max_depth": 0}, value=1)
    sqlite_rig.assert_refused(result, 1, SpawnDepthExceeded, "max_depth=0")


# ---- inheritance --------------------------------------------------------------------------------
def test_priority_and_queue_are_inherited_into_the_stored_rows(rig):
    @rig.handler("mixed")
    def mixed(context):
        return [rig.sig("plain"), rig.sig("own").set(priority=3, queue="own-queue")]

    inherit = rig.spawn({"handler": "mixed", "inherit_queue": True}, value=1, priority=7, routing_key="q1")
    plain, own = rig.children_of(inherit.id)
    assert (plain["priority"], plain["queue"]) == (7, "q1")
    assert (own["priority"], own["queue"]) == (3, "own-queue")
    assert rig.operation(inherit.id)["queue"] == "q1"

    keep_own = rig.spawn({"handler": "mixed", "inherit_priority": False}, value=2, priority=7, routing_key="q1")
    plain, own = rig.children_of(keep_own.id)
    assert plain["priority"] is None
    assert plain["queue"] == rig.queue  # the app's routing, not the parent's queue
    assert (own["priority"], own["queue"]) == (3, "own-queue")


def test_published_messages_carry_inheritance_lineage_and_deterministic_ids(broker_rig):
    rig = broker_rig
    parent_queue = f"{rig.queue}-parent"
    rig.manager.register_handler("three", lambda context: [rig.sig(i) for i in range(3)])

    result = rig.spawn({"handler": "three", "inherit_queue": True}, value=1, priority=7, routing_key=parent_queue)
    assert result.get() == 1
    messages = rig.drain(parent_queue)
    assert len(messages) == 3 and rig.drain() == []
    operation = rig.operation(result.id)
    expected_ids = [child_id(operation["id"], i) for i in range(3)]
    assert [m.headers["id"] for m in messages] == expected_ids
    for message in messages:
        assert message.properties["priority"] == 7
        assert message.delivery_info["routing_key"] == parent_queue
        assert message.headers["parent_id"] == result.id
        assert message.headers["root_id"] == result.id
        assert message.headers["task"] == "unit.child"
        assert message.headers["spawn_operation"] == operation["id"]
        assert message.headers["spawn_depth"] == 1
        assert "spawn_depends_on" not in json.dumps(message.headers)
    assert [job["state"] for job in rig.jobs(operation["id"])] == [s.DISPATCHED] * 3


def test_without_inheritance_children_follow_the_apps_routing(broker_rig):
    rig = broker_rig
    rig.manager.register_handler("one", lambda context: [rig.sig(1)])
    rig.spawn({"handler": "one", "inherit_priority": False}, value=1, priority=7, routing_key="elsewhere")
    (message,) = rig.drain()
    assert message.delivery_info["routing_key"] == rig.queue
    assert not message.properties.get("priority")
    assert rig.drain("elsewhere") == []


def test_inherit_queue_follows_a_queue_bound_through_a_named_exchange(broker_rig):
    from kombu import Exchange, Queue

    rig = broker_rig
    images = Queue(f"{rig.queue}-images", Exchange(f"{rig.queue}-media", type="direct"), routing_key="media.image")
    rig.app.conf.task_queues = [Queue(rig.queue), images]
    with rig.app.connection_for_write() as conn:
        images.bind(conn.default_channel).declare()
    rig.manager.register_handler("two", lambda context: [rig.sig(1), rig.sig(2)])
    rig.spawn({"handler": "two", "inherit_queue": True}, value=1, exchange=images.exchange.name,
              routing_key="media.image")
    stray = rig.drain("media.image")
    assert len(rig.drain(images.name)) == 2 and stray == []


# ---- deterministic ids and freeze ----------------------------------------------------------------
def test_child_ids_are_deterministic_for_a_parent_and_position(rig, tmp_path):
    rig.manager.register_handler("three", lambda context: [rig.sig(i) for i in range(3)])
    first = rig.spawn({"handler": "three"}, value=1)
    second = rig.spawn({"handler": "three"}, value=1)
    first_op, second_op = rig.operation(first.id), rig.operation(second.id)
    first_ids = [job["id"] for job in rig.jobs(first_op["id"])]
    assert first_ids == [child_id(first_op["id"], i) for i in range(3)]
    assert rig.ran()[:3] == first_ids  # the tasks ran under those ids
    assert set(first_ids).isdisjoint(job["id"] for job in rig.jobs(second_op["id"]))

    # Another store, the same parent id: the same operation and child ids.
    other = Rig(f"sqlite:///{tmp_path / 'other.sqlite3'}")
    try:
        other.manager.register_handler("three", lambda context: [other.sig(i) for i in range(3)])
        again = other.spawn({"handler": "three"}, value=1, task_id=first.id)
        assert [job["id"] for job in other.children_of(again.id)] == first_ids
    finally:
        other.close()


def test_child_id_is_a_pure_function():
    assert child_id("op", 0) == child_id("op", 0)
    assert len({child_id("op", i) for i in range(100)} | {child_id("other", 0)}) == 101
    uuid.UUID(child_id("op", 7))


def test_an_explicit_operation_id_names_the_operation(sqlite_rig):
    rig = sqlite_rig
    rig.manager.register_handler("two", lambda context: [rig.sig(1), rig.sig(2)])
    result = rig.spawn({"handler": "two", "operation_id": "op-dataset-123"}, value=1)
    operation = rig.operation(result.id)
    assert operation["id"] == "op-dataset-123"
    assert [job["id"] for job in rig.jobs("op-dataset-123")] == [child_id("op-dataset-123", i) for i in range(2)]


def test_a_label_used_by_another_parent_still_spawns_under_a_derived_id(sqlite_rig):
    rig = sqlite_rig
    rig.manager.register_handler("two", lambda context: [rig.sig(1), rig.sig(2)])
    first = rig.spawn({"handler": "two", "operation_id": "shared-op"}, value=1)
    rig.runs.clear()
    second = rig.spawn({"handler": "two", "operation_id": "shared-op"}, value=2)
    assert second.state == "SUCCESS" and second.get() == 2
    assert sorted(run[1] for run in rig.runs) == [(1,), (2,)] and rig.failures == []
    operations = {op["parent_id"]: op for op in rig.operations()}
    assert operations[first.id]["id"] == "shared-op"
    derived = operations[second.id]
    assert derived["id"] == labelled_operation_id("shared-op", second.id) and derived["id"].startswith("shared-op~")
    assert {op["label"] for op in operations.values()} == {"shared-op"}
    assert all(op["state"] == s.OP_SUCCEEDED for op in operations.values())
    assert len(rig.jobs("shared-op")) == 2 and len(rig.jobs(derived["id"])) == 2


def test_a_redelivered_parent_with_a_shared_label_spawns_once(sqlite_rig):
    rig = sqlite_rig
    rig.manager.register_handler("two", lambda context: [rig.sig(1), rig.sig(2)])
    rig.spawn({"handler": "two", "operation_id": "shared-op"}, value=1)
    second = rig.spawn({"handler": "two", "operation_id": "shared-op"}, value=2, task_id="second-parent")
    again = rig.spawn({"handler": "two", "operation_id": "shared-op"}, value=2, task_id="second-parent")
    assert second.state == again.state == "SUCCESS"
    assert len(rig.operations()) == 2
    assert len(rig.jobs(labelled_operation_id("shared-op", "second-parent"))) == 2


def test_a_label_taken_between_read_and_insert_falls_back_to_the_derived_id(sqlite_rig, monkeypatch):
    rig = sqlite_rig
    rig.manager.register_handler("two", lambda context: [rig.sig(1), rig.sig(2)])
    rig.spawn({"handler": "two", "operation_id": "raced"}, value=1)
    monkeypatch.setattr(type(rig.state.store), "operation_owner", lambda self, conn, operation_id: None)
    second = rig.spawn({"handler": "two", "operation_id": "raced"}, value=2, task_id="late-parent")
    assert second.state == "SUCCESS" and rig.failures == []
    assert rig.operation("late-parent")["id"] == labelled_operation_id("raced", "late-parent")
    assert len(rig.jobs("raced")) == 2 and len(rig.jobs(labelled_operation_id("raced", "late-parent"))) == 2


def test_freeze_gives_the_id_a_sibling_can_depend_on(rig):
    frozen = {}

    @rig.handler("siblings")
    def siblings(context):
        first = rig.sig("first")
        frozen["first"] = context.freeze(first)
        assert context.freeze(first) == frozen["first"]  # freezing twice keeps the id
        second = depends_on(rig.sig("second"), frozen["first"])
        frozen["second"] = context.freeze(second)
        return [second, first]  # the dependent comes first: order is the handler's business

    result = rig.spawn({"handler": "siblings"}, value=1)
    operation = rig.operation(result.id)
    assert operation["state"] != s.OP_FAILED, operation["error"]
    children = {job["id"]: job for job in rig.jobs(operation["id"])}
    assert set(children) == {frozen["first"], frozen["second"]}
    assert frozen["first"] == child_id(operation["id"], 0)
    assert [(e["job_id"], e["depends_on_id"]) for e in rig.edges()] == [(frozen["second"], frozen["first"])]
    assert rig.ran()[0] == frozen["first"]  # the dependency ran; its dependent, if released, ran after it
    assert rig.ran().count(frozen["second"]) <= 1


def test_a_dependency_on_the_parent_itself_is_met_at_once(sqlite_rig):
    rig = sqlite_rig
    rig.manager.register_handler("after_parent",
                                 lambda context: [depends_on(rig.sig(1), context.parent.id)])
    result = rig.spawn({"handler": "after_parent"}, value=1)
    (job,) = rig.children_of(result.id)
    assert job["pending_deps"] == 0
    assert rig.ran() == [job["id"]]


def test_freeze_refuses_what_is_not_a_signature(sqlite_rig):
    rig = sqlite_rig

    @rig.handler("bad_freeze")
    def bad_freeze(context):
        context.freeze("not a signature")
        return []

    rig.assert_refused(rig.spawn({"handler": "bad_freeze"}, value=1), 1, HandlerError, "freeze()")


# ---- generators and bad handlers ----------------------------------------------------------------
def test_a_generator_is_consumed_in_small_batches(rig):
    @rig.handler("stream")
    def stream(context):
        for i in range(7):
            yield rig.sig(i)

    result = rig.spawn({"handler": "stream", "batch_size": 2}, value=1)
    jobs = rig.children_of(result.id)
    assert [job["position"] for job in jobs] == list(range(7))
    assert sorted(args for _, args, _ in rig.runs) == [(i,) for i in range(7)]
    assert rig.operation(result.id)["total"] == 7


def test_a_generator_failing_halfway_keeps_no_child(rig):
    @rig.handler("halfway")
    def halfway(context):
        for i in range(3):
            yield rig.sig(i)
        raise RuntimeError("source went away")

    result = rig.spawn({"handler": "halfway", "batch_size": 2}, value="still here")
    rig.assert_refused(result, "still here", HandlerError, "RuntimeError: source went away")
    assert "'halfway'" in rig.operation(result.id)["error"]


def test_a_handler_raising_at_once_is_named(sqlite_rig):
    rig = sqlite_rig

    @rig.handler("boom")
    def boom(context):
        raise KeyError("size")

    rig.assert_refused(rig.spawn({"handler": "boom"}, value=1), 1, HandlerError, "handler 'boom' raised KeyError")


def _returns(rig: Rig, what: str):
    a, b = rig.sig(1), rig.sig(2)
    return {
        "ints": [1, 2],
        "mixed": [a, "b"],
        "dicts": [dict(a)],
        "a group": [group(a, b)],
        "a chain": [chain(a, b)],
        "a chord": [chord([a], b)],
        "an int": 5,
        "a string": "abc",
        "one signature": a,
        "a bare group": group(a, b),
        "a bare chain": chain(a, b),
        "no task name": [rig.app.signature(None)],
    }[what]


@pytest.mark.parametrize("what", ["ints", "mixed", "dicts", "a group", "a chain", "a chord", "an int", "a string",
                                  "one signature", "a bare group", "a bare chain", "no task name"])
def test_a_handler_returning_anything_but_signatures_is_refused(sqlite_rig, what):
    rig = sqlite_rig
    rig.manager.register_handler("odd", lambda context: _returns(rig, what))
    rig.assert_refused(rig.spawn({"handler": "odd", "batch_size": 1}, value="kept"), "kept", HandlerError)


def test_a_handler_returning_none_spawns_nothing(sqlite_rig):
    rig = sqlite_rig
    rig.manager.register_handler("nothing", lambda context: None)
    result = rig.spawn({"handler": "nothing"}, value=1)
    operation = rig.operation(result.id)
    assert operation["state"] == s.OP_SUCCEEDED and operation["total"] == 0 and rig.runs == []


def test_non_json_child_arguments_are_refused(rig):
    @rig.handler("opaque")
    def opaque(context):
        return [rig.sig(1), rig.sig(object()), rig.sig(3)]

    rig.assert_refused(rig.spawn({"handler": "opaque"}, value=1), 1, HandlerError, "child #1")


def test_a_handler_repeating_a_task_id_is_refused(sqlite_rig):
    rig = sqlite_rig
    rig.manager.register_handler("twice", lambda context: [rig.sig(1).set(task_id="x"), rig.sig(2).set(task_id="x")])
    rig.assert_refused(rig.spawn({"handler": "twice"}, value=1), 1, HandlerError, "repeats task id x")


@pytest.mark.parametrize("clash", ["earlier child", "parent id"])
def test_a_handler_reusing_an_existing_job_id_is_refused(sqlite_rig, clash):
    rig = sqlite_rig
    rig.manager.register_handler("fixed", lambda context: [
        rig.sig(1).set(task_id="report-job" if clash == "earlier child" else context.parent.id)])
    if clash == "earlier child":
        rig.spawn({"handler": "fixed"}, value=1)
        rig.runs.clear()
    result = rig.spawn({"handler": "fixed"}, value=2)
    rig.assert_refused(result, 2, HandlerError)


def test_non_json_metadata_is_refused_and_the_parent_result_stands(sqlite_rig):
    rig = sqlite_rig
    rig.manager.register_handler("one", lambda context: [rig.sig(1)])
    result = rig.spawn({"handler": "one", "metadata": {"tags": {"a", "b"}}}, value="kept")
    rig.assert_refused(result, "kept", SpawnConfigError, "metadata")


def test_control_characters_in_names_are_refused(rig):
    # Regression: PostgreSQL refused NUL with a bare ValueError, which failed the parent.
    rig.manager.register_handler("one", lambda context: [rig.sig(1)])
    rig.assert_refused(rig.spawn({"handler": "a\x00b"}, value="kept"), "kept", SpawnConfigError, "handler")
    rig.assert_refused(rig.spawn({"handler": "one", "operation_id": "op\x00"}, value="kept"), "kept",
                       SpawnConfigError, "operation_id")
    rig.manager.register_handler("bad_name", lambda context: [rig.app.signature("unit.\x00child")])
    rig.assert_refused(rig.spawn({"handler": "bad_name"}, value="kept"), "kept", HandlerError)


# ---- dependencies refused -----------------------------------------------------------------------
@pytest.mark.parametrize("shape", ["cycle", "self", "unknown", "unfrozen"])
def test_bad_dependencies_are_refused_and_nothing_dispatched(rig, shape):
    @rig.handler("deps")
    def deps(context):
        a, b, c = rig.sig("a"), rig.sig("b"), rig.sig("c")
        ids = [context.freeze(sig) for sig in (a, b, c)]
        if shape == "cycle":
            depends_on(a, ids[2])
            depends_on(b, ids[0])
            depends_on(c, ids[1])
        elif shape == "self":
            depends_on(b, ids[1])
        elif shape == "unknown":
            depends_on(c, "no-such-job")
        else:
            depends_on(c, rig.sig("never frozen"))
        return [a, b, c]

    result = rig.spawn({"handler": "deps", "batch_size": 2}, value="kept")
    rig.assert_refused(result, "kept", DependencyError)
    assert rig.edges() == []


def test_a_dependency_on_a_job_of_an_earlier_operation_is_accepted(sqlite_rig):
    rig = sqlite_rig
    rig.manager.register_handler("one", lambda context: [rig.sig("earlier")])
    earlier = rig.spawn({"handler": "one"}, value=1)
    (earlier_job,) = rig.children_of(earlier.id)
    rig.manager.register_handler("later", lambda context: [depends_on(rig.sig("later"), earlier_job["id"])])
    later = rig.spawn({"handler": "later"}, value=2)
    assert rig.operation(later.id)["state"] != s.OP_FAILED
    assert [(e["depends_on_id"]) for e in rig.edges()] == [earlier_job["id"]]


def test_a_dependency_on_a_job_that_already_succeeded_does_not_hold_the_child(sqlite_rig):
    rig = sqlite_rig
    rig.manager.register_handler("one", lambda context: [rig.sig("earlier")])
    earlier = rig.spawn({"handler": "one"}, value=1)
    (earlier_job,) = rig.children_of(earlier.id)
    assert earlier_job["state"] == s.SUCCEEDED
    rig.manager.register_handler("later", lambda context: [depends_on(rig.sig("later"), earlier_job["id"])])
    later = rig.spawn({"handler": "later"}, value=2)
    (job,) = rig.children_of(later.id)
    assert job["state"] != s.HELD
    assert [args for _, args, _ in rig.runs] == [("earlier",), ("later",)]


# ---- idempotency --------------------------------------------------------------------------------
def test_the_same_parent_spawning_twice_creates_and_dispatches_nothing_new(rig):
    calls = []

    @rig.handler("three")
    def three(context):
        calls.append(context.parent.id)
        return [rig.sig(i) for i in range(3)]

    parent_id = str(uuid.uuid4())
    first = rig.spawn({"handler": "three"}, value="v", task_id=parent_id)
    snapshot = (rig.operations(), rig.jobs())
    second = rig.spawn({"handler": "three"}, value="v", task_id=parent_id)
    assert first.get() == second.get() == "v"
    assert len(rig.runs) == 3 and len(set(rig.ran())) == 3
    assert calls == [parent_id]  # the handler is not even asked again
    operations, jobs = rig.operations(), rig.jobs()
    assert len(operations) == 1 and len(jobs) == 4  # the parent's own row and three children
    assert [job["id"] for job in jobs] == [job["id"] for job in snapshot[1]]
    assert operations[0]["total"] == 3


def test_a_redelivered_parent_publishes_only_what_was_never_published(rig, monkeypatch):
    rig.manager.register_handler("three", lambda context: [rig.sig(i) for i in range(3)])

    def broker_down(app, children):
        raise ConnectionError("broker unreachable")

    monkeypatch.setattr(Publisher, "publish", broker_down)
    parent_id = str(uuid.uuid4())
    first = rig.spawn({"handler": "three"}, value="v", task_id=parent_id)
    assert first.get() == "v"  # the parent succeeded: its children are recorded, not lost
    assert [job["state"] for job in rig.children_of(parent_id)] == [s.PENDING] * 3
    assert rig.runs == []

    monkeypatch.undo()
    again = rig.spawn({"handler": "three"}, value="v", task_id=parent_id)
    assert again.get() == "v"
    assert sorted(rig.ran()) == sorted(job["id"] for job in rig.children_of(parent_id))
    rig.spawn({"handler": "three"}, value="v", task_id=parent_id)
    assert len(rig.runs) == 3


def test_a_failed_operation_is_retried_when_the_parent_runs_again(sqlite_rig):
    rig = sqlite_rig
    parent_id = str(uuid.uuid4())
    refused = rig.spawn({"handler": "later"}, value=1, task_id=parent_id)
    rig.assert_refused(refused, 1, HandlerNotFound)
    rig.manager.register_handler("later", lambda context: [rig.sig(1), rig.sig(2)])
    retried = rig.spawn({"handler": "later"}, value=1, task_id=parent_id)
    assert retried.get() == 1
    operation = rig.operation(parent_id)
    assert operation["state"] == s.OP_SUCCEEDED and operation["error"] is None and operation["total"] == 2
    assert len(rig.runs) == 2


def test_refusals_do_not_leak_into_the_next_spawn(sqlite_rig):
    rig = sqlite_rig
    rig.manager.register_handler("two", lambda context: [rig.sig(1), rig.sig(2)])
    for bad in ({"handler": "two", "max_spawn_count": 1}, {"handler": "nope"}, {"handler": "two", "colour": 1}):
        assert rig.spawn(bad, value="v").get() == "v"
    good = rig.spawn({"handler": "two"}, value="v")
    assert len(rig.children_of(good.id)) == 2 and len(rig.runs) == 2
    assert [op["state"] for op in rig.operations()].count(s.OP_FAILED) == 3


# ---- bad configs refused at spawn time ----------------------------------------------------------
@pytest.mark.parametrize("config, key", [
    ({"handler": "two", "colour": "red"}, "colour"),
    ({"handler": "two", "max_spawn_count": -1}, "max_spawn_count"),
    ({"handler": "two", "max_spawn_count": True}, "max_spawn_count"),
    ({"handler": "two", "batch_size": 10 ** 9}, "batch_size"),
    ({"handler": ""}, "handler"),
    ({"handler": "two", "inherit_queue": "yes"}, "inherit_queue"),
    (["handler", "two"], "_spawn_config"),
    ("two", "_spawn_config"),
])
def test_bad_spawn_configs_are_refused_naming_the_key(rig, config, key):
    rig.manager.register_handler("two", lambda context: [rig.sig(1), rig.sig(2)])
    operation = rig.assert_refused(rig.spawn(config, value="v"), "v", SpawnConfigError, key)
    assert operation["config"]  # what was asked is kept for the post-mortem


@pytest.mark.parametrize("config,handler", [
    ({"handler": "data_processor", "max_spawn_count": "lots"}, "data_processor"),  # a bad value: its handler
    ({"max_spawn_count": -1}, "unit.parent"),  # no handler asked for: the task's own name, as a lookup uses
    ("not a dict", "unit.parent"),
], ids=["named", "unnamed", "garbage"])
def test_a_spawn_refused_for_its_config_is_recorded_under_the_handler_it_asked_for(sqlite_rig, config, handler):
    rig = sqlite_rig
    result = rig.spawn(config, value="kept")
    operation = rig.assert_refused(result, "kept", SpawnConfigError)
    assert operation["handler"] == handler
    with rig.state.store.read() as conn:
        stats = queries.stats(conn, hours=1, detailed=True)
    assert handler in {row["handler"] for row in stats["by_handler"]}


def test_a_handler_reads_the_parents_arguments_by_name_however_they_were_passed(sqlite_rig):
    rig = sqlite_rig
    seen = []

    @rig.app.task(name="unit.dataset", base=SpawnTask, shared=False, bind=True)
    def dataset(self, dataset_id, records_count, chunk=1000, **extra):
        return dataset_id

    @rig.handler("by_name")
    def by_name(context):
        seen.append(dict(context.parent.arguments))
        return [rig.sig(context.parent.arguments["dataset_id"])]

    config = {"handler": "by_name"}
    dataset.apply(args=("ds-1", 50), kwargs={"_spawn_config": config})
    dataset.apply(kwargs={"dataset_id": "ds-2", "records_count": 7, "tag": "x", "_spawn_config": config})
    assert seen == [{"dataset_id": "ds-1", "records_count": 50, "chunk": 1000},
                    {"dataset_id": "ds-2", "records_count": 7, "chunk": 1000, "tag": "x"}]
    assert sorted(args for _, args, _ in rig.runs) == [("ds-1",), ("ds-2",)]


def test_arguments_that_do_not_fit_the_signature_fall_back_to_the_keyword_arguments():
    from celery_spawn.handlers import bind_arguments

    def f(a, b=2, *rest, **more):
        return a

    assert bind_arguments(f, (1,), {"c": 3}) == {"a": 1, "b": 2, "rest": (), "c": 3}
    assert bind_arguments(f, (), {"b": 5}) == {"b": 5}  # a is missing: the call as given
    assert bind_arguments(len, (), {"x": 1}) == {"x": 1}
