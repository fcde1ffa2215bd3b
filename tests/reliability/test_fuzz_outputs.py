"""Arbitrary handler outputs and ``_spawn_config`` values at a spawn, in eager mode on a real store.

Hypothesis builds what a handler returns: lists, tuples and generators
(which may raise halfway) mixing signatures (with odd options, non-JSON
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

import datetime
import decimal
import itertools
import uuid
from typing import Any, Iterator

import pytest
import sqlalchemy as sa
from celery import Celery, chain, chord, group
from celery.canvas import Signature
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from celery_spawn import SpawnError, SpawnManager, SpawnTask, install, signals
from celery_spawn.signatures import DEPENDS_ON_OPTION, IGNORE_FAILURE_OPTION
from celery_spawn.store import schema as s
from tests.harness import throwaway_database


def _subclasses(cls: type) -> set[type]:
    found = set()
    for sub in cls.__subclasses__():
        found |= {sub} | _subclasses(sub)
    return found


#: The documented error names a failed operation's error may start with.
DOCUMENTED = {cls.__name__ for cls in _subclasses(SpawnError)} | {"SpawnError"}


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


# ---- strategies ---------------------------------------------------------------------------------
json_scalars = st.none() | st.booleans() | st.integers(-2 ** 70, 2 ** 70) | st.floats() | st.text(max_size=8)
json_values = st.recursive(json_scalars, lambda inner: st.lists(inner, max_size=3)
                           | st.dictionaries(st.text(max_size=5), inner, max_size=3), max_leaves=6)
odd_values = (st.builds(object) | st.binary(max_size=4) | st.sets(st.integers(), max_size=2)
              | st.complex_numbers(allow_nan=False) | st.just(datetime.datetime(2020, 1, 1))
              | st.just(decimal.Decimal("1.5")) | st.just(uuid.UUID(int=1)) | st.just(lambda: None))
any_values = json_values | odd_values
ids = st.none() | st.text(max_size=70) | st.sampled_from(["", " ", "dup-id", "x" * 65, "a\nb", "\x00"])
id_lists = (st.none() | st.lists(st.text(max_size=6) | st.integers(), max_size=3) | st.integers()
            | st.text(max_size=4) | st.builds(object))

#: Signature options a handler may set, with odd values among the plausible ones.
OPTION_VALUES = {
    "queue": st.none() | st.text(max_size=10) | st.integers() | st.just(""),
    "priority": st.none() | st.integers(-10, 300) | st.text(max_size=3),
    "countdown": st.none() | st.floats() | st.text(max_size=3),
    "expires": st.none() | st.integers(-5, 5) | st.text(max_size=3),
    "headers": st.none() | st.dictionaries(st.text(max_size=5), json_values, max_size=2) | st.text(max_size=3)
    | st.lists(st.integers(), max_size=2) | st.integers() | st.dictionaries(st.integers(), st.integers(), max_size=1),
    "task_id": ids,
    "routing_key": st.none() | st.text(max_size=5),
    "exchange": st.none() | st.text(max_size=5),
    DEPENDS_ON_OPTION: id_lists,
    IGNORE_FAILURE_OPTION: id_lists,
    "retry": st.booleans(),
    "link": st.none() | st.just(Signature("fz.child")),
    "time_limit": st.none() | st.integers(-1, 5) | st.text(max_size=2),
}
options = st.lists(st.sampled_from(sorted(OPTION_VALUES)), max_size=2, unique=True).flatmap(
    lambda keys: st.fixed_dictionaries({key: OPTION_VALUES[key] for key in keys}))


@st.composite
def odd_signatures(draw) -> Signature:
    """A signature with one or two odd traits: options, non-JSON arguments, a strange task name."""
    name = draw(st.sampled_from(["fz.child"] * 8 + ["no.such.task", "fz.parent"]) | st.text(max_size=6)
                | st.none() | st.integers())
    args = draw(st.lists(any_values if draw(st.booleans()) else json_values, max_size=3))
    kwargs = draw(st.dictionaries(st.text(max_size=4) | st.integers(), json_values, max_size=2))
    sig = Signature("fz.child", args=args, kwargs=kwargs, options=draw(options))
    sig["task"] = name  # any name, also one that is not a string
    return sig


def _canvas(draw_sigs: list[Signature], kind: str) -> Any:
    if kind == "group":
        return group(draw_sigs)
    if kind == "chain":
        return chain(*draw_sigs) if draw_sigs else chain()
    return chord(draw_sigs, Signature("fz.child"))


good = st.builds(lambda args: Signature("fz.child", args=args), st.lists(json_values, max_size=2))
junk = st.one_of(
    st.builds(lambda sig: dict(sig), good),  # a signature's dict form is not a signature
    st.none(), st.text(max_size=5), st.integers(), st.floats(), st.booleans(), st.binary(max_size=3),
    st.builds(_canvas, st.lists(good, max_size=3), st.sampled_from(["group", "chain", "chord"])),
    st.lists(good, max_size=2),
)
#: Mostly good signatures, often odd ones, sometimes junk.
items = st.one_of(good, good, good, good, odd_signatures(), odd_signatures(), junk)
errors = st.sampled_from([RuntimeError("source went away"), ValueError("bad row"), KeyError("missing"),
                          TypeError("odd"), ZeroDivisionError(), StopIteration(), UnicodeDecodeError(
                              "utf-8", b"\xff", 0, 1, "invalid"), RecursionError()])


class Output:
    """What the handler returns, and the items it holds (a generator cannot be looked at twice)."""

    def __init__(self, value: Any, items: list) -> None:
        self.value = value
        self.items = items

    def __repr__(self) -> str:
        return f"Output({type(self.value).__name__}: {self.items!r})"


def _generator(produced: list, error: BaseException | None) -> Iterator[Any]:
    yield from produced
    if error is not None:
        raise error


@st.composite
def outputs(draw) -> Output:
    produced = draw(st.lists(items, max_size=8))
    form = draw(st.sampled_from(["list"] * 4 + ["tuple", "generator", "generator", "single", "none", "scalar",
                                                "dict", "string", "group"]))
    if form == "list":
        return Output(produced, produced)
    if form == "tuple":
        return Output(tuple(produced), produced)
    if form == "generator":
        return Output(_generator(produced, draw(st.none() | errors)), produced)
    if form == "single":
        item = draw(items)
        return Output(item, [item])
    if form == "none":
        return Output(None, [])
    if form == "scalar":
        return Output(draw(st.integers() | st.floats() | st.booleans() | st.builds(object)), [])
    if form == "dict":
        return Output({str(i): item for i, item in enumerate(produced)}, [])
    if form == "string":
        return Output(draw(st.text(max_size=6)), [])
    sigs = [p for p in produced if isinstance(p, Signature)]
    return Output(group(sigs), sigs)


configs = st.fixed_dictionaries({"handler": st.just("fz.out")}, optional={
    "max_spawn_count": st.integers(0, 12),
    "batch_size": st.integers(1, 3),
    "max_depth": st.integers(1, 3) | st.just(0),
    "operation_id": st.none() | st.text(min_size=1, max_size=70) | st.sampled_from(["op-shared", "op-shared-2"]),
    "inherit_queue": st.booleans(),
    "inherit_priority": st.booleans(),
    "spawn_delay_ms": st.integers(0, 3),
    "fail_fast": st.booleans(),
    "metadata": st.dictionaries(st.text(max_size=4), json_values, max_size=2),
    "on_complete": st.just({"task": "fz.child"}),
    "wait_for_descendants": st.booleans(),
})


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
            assert op["error"] and op["error"].split(":", 1)[0] in DOCUMENTED, op["error"]
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
@given(output=outputs(), config=configs)
def test_handler_outputs_on_sqlite(sqlite_fuzz_rig, output, config):
    check(sqlite_fuzz_rig, output, config)


@settings(FUZZ, max_examples=80)
@given(output=outputs(), config=configs)
def test_handler_outputs_on_postgresql(postgres_fuzz_rig, output, config):
    check(postgres_fuzz_rig, output, config)


@pytest.mark.slow
@settings(FUZZ, max_examples=3000)
@given(output=outputs(), config=configs)
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
