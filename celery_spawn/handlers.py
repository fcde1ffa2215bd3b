"""Extension points: SpawnHandler (what to spawn), SpawnContext (what it sees), SpawnManager (the registry)."""
from __future__ import annotations

import dataclasses
import hashlib
import inspect
import uuid
from datetime import datetime
from typing import TYPE_CHECKING, Any, Callable, Iterable, Iterator, Sequence, cast

from celery.canvas import Signature

from .config import SpawnConfig
from .errors import HandlerError, HandlerNotFound

if TYPE_CHECKING:
    from celery import Celery

#: Namespace of deterministic child ids: uuid5(namespace, "<operation id>/<sequence>").
CHILD_ID_NAMESPACE = uuid.UUID("6f1c2b8e-5a43-4d0e-9a57-2f1d6c3b9e10")


def child_id(operation_id: str, sequence: int) -> str:
    """The deterministic task id of the ``sequence``-th child of an operation.

    Derived from the operation id, not its label (a later parent's spawn with
    a label runs as ``label~hash``): see :func:`celery_spawn.resolve_operation`.
    """
    return ChildIds(operation_id).at(sequence)


class ChildIds:
    """The ids :func:`child_id` gives an operation's children, the operation's part hashed once.

    ``uuid5(CHILD_ID_NAMESPACE, f"{operation_id}/{sequence}")`` as a string,
    without building a ``UUID`` per child (a spawn of 10,000 children spent
    more on those objects than on the hashing).
    """

    __slots__ = ("_prefix",)

    def __init__(self, operation_id: str) -> None:
        self._prefix = hashlib.sha1(CHILD_ID_NAMESPACE.bytes, usedforsecurity=False)
        self._prefix.update(f"{operation_id}/".encode())

    def at(self, sequence: int) -> str:
        digest = self._prefix.copy()
        digest.update(str(sequence).encode())
        raw = bytearray(digest.digest()[:16])
        raw[6] = (raw[6] & 0x0F) | 0x50  # version 5
        raw[8] = (raw[8] & 0x3F) | 0x80  # the RFC 4122 variant
        text = raw.hex()
        return f"{text[:8]}-{text[8:12]}-{text[12:16]}-{text[16:20]}-{text[20:]}"


def default_operation_id(parent_id: str) -> str:
    """The operation id of a parent's spawn when the config names none."""
    return str(uuid.uuid5(CHILD_ID_NAMESPACE, f"op/{parent_id}"))


def labelled_operation_id(label: str, parent_id: str) -> str:
    """The id of a parent's spawn under a label another parent's spawn already holds.

    ``label~hash``: still readable as the label, unique per parent, and the
    same on every redelivery of that parent (at most 64 characters).
    """
    digest = uuid.uuid5(CHILD_ID_NAMESPACE, f"op/{label}/{parent_id}").hex[:8]
    return f"{label[:55]}~{digest}"


@dataclasses.dataclass(frozen=True)
class ParentJob:
    """The finished parent task, as a handler sees it.

    ``args`` and ``kwargs`` are the call as it was made; ``arguments`` is the
    same call bound to the task's parameter names, defaults included, so a
    handler reads ``parent.arguments["dataset_id"]`` whether the caller passed
    it by position or by name.
    """

    id: str
    name: str
    args: tuple[Any, ...]
    kwargs: dict[str, Any]
    result: Any
    priority: int | None
    queue: str | None
    root_id: str
    depth: int
    parent_id: str | None = None
    arguments: dict[str, Any] = dataclasses.field(default_factory=dict)


def bind_arguments(function: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> dict[str, Any]:
    """``args`` and ``kwargs`` bound to ``function``'s parameter names, defaults applied.

    Keyword arguments gathered by a ``**kwargs`` parameter appear under their
    own names. A call that does not fit the signature (or a function without
    one) gives its keyword arguments alone.
    """
    try:
        bound = inspect.signature(function).bind(*args, **kwargs)
    except (TypeError, ValueError):
        return dict(kwargs)
    bound.apply_defaults()
    arguments: dict[str, Any] = {}
    for name, value in bound.arguments.items():
        if bound.signature.parameters[name].kind is inspect.Parameter.VAR_KEYWORD:
            arguments.update(value)
        else:
            arguments[name] = value
    return arguments


@dataclasses.dataclass(frozen=True)
class SpawnResult:
    """What a spawn produced: passed to ``on_spawn_complete`` and returned by the spawner."""

    parent_job_id: str
    spawned_job_ids: Sequence[str]
    spawned_at: datetime
    operation_id: str

    def to_dict(self) -> dict[str, Any]:
        return {
            "parent_job_id": self.parent_job_id,
            "spawned_job_ids": list(self.spawned_job_ids),
            "spawned_at": self.spawned_at.isoformat(),
            "operation_id": self.operation_id,
        }


class SpawnContext:
    """What a handler's ``spawn_jobs`` receives.

    ``freeze(sig)`` gives a child its deterministic id before the handler
    returns it, so that a later sibling can ``depends_on`` it.
    """

    def __init__(self, parent: ParentJob, config: SpawnConfig, app: Celery, operation_id: str) -> None:
        self.parent = parent
        self.config = config
        self.app = app
        self.operation_id = operation_id
        self._sequence = 0
        self._ids = ChildIds(operation_id)
        self._frozen: set[str] = set()
        #: The strictest max_depth of the spawns above the parent (None at a root).
        self.inherited_max_depth: int | None = None
        #: The parent's trace context as message headers, stored with each child (``inherit_trace_context``).
        self.trace_headers: dict[str, Any] | None = None

    def next_child_id(self) -> str:
        job_id = self._ids.at(self._sequence)
        self._sequence += 1
        return job_id

    def generated(self, job_id: str) -> bool:
        """Whether ``freeze`` handed out ``job_id`` (deterministic, so never taken by another spawn)."""
        return job_id in self._frozen

    def freeze(self, sig: Signature) -> str:
        """Give ``sig`` its deterministic task id now and return it."""
        if not isinstance(sig, Signature):
            raise HandlerError(f"freeze() takes a Celery signature, not {type(sig).__name__}")
        existing = sig.options.get("task_id")
        if existing:
            return cast(str, existing)
        job_id = self.next_child_id()
        sig.set(task_id=job_id)
        self._frozen.add(job_id)
        return job_id

    @property
    def metadata(self) -> dict[str, Any]:
        return self.config.metadata or {}


class SpawnHandler:
    """Decides which children a finished parent spawns. Override ``spawn_jobs``."""

    def validate_spawn(self, parent: ParentJob, config: SpawnConfig) -> None:
        """Raise to refuse the spawn before any child is generated."""

    def spawn_jobs(self, context: SpawnContext) -> Iterable[Signature]:
        """Return (or yield) the child signatures."""
        return ()

    def on_spawn_complete(self, result: SpawnResult) -> None:
        """Called once the children are recorded and dispatched."""


class FunctionHandler(SpawnHandler):
    """Adapts a plain function ``fn(context) -> Iterable[Signature]`` into a handler."""

    def __init__(self, fn: Callable[[SpawnContext], Iterable[Signature]]) -> None:
        self.fn = fn
        self.__doc__ = fn.__doc__

    def spawn_jobs(self, context: SpawnContext) -> Iterable[Signature]:
        return self.fn(context)

    def __repr__(self) -> str:
        return f"FunctionHandler({getattr(self.fn, '__qualname__', self.fn)!r})"


class SpawnManager:
    """The registry of spawn handlers, by name."""

    def __init__(self) -> None:
        self._handlers: dict[str, SpawnHandler] = {}

    def register_handler(self, name: str,
                         handler: SpawnHandler | type[SpawnHandler] | Callable[..., Any] | None = None) -> Any:
        """Register ``handler`` under ``name``; a name may be registered once.

        Without ``handler`` it is a decorator: ``@manager.register_handler("name")``.
        """
        if handler is None:
            return self.handler(name)
        if not isinstance(name, str) or not name.strip():
            raise ValueError(f"handler name must be a non-empty string, not {name!r}")
        handler = as_handler(handler)
        if name in self._handlers and self._handlers[name] is not handler:
            raise ValueError(f"a spawn handler is already registered as {name!r}")
        self._handlers[name] = handler
        return handler

    def handler(self, name: str) -> Callable[..., Any]:
        """Decorator form: ``@manager.handler("name")`` on a function or SpawnHandler class."""
        def decorate(obj: Any) -> Any:
            self.register_handler(name, obj)
            return obj
        return decorate

    def unregister_handler(self, name: str) -> None:
        self._handlers.pop(name, None)

    def has_handler(self, name: str) -> bool:
        return name in self._handlers

    def get_handler(self, name: str) -> SpawnHandler:
        try:
            return self._handlers[name]
        except KeyError:
            known = ", ".join(sorted(self._handlers)) or "none"
            raise HandlerNotFound(f"no spawn handler registered as {name!r} (registered: {known})") from None

    def registered_types(self) -> list[str]:
        return sorted(self._handlers)

    def __iter__(self) -> Iterator[str]:
        return iter(self.registered_types())

    def __len__(self) -> int:
        return len(self._handlers)


def as_handler(obj: Any) -> SpawnHandler:
    if isinstance(obj, SpawnHandler):
        return obj
    if isinstance(obj, type) and issubclass(obj, SpawnHandler):
        return obj()
    if callable(obj):
        return FunctionHandler(obj)
    raise TypeError(f"a spawn handler must be a SpawnHandler, a SpawnHandler class or a function, not {obj!r}")
