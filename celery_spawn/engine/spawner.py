"""One spawn: validate, generate, limit, inherit, record, publish.

Persist, then publish: the operation, its children and their dependency edges
are written in one transaction before any child is published. Child ids are
deterministic (operation id + sequence), so a parent that is retried or
redelivered finds its operation recorded and only publishes what is still
pending.
"""
from __future__ import annotations

import itertools
import logging
import reprlib
import time
from typing import TYPE_CHECKING, Any, Iterable, Iterator, Sequence

from celery.canvas import Signature
from kombu.utils.json import dumps

from .. import metrics, signals, tracing
from ..config import HARD_MAX_PAYLOAD_DEPTH, SpawnConfig, check_size, nesting_depth
from ..errors import (
    DependencyError,
    HandlerError,
    InvalidJobId,
    OperationConflict,
    PayloadTooLarge,
    SpawnDepthExceeded,
    SpawnError,
    SpawnLimitExceeded,
    SpawnValidationError,
    StoreError,
)
from ..handlers import (ParentJob, SpawnContext, SpawnHandler, SpawnResult, as_handler, default_operation_id,
                        labelled_operation_id)
from ..protocol import ID_RULE, OP_FAILED, OP_RUNNING, OP_SUCCEEDED, is_valid_id
from ..store import utcnow
from .children import (EAGER_ID_LIMIT, ChildRows, Recorded, Siblings, describe, effective_config, find_cycle,
                       inherited_max_depth, operation_row, parent_from_task, requested_handler, root_row)
from .outbox import stored_batch_size

if TYPE_CHECKING:
    from celery import Celery, Task

    from ..handlers import SpawnManager
    from ..settings import SpawnSettings
    from ..store import SpawnStore
    from .completion import Completion
    from .outbox import Outbox

logger = logging.getLogger("celery_spawn.spawner")


class Spawner:
    """Runs the spawn of one finished parent task."""

    def __init__(self, app: Celery, settings: SpawnSettings, manager: SpawnManager, store: SpawnStore,
                 outbox: Outbox, completion: Completion) -> None:
        self.app = app
        self.settings = settings
        self.manager = manager
        self.store = store
        self.outbox = outbox
        self.completion = completion
        self.rows = ChildRows(app, settings.max_payload_depth, settings.max_payload_bytes)

    # ---- entry point -------------------------------------------------------------------
    def spawn(self, task: Task, result: Any, call_config: Any) -> SpawnResult | None:
        """Spawn the children of ``task``; bad input is recorded as a failed operation.

        Returns the SpawnResult, or None when the spawn was refused. A
        :class:`~celery_spawn.errors.StoreError` propagates, so that the
        parent fails (or retries) visibly. Counted in the metrics by outcome
        (recorded, refused, failed), and traced as ``celery_spawn.spawn``.
        """
        started = time.perf_counter()
        handler_name = requested_handler(task, call_config)
        outcome = "failed"
        try:
            with tracing.spawn_span({"celery_spawn.handler": handler_name,
                                     "celery_spawn.parent_id": str(task.request.id)}):
                spawned = self._spawn(task, result, call_config)
            outcome = "recorded" if spawned is not None else "refused"
            return spawned
        finally:
            metrics.spawn_finished(handler_name, outcome, time.perf_counter() - started)

    def _spawn(self, task: Task, result: Any, call_config: Any) -> SpawnResult | None:
        parent = parent_from_task(task, result)
        operation_id = default_operation_id(parent.id)
        config: SpawnConfig | None = None
        handler_name = requested_handler(task, call_config)
        try:
            config = effective_config(self.settings, task, call_config)
            if config.operation_id:
                operation_id = self._id_for_label(config.operation_id, parent.id)
            handler_name = config.handler or task.name
            handler = self._resolve_handler(task, handler_name)
            for what, value in (("task id", parent.id), ("root id", parent.root_id)):
                if not is_valid_id(value):
                    raise InvalidJobId(f"the parent's {what} {value!r} must be {ID_RULE}, or no tool could reach "
                                       "its tree: give the parent a task_id that is")
            max_depth = min(config.max_depth, inherited_max_depth(task) or config.max_depth)
            if parent.depth + 1 > max_depth:
                raise SpawnDepthExceeded(
                    f"spawning from {parent.name} at depth {parent.depth} would exceed max_depth={max_depth}")
            try:
                return self._run(task, handler, parent, config, operation_id, handler_name)
            except _IdTaken as taken:  # another parent's spawn took the label between our reads
                fallback = labelled_operation_id(config.operation_id, parent.id) if config.operation_id else None
                if fallback is None or fallback == operation_id:
                    raise OperationConflict(str(taken)) from None
                operation_id = fallback
                return self._run(task, handler, parent, config, operation_id, handler_name)
        except SpawnError as exc:
            if isinstance(exc, StoreError):  # the parent must fail or retry visibly
                raise
            self._refused(task, parent, operation_id, handler_name, config, call_config, exc)
            return None
        except RecursionError:  # a payload no limit measured: refused all the same, the parent's result stands
            too_deep = PayloadTooLarge("a payload nested too deeply to be handled (RecursionError)")
            self._refused(task, parent, operation_id, handler_name, config, call_config, too_deep)
            return None

    def _id_for_label(self, label: str, parent_id: str) -> str:
        """The label itself while it is free (or already ours), else this parent's ``label~hash`` id."""
        with self.store.read() as conn:
            owner = self.store.operation_owner(conn, label)
        return label if owner is None or owner == parent_id else labelled_operation_id(label, parent_id)

    def _resolve_handler(self, task: Task, name: str) -> SpawnHandler:
        task_handler = getattr(task, "spawn_handler", None)
        if task_handler is not None and not isinstance(task_handler, str) and name == task.name:
            return as_handler(task_handler)
        return self.manager.get_handler(name)

    # ---- the operation -----------------------------------------------------------------
    def _run(self, task: Task, handler: SpawnHandler, parent: ParentJob, config: SpawnConfig,
             operation_id: str, handler_name: str) -> SpawnResult:
        with self.store.read() as conn:
            existing = self.store.get_operation(conn, operation_id)
        if existing is not None and existing["parent_id"] != parent.id:
            raise _IdTaken(f"operation_id {operation_id!r} already belongs to the spawn of job {existing['parent_id']}")
        if existing is not None and existing["state"] != OP_FAILED:
            logger.info("spawn %s of %s already recorded; publishing what is pending", operation_id, parent.id)
            return self._replay(handler, existing)

        try:
            handler.validate_spawn(parent, config)
        except SpawnError:
            raise
        except Exception as exc:
            raise SpawnValidationError(f"handler {handler_name!r} refused the spawn: {describe(exc)}") from exc

        context = SpawnContext(parent, config, self.app, operation_id)
        context.inherited_max_depth = inherited_max_depth(task)
        if config.inherit_trace_context:
            context.trace_headers = tracing.capture() or None
        now = utcnow()
        record = operation_row(parent, config, operation_id, handler_name, now, context.trace_headers)
        check_size("spawn config", record["config"], self.settings.max_payload_bytes)
        with self.store.begin() as conn:
            if existing is not None:
                self.store.delete_operation(conn, operation_id)
            if not self.store.insert_operation(conn, record):
                raise _IdTaken(f"operation_id {operation_id!r} was taken by another parent's spawn")
            self.store.ensure_job(conn, root_row(parent, now))
            total, edge_count, recorded = self._record_children(conn, handler, handler_name, context, now)
            if edge_count:  # without edges there is nothing to check or settle
                self._check_dependencies(conn, operation_id)
                self.store.settle_dependencies(conn, operation_id, self.settings.recovery_grace)
            self.store.update_operation(conn, operation_id, total=total,
                                        state=OP_RUNNING if total else OP_SUCCEEDED,
                                        finished_at=None if total else now)
        operation = {"id": operation_id, "published_through": -1, "total": total}
        self.outbox.publish_pending(operation_id, config.batch_size, operation=operation, pending=bool(edge_count),
                                    recorded=recorded.publishable)
        ids = recorded.ids if recorded.ids is not None else self._child_ids(operation_id, total)
        spawn_result = SpawnResult(parent.id, ids, now, operation_id)
        if not total:
            self.completion.check(operation_id)
        metrics.children_spawned(handler_name, total)
        self._announce(task, handler, spawn_result)
        return spawn_result

    def _replay(self, handler: SpawnHandler, operation: dict) -> SpawnResult:
        self.outbox.publish_pending(operation["id"], stored_batch_size(operation), operation=operation)
        ids = self._child_ids(operation["id"], operation["total"])
        return SpawnResult(operation["parent_id"], ids, operation["created_at"], operation["id"])

    def _child_ids(self, operation_id: str, total: int) -> Sequence[str]:
        """The children's ids: a list, or for a huge spawn a view that pages them from the store."""
        if total > EAGER_ID_LIMIT:
            return StoredChildIds(self.store, operation_id, total)
        with self.store.read() as conn:
            return self.store.operation_job_ids(conn, operation_id)

    def _record_children(self, conn: Any, handler: SpawnHandler, handler_name: str,
                         context: SpawnContext, now: Any) -> tuple[int, int, Recorded]:
        """Record every child and its edges; returns (children, dependency edges, what is kept in memory)."""
        config = context.config
        total = edge_count = 0
        siblings = Siblings()
        recorded = Recorded()
        eager = bool(self.app.conf.task_always_eager)
        for batch in _batched(self._generate(handler, handler_name, context), config.batch_size):
            rows, edges, chosen = [], [], []
            for sig in batch:
                if total >= config.max_spawn_count:
                    raise SpawnLimitExceeded(
                        f"handler {handler_name!r} produced more than max_spawn_count={config.max_spawn_count} "
                        "children; nothing was dispatched")
                try:
                    row, child_edges, user_chosen = self.rows.child_row(sig, total, context, siblings, now, eager)
                except SpawnError:
                    raise
                except (TypeError, ValueError, AttributeError) as exc:
                    raise HandlerError(f"child #{total} has malformed options: {describe(exc)}") from None
                if user_chosen:
                    chosen.append(row["id"])
                rows.append(row)
                recorded.add(row)
                edges.extend(child_edges)
                total += 1
            taken = self.store.existing_job_ids(conn, chosen) if chosen else ()
            if taken:
                raise HandlerError(f"handler {handler_name!r} chose task id(s) already in the store: "
                                   f"{', '.join(sorted(taken)[:5])}")
            self.store.insert_jobs(conn, rows)
            if edges:
                self.store.insert_dependencies(conn, edges)
                edge_count += len(edges)
        return total, edge_count, recorded

    def _generate(self, handler: SpawnHandler, handler_name: str, context: SpawnContext) -> Iterator[Any]:
        """The handler's children, with every exception it raises named after it."""
        try:
            produced = handler.spawn_jobs(context)
            if produced is None:
                return
            if isinstance(produced, Signature):
                raise HandlerError(f"handler {handler_name!r} returned one signature; return a list or yield them")
            iterator = iter(produced)
        except SpawnError:
            raise
        except TypeError as exc:
            raise HandlerError(f"handler {handler_name!r} returned {type(produced).__name__}, "
                               "not an iterable of signatures") from exc
        except Exception as exc:
            raise HandlerError(f"handler {handler_name!r} raised {describe(exc)}") from exc
        while True:
            try:
                item = next(iterator)
            except StopIteration:
                return
            except SpawnError:
                raise
            except Exception as exc:
                raise HandlerError(f"handler {handler_name!r} raised {describe(exc)}") from exc
            yield item

    def _announce(self, task: Task, handler: SpawnHandler, result: SpawnResult) -> None:
        logger.info("spawned %d children of %s (operation %s)", len(result.spawned_job_ids),
                    result.parent_job_id, result.operation_id)
        signals.spawn_recorded.send(sender=task, result=result)
        try:
            handler.on_spawn_complete(result)
        except Exception as exc:  # an observer hook: log and carry on
            logger.exception("on_spawn_complete of %r raised %s", handler, describe(exc))

    def _refused(self, task: Task, parent: ParentJob, operation_id: str, handler_name: str,
                 config: SpawnConfig | None, call_config: Any, exc: SpawnError) -> None:
        logger.error("spawn of %s[%s] refused: %s", parent.name, parent.id, exc)
        now = utcnow()
        config_text = dumps(config.to_dict()) if config is not None else _safe_config_text(call_config)
        if len(config_text) > self.settings.max_payload_bytes:
            config_text = config_text[:REFUSED_CONFIG_CHARS]
        row = operation_row(parent, config, operation_id, handler_name, now)
        row.update(state=OP_FAILED, error=f"{type(exc).__name__}: {exc}"[:10000], config=config_text, finished_at=now)
        if isinstance(exc, OperationConflict):
            row["id"] = default_operation_id(parent.id)  # the explicit id belongs to another parent
        self.store.record_failed_operation(row, fallback_id=default_operation_id(parent.id))
        signals.spawn_failed.send(sender=task, operation_id=operation_id, exception=exc)

    def _check_dependencies(self, conn: Any, operation_id: str) -> None:
        """Refuse unknown ids and cycles among this operation's children (one query each)."""
        unknown = self.store.dependency_problem(conn, operation_id)
        if unknown is not None:
            raise DependencyError(f"job {unknown[0]} depends on unknown job {unknown[1]}")
        cycle = find_cycle(self.store.internal_edges(conn, operation_id))
        if cycle:
            raise DependencyError(f"dependency cycle among spawned jobs: {' -> '.join(cycle)}")


class _IdTaken(Exception):
    """The operation id was free when read and taken when inserted (rolls the spawn back)."""


class StoredChildIds(Sequence[str]):
    """A read-only sequence of an operation's child ids, read from the store a page at a time."""

    PAGE = 5_000

    def __init__(self, store: Any, operation_id: str, total: int) -> None:
        self._store = store
        self._operation_id = operation_id
        self._total = total

    def __len__(self) -> int:
        return self._total

    def __iter__(self) -> Iterator[str]:
        after = -1
        while True:
            with self._store.read() as conn:
                page = self._store.pending_page(conn, self._operation_id, after, self.PAGE, any_state=True)
            if not page:
                return
            after = page[-1]["position"]
            yield from (row["id"] for row in page)

    def __getitem__(self, index: Any) -> Any:
        if isinstance(index, slice):
            return list(itertools.islice(self, *index.indices(self._total)))
        if index < 0:
            index += self._total
        if not 0 <= index < self._total:
            raise IndexError(index)
        return next(itertools.islice(self, index, None))

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Sequence) and len(other) == len(self) and all(a == b for a, b in zip(self, other))

    def __repr__(self) -> str:
        return f"<{len(self)} child ids of operation {self._operation_id}>"


#: How much of a refused config too large to keep whole is kept with its failed operation.
REFUSED_CONFIG_CHARS = 2000


def _safe_config_text(raw: Any) -> str:
    """A refused call config as text: its JSON, else its repr; a short repr when it nests too deeply for either."""
    if nesting_depth(raw, HARD_MAX_PAYLOAD_DEPTH) > HARD_MAX_PAYLOAD_DEPTH:
        return reprlib.repr(raw)
    try:
        return dumps(raw)
    except Exception:
        return repr(raw)[:REFUSED_CONFIG_CHARS]


def _batched(items: Iterable[Any], size: int) -> Iterator[list[Any]]:
    iterator = iter(items)
    while True:
        batch = list(itertools.islice(iterator, size))
        if not batch:
            return
        yield batch
