"""One spawn operation: validate, generate, limit, inherit, record, publish.

Persist, then publish: the operation, its children and their dependency edges
are written in one transaction before any child is published. Child ids are
deterministic (operation id + sequence), so a parent that is retried or
redelivered finds its operation recorded and only publishes what is still
pending.
"""
from __future__ import annotations

import itertools
import logging
from collections import defaultdict
from typing import TYPE_CHECKING, Any, Iterable, Iterator, Sequence

import sqlalchemy as sa
from celery.canvas import Signature
from kombu.utils.json import dumps

from . import signals
from .config import SpawnConfig
from .errors import (
    DependencyError,
    HandlerError,
    OperationConflict,
    SpawnConfigError,
    SpawnDepthExceeded,
    SpawnError,
    SpawnLimitExceeded,
    SpawnValidationError,
    StoreError,
)
from .handlers import ParentJob, SpawnContext, SpawnHandler, SpawnResult, default_operation_id
from .publisher import publish_children
from .signatures import DEPENDS_ON_OPTION, IGNORE_FAILURE_OPTION, SPAWN_CONFIG_KWARG
from .store import schema as s
from .store.sql import utcnow

if TYPE_CHECKING:
    from celery import Celery, Task

    from .app import SpawnState

logger = logging.getLogger("celery_spawn.spawner")

#: Message headers every spawned child carries: its operation and its depth.
HEADER_OPERATION = "spawn_operation"
HEADER_DEPTH = "spawn_depth"
#: The strictest ``max_depth`` of the spawns above a child: nested spawns may not lift it.
HEADER_MAX_DEPTH = "spawn_max_depth"

#: Children published per producer batch at least (small ``batch_size`` values only shape recording).
MIN_PUBLISH_PAGE = 500

#: Above this many children, ``SpawnResult.spawned_job_ids`` pages ids from the store instead of a list.
EAGER_ID_LIMIT = 10_000
#: A spawn publishes the children it just recorded from memory (not read back) up to this many message
#: characters; a bigger spawn pages them from the store, so memory stays bounded.
KEEP_MESSAGE_CHARS = 16 << 20

#: Signature options that are the spawner's business, never published.
_PRIVATE_OPTIONS = {"task_id", "parent_id", "root_id", "group_id", "group_index", "chord",
                    DEPENDS_ON_OPTION, IGNORE_FAILURE_OPTION}


def request_headers(request: Any) -> dict:
    """Custom message headers of a task request, in a worker and in eager mode alike."""
    headers = getattr(request, "headers", None) or {}
    return headers if isinstance(headers, dict) else {}


def queue_of_delivery(app: Celery, delivery: dict) -> str | None:
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
    headers = request_headers(request)
    delivery = request.delivery_info or {}
    kwargs = {k: v for k, v in (request.kwargs or {}).items() if k != SPAWN_CONFIG_KWARG}
    try:
        depth = int(headers.get(HEADER_DEPTH) or getattr(request, HEADER_DEPTH, 0) or 0)
    except (TypeError, ValueError):
        depth = 0
    return ParentJob(
        id=request.id,
        name=task.name,
        args=tuple(request.args or ()),
        kwargs=kwargs,
        result=result,
        priority=delivery.get("priority"),
        queue=queue_of_delivery(task.app, delivery),
        root_id=request.root_id or request.id,
        depth=depth,
        parent_id=request.parent_id,
    )


def inherited_max_depth(task: Task) -> int | None:
    """The ``max_depth`` a spawned task inherited from the spawns above it, if any."""
    raw = request_headers(task.request).get(HEADER_MAX_DEPTH) or getattr(task.request, HEADER_MAX_DEPTH, None)
    try:
        return int(raw) if raw is not None else None
    except (TypeError, ValueError):
        return None


def effective_config(state: SpawnState, task: Task, call_config: Any) -> SpawnConfig:
    """Named defaults, then the task's ``spawn_config``/``spawn_handler``, then the call's ``_spawn_config``."""
    ceiling = state.settings.max_spawn_count_ceiling
    config = SpawnConfig(max_spawn_count=min(state.settings.default_max_spawn_count, ceiling))
    task_config = getattr(task, "spawn_config", None)
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


class Spawner:
    """Runs the spawn of one finished parent task."""

    def __init__(self, state: SpawnState) -> None:
        self.state = state
        self.app: Celery = state.app
        self.store = state.store
        self._route_cache: dict[str, str | None] = {}

    # ---- entry point -------------------------------------------------------------------
    def spawn(self, task: Task, result: Any, call_config: Any) -> SpawnResult | None:
        """Spawn the children of ``task``; bad input is recorded as a failed operation.

        Returns the SpawnResult, or None when the spawn was refused. A
        :class:`~celery_spawn.errors.StoreError` propagates, so that the
        parent fails (or retries) visibly.
        """
        parent = parent_from_task(task, result)
        operation_id = default_operation_id(parent.id)
        config: SpawnConfig | None = None
        handler_name: str | None = None
        try:
            config = effective_config(self.state, task, call_config)
            operation_id = config.operation_id or operation_id
            handler_name = config.handler or task.name
            handler = self._resolve_handler(task, handler_name)
            max_depth = min(config.max_depth, inherited_max_depth(task) or config.max_depth)
            if parent.depth + 1 > max_depth:
                raise SpawnDepthExceeded(
                    f"spawning from {parent.name} at depth {parent.depth} would exceed max_depth={max_depth}")
            return self._run(task, handler, parent, config, operation_id, handler_name)
        except SpawnError as exc:
            if isinstance(exc, StoreError):  # the parent must fail or retry visibly
                raise
            self._refused(task, parent, operation_id, handler_name, config, call_config, exc)
            return None

    def _resolve_handler(self, task: Task, name: str) -> SpawnHandler:
        task_handler = getattr(task, "spawn_handler", None)
        if task_handler is not None and not isinstance(task_handler, str) and name == task.name:
            from .handlers import _as_handler

            return _as_handler(task_handler)
        return self.state.manager.get_handler(name)

    # ---- the operation -----------------------------------------------------------------
    def _run(self, task: Task, handler: SpawnHandler, parent: ParentJob, config: SpawnConfig,
             operation_id: str, handler_name: str) -> SpawnResult:
        with self.store.read() as conn:
            existing = self.store.get_operation(conn, operation_id)
        if existing is not None and existing["parent_id"] != parent.id:
            raise OperationConflict(
                f"operation_id {operation_id!r} already belongs to the spawn of job {existing['parent_id']}")
        if existing is not None and existing["state"] != s.OP_FAILED:
            logger.info("spawn %s of %s already recorded; publishing what is pending", operation_id, parent.id)
            return self._replay(handler, existing)

        try:
            handler.validate_spawn(parent, config)
        except SpawnError:
            raise
        except Exception as exc:
            raise SpawnValidationError(f"handler {handler_name!r} refused the spawn: {_describe(exc)}") from exc

        context = SpawnContext(parent, config, self.app, operation_id)
        context.inherited_max_depth = inherited_max_depth(task)
        now = utcnow()
        with self.store.begin() as conn:
            if existing is not None:
                self.store.delete_operation(conn, operation_id)
            self.store.insert_operation(conn, self._operation_row(parent, config, operation_id, handler_name, now))
            self.store.ensure_job(conn, self._root_row(parent, now))
            total, edge_count, recorded = self._record_children(conn, handler, handler_name, context, now)
            if edge_count:  # without edges there is nothing to check or settle
                self._check_dependencies(conn, operation_id)
                settle_dependencies(self.state, conn, operation_id)
            self.store.update_operation(conn, operation_id, total=total,
                                        state=s.OP_RUNNING if total else s.OP_SUCCEEDED,
                                        finished_at=None if total else now)
        operation = {"id": operation_id, "published_through": -1, "total": total}
        self.publish_pending(operation_id, config.batch_size, operation=operation, pending=bool(edge_count),
                             recorded=recorded.publishable)
        ids = recorded.ids if recorded.ids is not None else self._child_ids(operation_id, total)
        spawn_result = SpawnResult(parent.id, ids, now, operation_id)
        if not total:
            self.state.tracker.check_completion(operation_id)
        self._announce(task, handler, spawn_result)
        return spawn_result

    def _replay(self, handler: SpawnHandler, operation: dict) -> SpawnResult:
        self.publish_pending(operation["id"], stored_batch_size(operation), operation=operation)
        ids = self._child_ids(operation["id"], operation["total"])
        return SpawnResult(operation["parent_id"], ids, operation["created_at"], operation["id"])

    def _child_ids(self, operation_id: str, total: int) -> Sequence[str]:
        """The children's ids: a list, or for a huge spawn a view that pages them from the store."""
        if total > EAGER_ID_LIMIT:
            return StoredChildIds(self.store, operation_id, total)
        with self.store.read() as conn:
            return self.store.operation_job_ids(conn, operation_id)

    def _record_children(self, conn: sa.Connection, handler: SpawnHandler, handler_name: str,
                         context: SpawnContext, now: Any) -> tuple[int, int, Recorded]:
        """Record every child and its edges; returns (children, dependency edges, what is kept in memory)."""
        config = context.config
        total = edge_count = 0
        seen: set[str] = set()
        recorded = Recorded()
        for batch in _batched(self._generate(handler, handler_name, context), config.batch_size):
            rows, edges, chosen = [], [], []
            for sig in batch:
                if total >= config.max_spawn_count:
                    raise SpawnLimitExceeded(
                        f"handler {handler_name!r} produced more than max_spawn_count={config.max_spawn_count} "
                        "children; nothing was dispatched")
                try:
                    row, child_edges, user_chosen = self._child_row(sig, total, context, seen, now)
                except (TypeError, ValueError, AttributeError) as exc:
                    raise HandlerError(f"child #{total} has malformed options: {_describe(exc)}") from None
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
            raise HandlerError(f"handler {handler_name!r} raised {_describe(exc)}") from exc
        while True:
            try:
                item = next(iterator)
            except StopIteration:
                return
            except SpawnError:
                raise
            except Exception as exc:
                raise HandlerError(f"handler {handler_name!r} raised {_describe(exc)}") from exc
            yield item

    def _child_row(self, sig: Any, position: int, context: SpawnContext, seen: set[str],
                   now: Any) -> tuple[dict, list[dict], bool]:
        where = f"child #{position}"
        if not isinstance(sig, Signature) or type(sig) is not Signature:
            kind = type(sig).__name__
            raise HandlerError(f"{where} is a {kind}, not a single task signature (celery.signature / task.s())")
        name = sig.task
        if not isinstance(name, str) or not name or not name.isprintable():
            raise HandlerError(f"{where} has no valid task name: {name!r}")
        options = dict(sig.options)
        user_chosen = bool(options.get("task_id")) and not context.generated(options["task_id"])
        job_id = options.get("task_id") or context.next_child_id()
        if not isinstance(job_id, str) or not job_id or len(job_id) > 64 or not job_id.isprintable():
            raise HandlerError(f"{where} has an invalid task_id {job_id!r}")
        if options.get("task_id"):  # ids generated here are unique by construction: remember only the others
            if job_id in seen:
                raise HandlerError(f"{where} repeats task id {job_id}")
            seen.add(job_id)
        parent = context.parent
        config = context.config
        depends = [str(d) for d in options.get(DEPENDS_ON_OPTION) or ()]
        ignored = set(options.get(IGNORE_FAILURE_OPTION) or ())
        if job_id in depends:
            raise DependencyError(f"{where} ({job_id}) depends on itself")

        publish = {k: v for k, v in options.items() if k not in _PRIVATE_OPTIONS}
        if config.inherit_priority and parent.priority is not None and publish.get("priority") is None:
            publish["priority"] = parent.priority
        if config.inherit_queue and parent.queue and not publish.get("queue"):
            publish["queue"] = parent.queue
        if config.spawn_delay_ms and "countdown" not in publish and "eta" not in publish:
            publish["countdown"] = position * config.spawn_delay_ms / 1000.0
        headers = dict(publish.get("headers") or {})
        headers[HEADER_OPERATION] = context.operation_id
        headers[HEADER_DEPTH] = parent.depth + 1
        headers[HEADER_MAX_DEPTH] = min(config.max_depth, context.inherited_max_depth or config.max_depth)
        publish["headers"] = headers
        try:
            message = dumps({"task": name, "args": list(sig.args or ()), "kwargs": dict(sig.kwargs or {}),
                             "options": publish})
        except (TypeError, ValueError) as exc:
            raise HandlerError(f"{where} ({name}) cannot be serialised to JSON: {exc}") from None

        pending_deps = sum(1 for d in depends if d != parent.id)
        row = {
            "id": job_id,
            "parent_id": parent.id,
            "root_id": parent.root_id,
            "operation_id": context.operation_id,
            "position": position,
            "depth": parent.depth + 1,
            "task_name": name[:255],
            "queue": self._queue_of(name, publish),
            "priority": publish.get("priority"),
            # Without dependency edges a child is recorded as dispatched: the operation's
            # publish watermark, not a per-row update, says whether its message went out.
            "state": s.HELD if pending_deps else (s.PENDING if depends else s.DISPATCHED),
            "pending_deps": pending_deps,
            "retries": 0,
            "message": message,
            "created_at": now,
            "dispatched_at": None if depends else now,
        }
        edges = [{"job_id": job_id, "depends_on_id": dep, "ignore_failure": dep in ignored,
                  "satisfied": dep == parent.id} for dep in depends]
        return row, edges, user_chosen

    def _queue_of(self, task_name: str, options: dict) -> str | None:
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

    def _check_dependencies(self, conn: sa.Connection, operation_id: str) -> None:
        """Refuse unknown ids and cycles among this operation's children (one query each)."""
        child = s.jobs.alias("child")
        target = s.jobs.alias("target")
        unknown = conn.execute(
            sa.select(s.dependencies.c.job_id, s.dependencies.c.depends_on_id)
            .join(child, child.c.id == s.dependencies.c.job_id)
            .outerjoin(target, target.c.id == s.dependencies.c.depends_on_id)
            .where(child.c.operation_id == operation_id, target.c.id.is_(None))
            .limit(1)
        ).first()
        if unknown is not None:
            raise DependencyError(f"job {unknown.job_id} depends on unknown job {unknown.depends_on_id}")
        edges = conn.execute(
            sa.select(s.dependencies.c.job_id, s.dependencies.c.depends_on_id)
            .join(child, child.c.id == s.dependencies.c.job_id)
            .join(target, target.c.id == s.dependencies.c.depends_on_id)
            .where(child.c.operation_id == operation_id, target.c.operation_id == operation_id)
        ).all()
        cycle = _find_cycle([(e.job_id, e.depends_on_id) for e in edges])
        if cycle:
            raise DependencyError(f"dependency cycle among spawned jobs: {' -> '.join(cycle)}")

    # ---- publishing --------------------------------------------------------------------
    def publish_pending(self, operation_id: str, page_size: int, operation: dict | None = None,
                        pending: bool = True, recorded: list[dict] | None = None) -> int:
        """Publish every child of an operation that has not reached the broker, a page at a time.

        First the children recorded ``dispatched`` after the operation's
        publish watermark (``published_through``, moved on once per page),
        then, unless ``pending`` is false, the ``pending`` ones (released from
        dependencies, or put back after a broker failure), marked one by one.
        ``operation`` (a row, or the id, watermark and total of one) saves
        reading it, and ``recorded`` (every child recorded ``dispatched``, by
        position, as the spawn just wrote them) reading them back. Returns how
        many children were published.
        """
        page_size = max(page_size, MIN_PUBLISH_PAGE)
        if operation is None:
            with self.store.read() as conn:
                operation = self.store.get_operation(conn, operation_id)
            if operation is None:
                return 0
        watermark, total = operation.get("published_through"), operation["total"]
        published = 0
        if watermark is not None and watermark < total - 1:
            count, complete = self._publish_recorded(operation_id, watermark, total, page_size, recorded)
            published += count
            if not complete:
                return published
        if pending:
            published += self._publish_pending_rows(operation_id, page_size)
        return published

    def _publish_recorded(self, operation_id: str, watermark: int, total: int, page_size: int,
                          recorded: list[dict] | None = None) -> tuple[int, bool]:
        """Publish the children recorded ``dispatched`` after ``watermark``; returns (count, finished)."""
        if recorded is not None:
            pages: Iterable[list[dict]] = (recorded[i:i + page_size] for i in range(0, len(recorded), page_size))
        else:
            pages = self._unpublished_pages(operation_id, watermark, page_size)
        published = 0
        after = watermark
        for page in pages:
            if page:
                try:
                    publish_children(self.app, page)
                except Exception as exc:  # broker trouble: back to pending, for the recovery sweep
                    logger.warning("publishing children of %s failed (%s); the recovery sweep will retry",
                                   operation_id, _describe(exc))
                    self._unpublish(operation_id, after)
                    return published, False
                published += len(page)
            # A short page is the last one: nothing recorded dispatched lies beyond it.
            after = page[-1]["position"] if len(page) == page_size else total - 1
            self.store.advance_watermark(operation_id, after)
        if after < total - 1:
            self.store.advance_watermark(operation_id, total - 1)
        return published, True

    def _unpublished_pages(self, operation_id: str, after: int, page_size: int) -> Iterator[list[dict]]:
        while True:
            with self.store.read() as conn:
                page = self.store.unpublished_page(conn, operation_id, after, page_size)
            yield page
            if len(page) < page_size:
                return
            after = page[-1]["position"]

    def _unpublish(self, operation_id: str, after: int) -> None:
        try:
            self.store.unpublish(operation_id, after)
        except StoreError as exc:  # the watermark still tells the sweep where publishing stopped
            logger.warning("could not mark the unpublished children of %s pending: %s", operation_id, exc)

    def _publish_pending_rows(self, operation_id: str, page_size: int) -> int:
        """Publish pending (not held) children, marking each published one dispatched."""
        published = 0
        after = -1
        while True:
            with self.store.read() as conn:
                page = self.store.pending_page(conn, operation_id, after, page_size)
            if not page:
                return published
            after = page[-1]["position"]
            try:
                ids = publish_children(self.app, page)
            except Exception as exc:  # broker trouble: the recovery sweep publishes them later
                logger.warning("publishing children of %s failed (%s); the recovery sweep will retry",
                               operation_id, _describe(exc))
                return published
            self.store.mark_dispatched(ids)
            self.store.touch_operation(operation_id)
            published += len(ids)

    # ---- reporting ---------------------------------------------------------------------
    def _announce(self, task: Task, handler: SpawnHandler, result: SpawnResult) -> None:
        logger.info("spawned %d children of %s (operation %s)", len(result.spawned_job_ids),
                    result.parent_job_id, result.operation_id)
        signals.spawn_recorded.send(sender=task, result=result)
        try:
            handler.on_spawn_complete(result)
        except Exception as exc:  # an observer hook: log and carry on
            logger.exception("on_spawn_complete of %r raised %s", handler, _describe(exc))

    def _refused(self, task: Task, parent: ParentJob, operation_id: str, handler_name: str | None,
                 config: SpawnConfig | None, call_config: Any, exc: SpawnError) -> None:
        logger.error("spawn of %s[%s] refused: %s", parent.name, parent.id, exc)
        now = utcnow()
        raw_config = config.to_dict() if config is not None else _safe_config_text(call_config)
        row = self._operation_row(parent, config, operation_id, handler_name, now)
        row.update(state=s.OP_FAILED, error=f"{type(exc).__name__}: {exc}"[:10000],
                   config=raw_config if isinstance(raw_config, str) else dumps(raw_config), finished_at=now)
        if isinstance(exc, OperationConflict):
            row["id"] = default_operation_id(parent.id)  # the explicit id belongs to another parent
        self.store.record_failed_operation(row, fallback_id=default_operation_id(parent.id))
        signals.spawn_failed.send(sender=task, operation_id=operation_id, exception=exc)

    def _operation_row(self, parent: ParentJob, config: SpawnConfig | None, operation_id: str,
                       handler_name: str | None, now: Any) -> dict:
        return {
            "id": operation_id,
            "parent_id": parent.id,
            "root_id": parent.root_id,
            "parent_task": parent.name[:255],
            "handler": (handler_name or "")[:255] or None,
            "queue": parent.queue,
            "depth": parent.depth,
            "state": s.OP_RUNNING,
            "total": 0,
            "published_through": -1,
            "config": dumps(config.to_dict()) if config is not None else None,
            "error": None,
            "on_complete": dumps(config.on_complete) if config is not None and config.on_complete else None,
            "wait_for_descendants": bool(config and config.wait_for_descendants),
            "fail_fast": bool(config and config.fail_fast),
            "completed": False,
            "created_at": now,
            "updated_at": now,
            "finished_at": None,
        }

    def _root_row(self, parent: ParentJob, now: Any) -> dict:
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
            "state": s.SUCCEEDED,
            "pending_deps": 0,
            "retries": 0,
            "message": None,
            "created_at": now,
            "started_at": now,
            "finished_at": now,
        }


def stored_batch_size(operation: dict) -> int:
    """The batch size an operation was recorded with; the default when its stored config is unreadable."""
    try:
        return SpawnConfig.from_dict(_loads(operation["config"]) or {}).batch_size
    except Exception:  # recorded under older rules, or damaged: publishing must go on
        return SpawnConfig().batch_size


def settle_dependencies(state: SpawnState, conn: sa.Connection, operation_id: str) -> int:
    """Count off dependencies of an operation's held children on jobs that are already final.

    A dependency on an earlier job that already succeeded is met at once; one
    that already failed cancels the child (unless it ignores that failure).
    Returns how many held children became pending.
    """
    child = s.jobs.alias("child")
    target = s.jobs.alias("target")
    rows = conn.execute(
        sa.select(s.dependencies.c.job_id, s.dependencies.c.depends_on_id, s.dependencies.c.ignore_failure,
                  target.c.state)
        .join(child, child.c.id == s.dependencies.c.job_id)
        .join(target, target.c.id == s.dependencies.c.depends_on_id)
        .where(child.c.operation_id == operation_id, child.c.state == s.HELD,
               s.dependencies.c.satisfied.is_(False), target.c.state.in_(tuple(s.FINAL_JOB_STATES)))
    ).all()
    if not rows:
        return 0
    met = [r for r in rows if r.state == s.SUCCEEDED or r.ignore_failure]
    broken = {r.job_id: r for r in rows if not (r.state == s.SUCCEEDED or r.ignore_failure)}
    for row in met:
        # Guarded: a finishing worker may have counted this edge off since it was read.
        newly_met = conn.execute(
            s.dependencies.update().where(s.dependencies.c.job_id == row.job_id,
                                          s.dependencies.c.depends_on_id == row.depends_on_id,
                                          s.dependencies.c.satisfied.is_(False))
            .values(satisfied=True)).rowcount
        if newly_met:
            conn.execute(s.jobs.update().where(s.jobs.c.id == row.job_id, s.jobs.c.state == s.HELD)
                         .values(pending_deps=s.jobs.c.pending_deps - 1))
    now = utcnow()
    for job_id, row in broken.items():
        reason = f"dependency {row.depends_on_id} {row.state}"
        conn.execute(s.jobs.update().where(s.jobs.c.id == job_id, s.jobs.c.state == s.HELD)
                     .values(state=s.CANCELLED, error=reason, finished_at=now))
        state.tracker.cancel_dependents(conn, [job_id], f"dependency {job_id} cancelled")
    released = conn.execute(
        s.jobs.update().where(s.jobs.c.operation_id == operation_id, s.jobs.c.state == s.HELD,
                              s.jobs.c.pending_deps <= 0).values(state=s.PENDING)
    ).rowcount
    return released or 0


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
        if self.publishable is not None and row["state"] == s.DISPATCHED:
            self.publishable.append(row)
            self._chars += len(row["message"])
            if self._chars > KEEP_MESSAGE_CHARS or len(self.publishable) > EAGER_ID_LIMIT:
                self.publishable = None


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


def _describe(exc: BaseException) -> str:
    text = str(exc)
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def _loads(raw: str | None) -> Any:
    from kombu.utils.json import loads

    return loads(raw) if raw else None


def _safe_config_text(raw: Any) -> str:
    try:
        return dumps(raw)
    except Exception:
        return repr(raw)[:2000]


def _batched(items: Iterable[Any], size: int) -> Iterator[list[Any]]:
    iterator = iter(items)
    while True:
        batch = list(itertools.islice(iterator, size))
        if not batch:
            return
        yield batch


def _find_cycle(edges: list[tuple[str, str]]) -> list[str] | None:
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

