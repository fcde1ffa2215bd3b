"""Hypothesis strategies of the fuzz tests, shared by their eager runs and their real-worker variants.

Two families: ``_spawn_config`` values (:func:`configs`) and what a handler
returns (:func:`outputs`, with the configs it runs under, :data:`output_configs`).
A real worker gets a handler output as :func:`pack_output` text in the
parent's kwargs, and its ``fz.out`` handler returns :func:`unpack_output`.
Deeply nested values (:data:`deep_values`) are among the arguments, metadata
and headers, so every family also throws payloads past the depth limits.
"""
from __future__ import annotations

import base64
import datetime
import decimal
import pickle
import sys
import types
import uuid
from typing import Any, Callable, Iterator

from celery import chain, chord, group
from celery.canvas import Signature
from hypothesis import strategies as st

from celery_spawn import SpawnConfig, SpawnError
from celery_spawn.config import CONFIG_KEYS
from celery_spawn.protocol import DEPENDS_ON_OPTION, IGNORE_FAILURE_OPTION

#: The task names of the real-worker variants (``tests.reliability.app`` registers them).
FUZZ_PARENT = "fz.parent"
FUZZ_CHILD = "fz.child"


def _subclasses(cls: type) -> set[type]:
    found = set()
    for sub in cls.__subclasses__():
        found |= {sub} | _subclasses(sub)
    return found


#: The documented error names a failed operation's error may start with.
SPAWN_ERROR_NAMES = {cls.__name__ for cls in _subclasses(SpawnError)} | {"SpawnError"}


def nested(levels: int, leaf: Any = "leaf", kind: str = "dict") -> Any:
    """``levels`` dicts (or lists), one inside the other."""
    value = leaf
    for _ in range(levels):
        value = {"k": value} if kind == "dict" else [value]
    return value


#: Nesting around the limits: the default limit, where Celery's pool stops pickling, where JSON stops.
deep_values = st.builds(nested, st.sampled_from([63, 64, 65, 200, 480, 600, 1_000, 5_000]),
                        st.just("leaf"), st.sampled_from(["dict", "list"]))
#: Nesting a worker can still receive in a message (Celery's prefork pool fails to pickle about 480 levels).
deliverable_deep_values = st.builds(nested, st.sampled_from([63, 64, 65, 200]), st.just("leaf"),
                                    st.sampled_from(["dict", "list"]))


# ---- _spawn_config values ------------------------------------------------------------------------
json_scalars = (st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=12)
                | st.sampled_from([0, -1, 1, 2 ** 31, 2 ** 63, 10 ** 30, "", " ", "\x00", "fan"]))
json_values = st.recursive(json_scalars, lambda inner: st.lists(inner, max_size=3)
                           | st.dictionaries(st.text(max_size=6), inner, max_size=3), max_leaves=8)
python_values = (json_values | st.binary(max_size=4) | st.sets(st.integers(), max_size=2)
                 | st.tuples(st.integers()) | st.complex_numbers() | st.builds(object)
                 | st.builds(lambda: types.SimpleNamespace(handler="fan")))

#: The handlers a fuzzed config may name, besides the parent's own name.
HANDLERS = ["fan", "stream", "halfway"]


def plausible(parent: str, child: str, deep: st.SearchStrategy = deep_values) -> dict[str, st.SearchStrategy]:
    """A strategy per config key, of plausible and borderline values."""
    return {
        "handler": st.sampled_from(HANDLERS + [parent, "missing"]) | st.text(max_size=8),
        "max_spawn_count": st.integers(-2, 6) | st.sampled_from([10 ** 7, 10 ** 7 + 1, 2 ** 64]),
        "operation_id": st.none() | st.text(max_size=70),
        "inherit_priority": st.booleans(),
        "inherit_queue": st.booleans(),
        "spawn_delay_ms": st.integers(-1, 20),
        "batch_size": st.integers(-1, 4),
        "metadata": st.none() | st.dictionaries(st.text(max_size=5), st.one_of(json_values, json_values, deep),
                                                max_size=3),
        "max_depth": st.integers(-1, 3),
        "on_complete": st.none() | st.fixed_dictionaries({"task": st.sampled_from([child, "missing.task"])}),
        "wait_for_descendants": st.booleans(),
        "fail_fast": st.booleans(),
        "inherit_trace_context": st.booleans() | st.sampled_from([0, 1, "true", None]),
    }


assert set(plausible("p", "c")) == set(CONFIG_KEYS), "a new SpawnConfig key needs a strategy here"


def configs(values: st.SearchStrategy, parent: str = "unit.parent", child: str = "unit.child",
            deep: st.SearchStrategy = deep_values) -> st.SearchStrategy:
    """Mostly dicts of known keys (plausible or junk values) plus stray keys; sometimes not a dict at all."""
    keys = plausible(parent, child, deep)
    plausible_ = st.fixed_dictionaries({}, optional={key: keys[key] for key in sorted(CONFIG_KEYS)})
    junk = st.fixed_dictionaries({}, optional={key: keys[key] | values for key in sorted(CONFIG_KEYS)})
    stray = st.dictionaries(st.text(max_size=8) | st.integers() | st.none(), values, min_size=1, max_size=2)
    mixed = st.builds(lambda a, b: {**a, **b}, plausible_, stray)
    wrapped = plausible_.map(types.MappingProxyType)
    configs_ = st.builds(lambda handler, count: SpawnConfig(handler=handler, max_spawn_count=count),
                         st.sampled_from(HANDLERS + [parent]), st.integers(0, 5))
    return st.one_of(plausible_, plausible_, plausible_, junk, mixed, wrapped, configs_, values, deep)


def fuzz_handlers(sig: Callable[..., Signature], parent: str) -> dict[str, Callable]:
    """The handlers fuzzed configs may name (the parent's own name included), making children with ``sig``."""
    def stream(context):
        for i in range(4):
            yield sig(i)

    def halfway(context):
        yield sig(0)
        yield sig(1)
        raise RuntimeError("source went away")

    return {"fan": lambda context: [sig(i) for i in range(3)], "stream": stream, "halfway": halfway,
            parent: lambda context: [sig("own")]}


# ---- handler outputs -----------------------------------------------------------------------------
argument_scalars = st.none() | st.booleans() | st.integers(-2 ** 70, 2 ** 70) | st.floats() | st.text(max_size=8)
argument_values = st.recursive(argument_scalars, lambda inner: st.lists(inner, max_size=3)
                               | st.dictionaries(st.text(max_size=5), inner, max_size=3), max_leaves=6)
odd_values = (st.builds(object) | st.binary(max_size=4) | st.sets(st.integers(), max_size=2)
              | st.complex_numbers(allow_nan=False) | st.just(datetime.datetime(2020, 1, 1))
              | st.just(decimal.Decimal("1.5")) | st.just(uuid.UUID(int=1)) | st.just(lambda: None))
any_values = argument_values | odd_values
ids = st.none() | st.text(max_size=70) | st.sampled_from(["", " ", "dup-id", "x" * 65, "a\nb", "\x00"])
id_lists = (st.none() | st.lists(st.text(max_size=6) | st.integers(), max_size=3) | st.integers()
            | st.text(max_size=4) | st.builds(object))

#: Signature options a handler may set, with odd values among the plausible ones.
OPTION_VALUES = {
    "queue": st.none() | st.text(max_size=10) | st.integers() | st.just(""),
    "priority": st.none() | st.integers(-10, 300) | st.text(max_size=3),
    "countdown": st.none() | st.floats() | st.text(max_size=3),
    "expires": st.none() | st.integers(-5, 5) | st.text(max_size=3),
    "headers": st.none() | st.dictionaries(st.text(max_size=5), st.one_of(argument_values, argument_values,
                                                                          deep_values), max_size=2)
    | st.text(max_size=3) | st.lists(st.integers(), max_size=2) | st.integers()
    | st.dictionaries(st.integers(), st.integers(), max_size=1),
    "task_id": ids,
    "routing_key": st.none() | st.text(max_size=5),
    "exchange": st.none() | st.text(max_size=5),
    DEPENDS_ON_OPTION: id_lists,
    IGNORE_FAILURE_OPTION: id_lists,
    "retry": st.booleans(),
    "link": st.none() | st.just(Signature(FUZZ_CHILD)),
    "time_limit": st.none() | st.integers(-1, 5) | st.text(max_size=2),
}
#: Options that send a message somewhere else than the worker's queue; a real broker keeps what they create.
ROUTING_OPTIONS = ("queue", "routing_key", "exchange")


def options(routable: bool = True) -> st.SearchStrategy:
    names = sorted(OPTION_VALUES) if routable else sorted(set(OPTION_VALUES) - set(ROUTING_OPTIONS))
    return st.lists(st.sampled_from(names), max_size=2, unique=True).flatmap(
        lambda keys: st.fixed_dictionaries({key: OPTION_VALUES[key] for key in keys}))


@st.composite
def odd_signatures(draw, routable: bool = True) -> Signature:
    """A signature with one or two odd traits: options, non-JSON or deep arguments, a strange task name."""
    name = draw(st.sampled_from([FUZZ_CHILD] * 8 + ["no.such.task", FUZZ_PARENT]) | st.text(max_size=6)
                | st.none() | st.integers())
    args = draw(st.lists(any_values if draw(st.booleans()) else argument_values | deep_values, max_size=3))
    kwargs = draw(st.dictionaries(st.text(max_size=4) | st.integers(), st.one_of(argument_values, argument_values,
                                                                                 deep_values), max_size=2))
    sig = Signature(FUZZ_CHILD, args=args, kwargs=kwargs, options=draw(options(routable)))
    sig["task"] = name  # any name, also one that is not a string
    return sig


def _canvas(draw_sigs: list[Signature], kind: str) -> Any:
    if kind == "group":
        return group(draw_sigs)
    if kind == "chain":
        return chain(*draw_sigs) if draw_sigs else chain()
    return chord(draw_sigs, Signature(FUZZ_CHILD))


good = st.builds(lambda args: Signature(FUZZ_CHILD, args=args), st.lists(argument_values, max_size=2))
junk = st.one_of(
    st.builds(lambda sig: dict(sig), good),  # a signature's dict form is not a signature
    st.none(), st.text(max_size=5), st.integers(), st.floats(), st.booleans(), st.binary(max_size=3),
    st.builds(_canvas, st.lists(good, max_size=3), st.sampled_from(["group", "chain", "chord"])),
    st.lists(good, max_size=2),
)


def items(routable: bool = True) -> st.SearchStrategy:
    """Mostly good signatures, often odd ones, sometimes junk."""
    return st.one_of(good, good, good, good, odd_signatures(routable), odd_signatures(routable), junk)


errors = st.sampled_from([RuntimeError("source went away"), ValueError("bad row"), KeyError("missing"),
                          TypeError("odd"), ZeroDivisionError(), StopIteration(), UnicodeDecodeError(
                              "utf-8", b"\xff", 0, 1, "invalid"), RecursionError()])


class Output:
    """What the handler returns, and the items it holds (a generator cannot be looked at twice)."""

    def __init__(self, value: Any, items: list, form: str = "list", error: BaseException | None = None) -> None:
        self.value = value
        self.items = items
        self.form = form
        self.error = error

    def __repr__(self) -> str:
        return f"Output({type(self.value).__name__}: {self.items!r})"


def generate(produced: list, error: BaseException | None) -> Iterator[Any]:
    yield from produced
    if error is not None:
        raise error


@st.composite
def outputs(draw, routable: bool = True) -> Output:
    item = items(routable)
    produced = draw(st.lists(item, max_size=8))
    form = draw(st.sampled_from(["list"] * 4 + ["tuple", "generator", "generator", "single", "none", "scalar",
                                                "dict", "string", "group"]))
    if form == "list":
        return Output(produced, produced)
    if form == "tuple":
        return Output(tuple(produced), produced)
    if form == "generator":
        error = draw(st.none() | errors)
        return Output(generate(produced, error), produced, form, error)
    if form == "single":
        one = draw(item)
        return Output(one, [one])
    if form == "none":
        return Output(None, [])
    if form == "scalar":
        return Output(draw(st.integers() | st.floats() | st.booleans() | st.builds(object)), [])
    if form == "dict":
        return Output({str(i): one for i, one in enumerate(produced)}, [])
    if form == "string":
        return Output(draw(st.text(max_size=6)), [])
    sigs = [p for p in produced if isinstance(p, Signature)]
    return Output(group(sigs), sigs)


def output_configs(deep: st.SearchStrategy = deep_values) -> st.SearchStrategy:
    """The configs a handler output runs under: the ``fz.out`` handler, any other key optional."""
    return st.fixed_dictionaries({"handler": st.just("fz.out")}, optional={
        "max_spawn_count": st.integers(0, 12),
        "batch_size": st.integers(1, 3),
        "max_depth": st.integers(1, 3) | st.just(0),
        "operation_id": st.none() | st.text(min_size=1, max_size=70) | st.sampled_from(["op-shared", "op-shared-2"]),
        "inherit_queue": st.booleans(),
        "inherit_priority": st.booleans(),
        "spawn_delay_ms": st.integers(0, 3),
        "fail_fast": st.booleans(),
        "metadata": st.dictionaries(st.text(max_size=4), st.one_of(argument_values, argument_values, deep),
                                    max_size=2),
        "on_complete": st.just({"task": FUZZ_CHILD}),
        "wait_for_descendants": st.booleans(),
    })


def pack_output(output: Output) -> str | None:
    """The output as text a message can carry to a worker (a generator as its items and error); None when
    something in it cannot be pickled."""
    value = output.items if output.form == "generator" else output.value
    limit = sys.getrecursionlimit()
    sys.setrecursionlimit(max(limit, 20_000))  # pickling recurses once per level; deep_values go to 5,000
    try:
        return base64.b64encode(pickle.dumps((output.form, value, output.error))).decode()
    except (pickle.PicklingError, TypeError, AttributeError):
        return None
    finally:
        sys.setrecursionlimit(limit)


def unpack_output(text: str) -> Any:
    """What the handler returns for :func:`pack_output` text."""
    form, value, error = pickle.loads(base64.b64decode(text))
    return generate(value, error) if form == "generator" else value
