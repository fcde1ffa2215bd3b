"""What a spawn makes of its parent and of each signature a handler yields: rows and messages.

Pure of the store: :class:`ChildRows` turns signatures into the job rows and
dependency edges a spawn records (deterministic ids, inherited priority and
queue, spawn headers, the message to publish), and checks what a handler
got wrong, naming the child.
"""
from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from typing import TYPE_CHECKING, Any, Mapping, TypeGuard, cast

from celery.canvas import Signature
from kombu.utils.json import dumps

from ..config import (DEFAULT_MAX_PAYLOAD_BYTES, DEFAULT_MAX_PAYLOAD_DEPTH, SpawnConfig, check_depth, check_size,
                      nesting_depth, too_deep)
from ..errors import DependencyError, HandlerError, PayloadTooLarge, SpawnConfigError
from ..handlers import ParentJob, SpawnContext, bind_arguments
from ..protocol import (DEPENDS_ON_OPTION, DISPATCHED, HEADER_DEPTH, HEADER_MAX_DEPTH, HEADER_OPERATION, HELD,
                        IGNORE_FAILURE_OPTION, OP_RUNNING, PENDING, SCHEDULED, SPAWN_CONFIG_KWARG, SUCCEEDED,
                        ID_RULE, is_valid_id, request_header)

if TYPE_CHECKING:
    from celery import Celery, Task

    from ..settings import SpawnSettings

#: Above this many children, ``SpawnResult.spawned_job_ids`` pages ids from the store instead of a list.
EAGER_ID_LIMIT = 10_000
#: A spawn publishes the children it just recorded from memory (not read back) up to this many message
#: characters; a bigger spawn pages them from the store, so memory stays bounded.
KEEP_MESSAGE_CHARS = 16 << 20

#: Signature options that are the spawner's business, never published.
_PRIVATE_OPTIONS = {"task_id", "parent_id", "root_id", "group_id", "group_index", "chord",
                    DEPENDS_ON_OPTION, IGNORE_FAILURE_OPTION}


def queue_of_delivery(app: Celery, delivery: Mapping[str, Any]) -> str | None:
    """The queue a message came from: its routing key on the default exchange, else the queue bound so."""
    routing_key = delivery.get("routing_key") or None
    exchange = delivery.get("exchange") or ""
    if not routing_key or not exchange:
        return routing_key
    for queue in app.amqp.queues.values():
        bound = getattr(queue.exchange, "name", None)
        if bound == exchange and queue.routing_key == routing_key:
            return queue.name
    return routing_key if routing_key in app.amqp.queues else None


def parent_from_task(task: Task, result: Any) -> ParentJob:
    request = task.request
    delivery = request.delivery_info or {}
    kwargs = {k: v for k, v in (request.kwargs or {}).items() if k != SPAWN_CONFIG_KWARG}
    try:
        depth = int(request_header(request, HEADER_DEPTH) or 0)
    except (TypeError, ValueError):
        depth = 0
    args = tuple(request.args or ())
    return ParentJob(
        id=cast(str, request.id),
        name=task.name,
        args=args,
        kwargs=kwargs,
        arguments=bind_arguments(task.run, args, kwargs),
        result=result,
        priority=delivery.get("priority"),
        queue=queue_of_delivery(task.app, delivery),
        root_id=cast(str, request.root_id or request.id),
        depth=depth,
        parent_id=request.parent_id,
    )


def inherited_max_depth(task: Task) -> int | None:
    """The ``max_depth`` a spawned task inherited from the spawns above it, if any."""
    raw = request_header(task.request, HEADER_MAX_DEPTH)
    try:
        return int(raw) if raw is not None else None
    except (TypeError, ValueError):
        return None


def requested_handler(task: Task, call_config: Any) -> str:
    """The handler a call asks for, read without validating the rest: the call's ``handler``, else the
    task's, else the task's own name (how handlers are looked up). A refused spawn is recorded under it,
    so that stats can say whose spawns were refused; a name that could not be stored (control
    characters) gives way to the task's name."""
    task_config = getattr(task, "spawn_config", None)
    for source in (call_config, task_config):
        name = source.get("handler") if isinstance(source, Mapping) else getattr(source, "handler", None)
        if _storable_name(name):
            return name[:255]
    task_handler = getattr(task, "spawn_handler", None)
    if _storable_name(task_handler):
        return task_handler[:255]
    return str(task.name)[:255]


def _storable_name(name: Any) -> TypeGuard[str]:
    return isinstance(name, str) and bool(name) and name.isprintable()


def effective_config(settings: SpawnSettings, task: Task, call_config: Any) -> SpawnConfig:
    """Named defaults, then the task's ``spawn_config``/``spawn_handler``, then the call's ``_spawn_config``.

    Each source's nesting is measured before it is parsed, so that none can exhaust the stack.
    """
    ceiling = settings.max_spawn_count_ceiling
    config = SpawnConfig(max_spawn_count=min(settings.default_max_spawn_count, ceiling))
    task_config = getattr(task, "spawn_config", None)
    check_config_depth(f"spawn_config of {task.name}", task_config, settings.max_payload_depth)
    check_config_depth("_spawn_config", call_config, settings.max_payload_depth)
    if task_config is not None:
        config = config.merged(task_config)
    task_handler = getattr(task, "spawn_handler", None)
    if isinstance(task_handler, str) and config.handler is None:
        config = config.merged({"handler": task_handler})
    if call_config is not None:
        config = config.merged(call_config)
    if config.max_spawn_count > ceiling:
        raise SpawnConfigError(
            f"max_spawn_count {config.max_spawn_count} is above this app's ceiling "
            f"spawn_max_spawn_count_ceiling={ceiling}")
    return config


def check_config_depth(what: str, source: Any, limit: int) -> None:
    """Refuse a config (a SpawnConfig or its payload) nesting more than ``limit`` levels, naming the deepest key."""
    values = source.to_dict() if isinstance(source, SpawnConfig) else source
    if nesting_depth(values, limit) <= limit:
        return
    if isinstance(values, Mapping):
        for key, value in values.items():
            if isinstance(key, str) and key.isidentifier() and nesting_depth(value, limit) >= limit:
                what = f"{what}[{key!r}]"
                break
    raise too_deep(what, limit)


@dataclass(frozen=True)
class SharedPart:
    """What siblings with the same task, arguments and options share: all of their row but id and position."""

    key: tuple | None
    task_name: str
    queue: str | None
    priority: Any
    message: str
    depends: list[str]
    ignored: set
    pending_deps: int
    #: The child's own countdown or eta (then ``due``), rather than ``spawn_delay`` times its position.
    delayed: bool
    due: datetime | None


@dataclass
class Siblings:
    """One spawn's memory while its rows are built: the ids it was given, and the last child's shared part."""

    seen: set[str] = field(default_factory=set)
    last: SharedPart | None = None


#: Scalars a sibling key holds as themselves: equal only when JSON writes them alike (floats go by repr).
_EXACT = frozenset({str, int, bool, type(None)})


def sibling_key(name: str, args: Any, kwargs: Any, options: dict) -> tuple | None:
    """A snapshot that equals another child's exactly when both serialise alike, or None (not kept).

    Handlers often yield clones of one signature: their rows differ only in
    ids, so the checks, JSON and routing of the first serve the rest. Only
    flat arguments and options (scalars in a tuple, list or dict) get a key:
    their snapshot is cheap and immune to the handler changing a nested
    value in place afterwards. Types are part of it, since ``1``, ``1.0`` and
    ``True`` are equal in Python and not in JSON.
    """
    parts = (_flat_key(args), _flat_key(kwargs), _flat_key(options))
    if None in parts:
        return None
    return (name, *parts)


def _flat_key(value: Any) -> tuple | None:
    kind = type(value)
    if kind is dict:
        items: Any = value.items()
    elif kind is tuple or kind is list:
        items = enumerate(value)
    else:
        return None
    key: list[Any] = [kind]
    for name, item in items:  # a dict's keys by type too: JSON writes True as "true", 1 as "1"
        item_type = type(item)
        if item_type in _EXACT:
            key.append((type(name), name, item_type, item))
        elif item_type is float:
            key.append((type(name), name, item_type, repr(item)))
        else:
            return None
    return tuple(key)


class ChildRows:
    """Builds the rows of one app's spawns (and remembers how its tasks route)."""

    def __init__(self, app: Celery, max_payload_depth: int = DEFAULT_MAX_PAYLOAD_DEPTH,
                 max_payload_bytes: int = DEFAULT_MAX_PAYLOAD_BYTES) -> None:
        self.app = app
        self.max_payload_depth = max_payload_depth
        self.max_payload_bytes = max_payload_bytes
        self._route_cache: dict[str, str | None] = {}

    def child_row(self, sig: Any, position: int, context: SpawnContext, siblings: Siblings,
                  now: Any, eager: bool = False) -> tuple[dict, list[dict], bool]:
        """One child's job row, its dependency edges, and whether its id was the caller's own.

        ``siblings`` is the spawn's :class:`Siblings` (the ids seen so far and the
        last kind of child); ``eager``: the app's ``task_always_eager``, looked up
        once per spawn by the caller (a Celery setting costs more to read than a
        row to build).
        """
        if not isinstance(sig, Signature) or type(sig) is not Signature:
            kind = type(sig).__name__
            raise HandlerError(f"child #{position} is a {kind}, not a single task signature "
                               "(celery.signature / task.s())")
        name = sig.task
        if not isinstance(name, str) or not name or not name.isprintable():
            raise HandlerError(f"child #{position} has no valid task name: {name!r}")
        options = dict(sig.options)
        task_id = options.pop("task_id", None)
        key = sibling_key(name, sig.args, sig.kwargs, options)
        shared = siblings.last
        if shared is None or key is None or shared.key != key:
            shared = self._shared_part(sig, name, options, key, position, context, now)
            siblings.last = shared
        user_chosen = bool(task_id) and not context.generated(task_id)
        job_id = task_id or context.next_child_id()
        if not is_valid_id(job_id):
            raise HandlerError(f"child #{position} has an invalid task_id {job_id!r}: a spawned child's id must be "
                               f"{ID_RULE}")
        if task_id:  # ids generated here are unique by construction: remember only the others
            if job_id in siblings.seen:
                raise HandlerError(f"child #{position} repeats task id {job_id}")
            siblings.seen.add(job_id)
        depends = shared.depends
        if job_id in depends:
            raise DependencyError(f"child #{position} ({job_id}) depends on itself")
        if depends or eager:
            not_before = None
        elif shared.delayed:
            not_before = shared.due
        else:
            not_before = _staggered(position, context.config, now)
        parent = context.parent
        pending_deps = shared.pending_deps
        row = {
            "id": job_id,
            "parent_id": parent.id,
            "root_id": parent.root_id,
            "operation_id": context.operation_id,
            "position": position,
            "depth": parent.depth + 1,
            "task_name": shared.task_name,
            "queue": shared.queue,
            "priority": shared.priority,
            # Without dependency edges a child is recorded as dispatched: the operation's
            # publish watermark, not a per-row update, says whether its message went out.
            "state": HELD if pending_deps else (PENDING if depends else SCHEDULED if not_before else DISPATCHED),
            "pending_deps": pending_deps,
            "retries": 0,
            "message": shared.message,
            "created_at": now,
            "dispatched_at": None if depends or not_before else now,
            "not_before": not_before,
        }
        edges = [{"job_id": job_id, "depends_on_id": dep, "ignore_failure": dep in shared.ignored,
                  "satisfied": dep == parent.id} for dep in depends]
        return row, edges, user_chosen

    def _shared_part(self, sig: Any, name: str, options: dict, key: tuple | None, position: int,
                     context: SpawnContext, now: Any) -> SharedPart:
        """What a child's row takes from its task, arguments and options (checked, serialised, routed)."""
        where = f"child #{position}"
        parts = (sig.args, sig.kwargs, sig.options)
        limit = self.max_payload_depth
        if nesting_depth(parts, limit + 1) > limit + 1:  # one walk for all three; then name the deep one
            for part, value in zip(("args", "kwargs", "options"), parts):
                check_depth(f"{where} ({name}) {part}", value, limit)
        parent = context.parent
        config = context.config
        depends = [str(d) for d in options.get(DEPENDS_ON_OPTION) or ()]
        ignored = set(options.get(IGNORE_FAILURE_OPTION) or ())
        publish = {k: v for k, v in options.items() if k not in _PRIVATE_OPTIONS}
        if config.inherit_priority and parent.priority is not None and publish.get("priority") is None:
            publish["priority"] = parent.priority
        if config.inherit_queue and parent.queue and not publish.get("queue"):
            publish["queue"] = parent.queue
        delayed = "countdown" in publish or "eta" in publish
        try:
            due = due_time(publish, position, config, now) if delayed else None
        except (TypeError, ValueError, OverflowError) as exc:
            raise HandlerError(f"{where} ({name}) has an unusable countdown or eta: {exc}") from None
        headers = dict(publish.get("headers") or {})
        headers[HEADER_OPERATION] = context.operation_id
        headers[HEADER_DEPTH] = parent.depth + 1
        headers[HEADER_MAX_DEPTH] = min(config.max_depth, context.inherited_max_depth or config.max_depth)
        if context.trace_headers:
            headers.update(context.trace_headers)
        publish["headers"] = headers
        try:
            message = dumps({"task": name, "args": list(sig.args or ()), "kwargs": dict(sig.kwargs or {}),
                             "options": publish})
        except (TypeError, ValueError) as exc:
            raise HandlerError(f"{where} ({name}) cannot be serialised to JSON: {exc}") from None
        except RecursionError:
            raise PayloadTooLarge(f"{where} ({name}) nests too deeply to be serialised to JSON") from None
        check_size(f"{where} ({name}) message", message, self.max_payload_bytes)
        return SharedPart(key=key, task_name=name[:255], queue=self.queue_of(name, publish),
                          priority=publish.get("priority"), message=message, depends=depends, ignored=ignored,
                          pending_deps=sum(1 for d in depends if d != parent.id), delayed=delayed, due=due)

    def queue_of(self, task_name: str, options: dict) -> str | None:
        queue = options.get("queue")
        if queue:
            return str(getattr(queue, "name", queue))[:255]
        if task_name not in self._route_cache:
            try:
                routed = self.app.amqp.router.route({}, task_name)
                routed_queue = routed.get("queue")
                self._route_cache[task_name] = getattr(routed_queue, "name", routed_queue)
            except Exception:
                self._route_cache[task_name] = self.app.conf.task_default_queue
        return self._route_cache[task_name]


def due_time(publish: dict, position: int, config: SpawnConfig, now: datetime) -> datetime | None:
    """When a child without dependencies may start, if later than now; takes its delay out of ``publish``.

    A delay the store holds (the child is recorded ``scheduled`` and a worker
    publishes it when due) survives worker restarts and never waits, unacknowledged,
    past a broker's visibility timeout. It is the child's own ``countdown`` or
    ``eta`` if it has one, else ``spawn_delay`` times its position. In eager
    mode nothing waits: the options stay as Celery would ignore them.
    """
    if "countdown" not in publish and "eta" not in publish:
        return _staggered(position, config, now)
    countdown, eta = publish.pop("countdown", None), publish.pop("eta", None)
    due = _eta_time(eta) if eta is not None else None
    if countdown is not None:
        due = now + timedelta(seconds=float(countdown))
    return due if due is not None and due > now else None


def _staggered(position: int, config: SpawnConfig, now: datetime) -> datetime | None:
    """``spawn_delay`` times ``position`` from now, for a child with no delay of its own (None: no delay)."""
    if not config.spawn_delay_ms or not position:
        return None
    due = now + timedelta(milliseconds=position * config.spawn_delay_ms)
    return due if due > now else None


def _eta_time(eta: Any) -> datetime | None:
    """An ``eta`` option (a datetime, or its ISO form) as naive UTC, like the store's timestamps."""
    if isinstance(eta, str):
        eta = datetime.fromisoformat(eta)
    if not isinstance(eta, datetime):
        raise TypeError(f"eta must be a datetime or an ISO 8601 string, not {type(eta).__name__}")
    if eta.tzinfo is not None:
        eta = eta.astimezone(timezone.utc).replace(tzinfo=None)
    return eta


def operation_row(parent: ParentJob, config: SpawnConfig | None, operation_id: str,
                  handler_name: str | None, now: Any, trace_headers: dict | None = None) -> dict:
    """The operation row a spawn records (or, refused, records as failed).

    ``trace_headers`` (the parent's trace context) go into the stored
    ``on_complete`` signature's headers, so the callback joins the parent's trace.
    """
    on_complete = config.on_complete if config is not None else None
    if on_complete and trace_headers:
        options = dict(on_complete.get("options") or {})
        options["headers"] = {**(options.get("headers") or {}), **trace_headers}
        on_complete = {**on_complete, "options": options}
    return {
        "id": operation_id,
        "label": config.operation_id if config is not None else None,
        "parent_id": parent.id,
        "root_id": parent.root_id,
        "parent_task": parent.name[:255],
        "handler": (handler_name or "")[:255] or None,
        "queue": parent.queue,
        "depth": parent.depth,
        "state": OP_RUNNING,
        "total": 0,
        "published_through": -1,
        "config": dumps(config.to_dict()) if config is not None else None,
        "error": None,
        "on_complete": dumps(on_complete) if on_complete else None,
        "wait_for_descendants": bool(config and config.wait_for_descendants),
        "fail_fast": bool(config and config.fail_fast),
        "completed": False,
        "created_at": now,
        "updated_at": now,
        "finished_at": None,
    }


def root_row(parent: ParentJob, now: Any) -> dict:
    """The parent's own row, for a parent that was not itself spawned."""
    return {
        "id": parent.id,
        "parent_id": None,
        "root_id": parent.root_id,
        "operation_id": None,
        "position": 0,
        "depth": parent.depth,
        "task_name": parent.name[:255],
        "queue": parent.queue,
        "priority": parent.priority,
        "state": SUCCEEDED,
        "pending_deps": 0,
        "retries": 0,
        "message": None,
        "created_at": now,
        "started_at": now,
        "finished_at": now,
    }


class Recorded:
    """What a spawn keeps of the children it records, while that is small: their ids, and the rows it
    publishes itself (recorded ``dispatched``), so that neither is read back from the store."""

    def __init__(self) -> None:
        self.ids: list[str] | None = []
        self.publishable: list[dict] | None = []
        self._chars = 0

    def add(self, row: dict) -> None:
        if self.ids is not None:
            self.ids.append(row["id"])
            if len(self.ids) > EAGER_ID_LIMIT:
                self.ids = None
        if self.publishable is not None and row["state"] == DISPATCHED:
            self.publishable.append(row)
            self._chars += len(row["message"])
            if self._chars > KEEP_MESSAGE_CHARS or len(self.publishable) > EAGER_ID_LIMIT:
                self.publishable = None


def describe(exc: BaseException) -> str:
    text = str(exc)
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def find_cycle(edges: list[tuple[str, str]]) -> list[str] | None:
    """A cycle in the "job depends on" graph, or None (iterative DFS)."""
    graph: dict[str, list[str]] = defaultdict(list)
    for job, dep in edges:
        graph[job].append(dep)
    state: dict[str, int] = {}
    for start in list(graph):
        if state.get(start):
            continue
        stack = [(start, iter(graph[start]))]
        path = [start]
        state[start] = 1
        while stack:
            node, children = stack[-1]
            for nxt in children:
                if state.get(nxt) == 1:
                    return path[path.index(nxt):] + [nxt]
                if not state.get(nxt):
                    state[nxt] = 1
                    stack.append((nxt, iter(graph.get(nxt, ()))))
                    path.append(nxt)
                    break
            else:
                state[node] = 2
                stack.pop()
                path.pop()
    return None
