"""Helpers for testing spawn handlers: a fake context, eager and worker runs, and tree assertions.

They need no pytest; :mod:`celery_spawn.contrib.pytest` provides the fixtures
(``spawn_store``, ``spawn_app``) they are usually used with. See
``docs/testing.md``.
"""
from __future__ import annotations

import difflib
import time
from typing import TYPE_CHECKING, Any, Iterator, Mapping, Sequence

from ..app import get_state
from ..config import SpawnConfig
from ..engine.writebehind import flush_all
from ..handlers import ParentJob, SpawnContext, bind_arguments, default_operation_id
from ..protocol import FINAL_JOB_STATES
from ..store import SpawnStore
from ..store import queries

if TYPE_CHECKING:
    from celery import Celery, Task
    from celery.result import AsyncResult, EagerResult

__all__ = ["assert_tree", "fake_context", "run_spawn_eagerly", "spawn_and_wait", "spawn_tree", "tree_outline"]

#: Seconds :func:`spawn_and_wait` waits for a tree to finish by default.
DEFAULT_TIMEOUT = 30.0
#: Seconds between two looks at the store while waiting.
POLL_INTERVAL = 0.05


def fake_context(result: Any = None, *, args: Sequence[Any] = (), kwargs: Mapping[str, Any] | None = None,
                 task: Any = None, name: str = "tests.parent", job_id: str = "parent-1", app: Celery | None = None,
                 config: SpawnConfig | None = None, **metadata: Any) -> SpawnContext:
    """A :class:`SpawnContext` for calling a handler directly, with no broker, store or worker.

    ``result``, ``args`` and ``kwargs`` describe the finished parent; with
    ``task`` (the parent task or its function) ``parent.arguments`` binds them
    to its parameter names, as a real spawn does. ``metadata`` becomes the
    spawn config's metadata unless ``config`` is given.
    """
    kwargs = dict(kwargs or {})
    function = getattr(task, "run", task)
    if app is None:
        from celery import Celery

        app = getattr(task, "app", None) or Celery("spawn_fake", set_as_current=False)
    parent = ParentJob(id=job_id, name=getattr(task, "name", None) or name, args=tuple(args), kwargs=kwargs,
                       result=result, priority=None, queue=None, root_id=job_id, depth=0,
                       arguments=bind_arguments(function, tuple(args), kwargs) if function else dict(kwargs))
    config = config if config is not None else SpawnConfig(metadata=metadata or None)
    return SpawnContext(parent, config, app, config.operation_id or default_operation_id(job_id))


def run_spawn_eagerly(task: Task, *args: Any, **kwargs: Any) -> EagerResult:
    """Run ``task`` in this thread with its whole tree (children run inline, as ``task_always_eager`` does).

    The app's ``task_always_eager`` is set for the call and restored after it
    (a failing child is recorded as failed, as on a worker, unless the app sets
    ``task_eager_propagates``); tracking events still queued (write-behind,
    after a ``celery_worker`` ran in this process) are written before it
    returns. Returns the parent's ``EagerResult``.
    """
    conf = task.app.conf
    saved = conf.task_always_eager
    conf.task_always_eager = True
    try:
        result = task.apply(args=args, kwargs=kwargs)
        flush_all()
        return result
    finally:
        conf.task_always_eager = saved


def spawn_and_wait(task: Task, *args: Any, timeout: float = DEFAULT_TIMEOUT, **kwargs: Any) -> AsyncResult:
    """Send ``task`` to the broker and wait until the tree below it has finished (for a running worker).

    Finished means: the parent is recorded, every job of its tree is in a
    final state and every operation of the tree is completed. Raises
    ``TimeoutError`` with the tree as it stood after ``timeout`` seconds (also
    when the parent spawns nothing: a task that is no ``SpawnTask``, or a call
    without a handler, is never recorded).
    """
    result = task.apply_async(args=args, kwargs=kwargs)
    store = get_state(task.app).store
    deadline = time.monotonic() + timeout
    while True:
        tree = spawn_tree(store, result.id)
        if tree is not None and _finished(store, tree):
            return result
        if time.monotonic() > deadline:
            shown = "\n".join(tree_outline(tree)) if tree is not None else "(nothing recorded)"
            raise TimeoutError(f"the tree of {task.name} {result.id} did not finish in {timeout}s:\n{shown}")
        time.sleep(POLL_INTERVAL)


def _finished(store: SpawnStore, tree: dict) -> bool:
    nodes = list(_walk(tree))
    if any(node["state"] not in FINAL_JOB_STATES for node in nodes):
        return False
    with store.read() as conn:
        for node in nodes:
            if node["children"]:
                for operation_id in {child["operation_id"] for child in node["children"]}:
                    operation = queries.get_operation(conn, operation_id, children_limit=1)
                    if operation is None or not operation["completed"]:
                        return False
    return True


def _walk(node: dict) -> Iterator[dict]:
    yield node
    for child in node["children"]:
        yield from _walk(child)


def _store_of(app_or_store: Celery | SpawnStore) -> SpawnStore:
    return app_or_store if isinstance(app_or_store, SpawnStore) else get_state(app_or_store).store


def spawn_tree(app_or_store: Celery | SpawnStore, root_id: str) -> dict | None:
    """The recorded tree below ``root_id`` (nodes with ``task_name``, ``state``, ``children``...), or None."""
    with _store_of(app_or_store).read() as conn:
        return queries.spawn_tree(conn, root_id)


def tree_outline(tree: Mapping[str, Any], fields: Mapping[str, Any] | None = None) -> list[str]:
    """``tree`` as indented lines of ``task_name state``; with ``fields`` (an expected tree) only what it names."""
    lines: list[str] = []

    def show(node: Mapping[str, Any], expected: Mapping[str, Any] | None, indent: str) -> None:
        parts = [str(node.get("task", node.get("task_name")))]
        if expected is None or "state" in expected:
            parts.append(str(node.get("state")))
        lines.append(indent + " ".join(parts))
        children = node.get("children") or []
        wanted = expected.get("children") if expected is not None else None
        if expected is not None and wanted is None:
            return
        for index, child in enumerate(children):
            guide = _node(wanted[index]) if wanted is not None and index < len(wanted) else None
            show(_node(child), guide, indent + "  ")

    show(_node(tree), _node(fields) if fields is not None else None, "")
    return lines


def _node(node: Mapping[str, Any] | str) -> Mapping[str, Any]:
    return {"task": node} if isinstance(node, str) else node


def assert_tree(app_or_store: Celery | SpawnStore, root_id: str, expected: Mapping[str, Any]) -> dict:
    """Assert the recorded tree below ``root_id`` matches ``expected``; returns the tree.

    ``expected`` is a nested dict: ``{"task": NAME, "state": STATE, "children": [...]}``,
    children in spawn order. ``state`` and ``children`` are checked only where
    given; a child may be written as its task name alone. On a mismatch the
    error shows both trees as outlines, with a diff.
    """
    tree = spawn_tree(app_or_store, root_id)
    if tree is None:
        raise AssertionError(f"no spawn tree recorded for {root_id!r}")
    want = tree_outline(_node(expected), _node(expected))
    got = tree_outline(tree, _node(expected))
    if want != got:
        diff = "\n".join(line for line in difflib.ndiff(want, got) if not line.startswith("?"))
        raise AssertionError(f"the spawn tree of {root_id} differs from the expected one (- expected, + recorded):\n"
                             f"{diff}")
    return tree
