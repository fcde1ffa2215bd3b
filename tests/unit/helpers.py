"""The shared eager rig of the unit tests: a real Celery app on ``memory://`` installed on a real store.

Its fixtures (``rig``, ``sqlite_rig``, ``broker_rig``, ``publishing_rig``) are in ``tests/unit/conftest.py``.
"""
from __future__ import annotations

import uuid
from datetime import timedelta
from typing import Any

import sqlalchemy as sa
from celery import Celery

from celery_spawn import SpawnError, SpawnManager, SpawnTask, install, signals
from celery_spawn.store import schema as s
from celery_spawn.store import utcnow
from celery_spawn.engine.publisher import Publisher


class Rig:
    """A real Celery app (eager by default) installed on a real store, with tasks that record their runs."""

    def __init__(self, url: str, eager: bool = True, **settings: Any) -> None:
        app = Celery("spawn_unit", broker="memory://", set_as_current=False)
        self.queue = f"unit-{uuid.uuid4().hex[:10]}"  # the memory transport is shared by the whole process
        app.conf.update(task_always_eager=eager, task_default_queue=self.queue)
        self.app = app
        self.manager = SpawnManager()
        self.state = install(app, self.manager, database_url=url, **settings)
        self.runs: list[tuple[str, tuple, dict]] = []
        self.failures: list[tuple[str, BaseException]] = []
        runs = self.runs

        @app.task(name="unit.parent", base=SpawnTask, shared=False)
        def parent(value):  # a plain function: no **kwargs to swallow _spawn_config
            return value

        @app.task(name="unit.child", shared=False, bind=True)
        def child(self, *args, **kwargs):
            runs.append((self.request.id, args, kwargs))
            return list(args)

        self.parent, self.child = parent, child
        signals.spawn_failed.connect(self._on_failed, weak=False)

    def _on_failed(self, sender=None, operation_id=None, exception=None, **_: Any) -> None:
        if getattr(sender, "app", None) is self.app:
            self.failures.append((operation_id, exception))

    def close(self) -> None:
        signals.spawn_failed.disconnect(self._on_failed)
        self.state.store.dispose()

    # ---- building and running ------------------------------------------------------------------
    def sig(self, *args: Any, **kwargs: Any):
        return self.app.signature("unit.child", args=args, kwargs=kwargs)

    def handler(self, name: str):
        return self.manager.handler(name)

    def spawn(self, config: Any, value: Any = "parent-result", task: Any = None, **options: Any):
        """Apply the parent (eagerly, as a worker would run it) with ``_spawn_config=config``."""
        return (task or self.parent).apply(args=(value,), kwargs={"_spawn_config": config}, **options)

    # ---- reading the store ---------------------------------------------------------------------
    def rows(self, query) -> list[dict]:
        with self.state.store.read() as conn:
            return [dict(r) for r in conn.execute(query).mappings()]

    def operations(self, parent_id: str | None = None) -> list[dict]:
        query = sa.select(s.operations).order_by(s.operations.c.created_at)
        if parent_id is not None:
            query = query.where(s.operations.c.parent_id == parent_id)
        return self.rows(query)

    def operation(self, parent_id: str) -> dict:
        (operation,) = self.operations(parent_id)
        return operation

    def jobs(self, operation_id: str | None = None) -> list[dict]:
        query = sa.select(s.jobs).order_by(s.jobs.c.depth, s.jobs.c.position, s.jobs.c.created_at)
        if operation_id is not None:
            query = query.where(s.jobs.c.operation_id == operation_id)
        return self.rows(query)

    def children_of(self, parent_id: str) -> list[dict]:
        return self.jobs(self.operation(parent_id)["id"])

    def edges(self) -> list[dict]:
        return self.rows(sa.select(s.dependencies))

    def ran(self) -> list[str]:
        return [job_id for job_id, _, _ in self.runs]

    def drain(self, queue: str | None = None) -> list:
        """Every message waiting on the memory broker's ``queue``, acknowledged."""
        messages = []
        with self.app.connection_for_read() as conn:
            simple = conn.SimpleQueue(queue or self.queue)
            try:
                while True:
                    try:
                        message = simple.get(block=False)
                    except simple.Empty:
                        break
                    message.ack()
                    messages.append(message)
            finally:
                simple.close()
        return messages

    # ---- the contract of a refused spawn -------------------------------------------------------
    def assert_refused(self, result, value: Any, error: type[SpawnError], text: str | None = None) -> dict:
        """The parent's result stands, the operation is failed with the error, nothing was kept or run."""
        assert result.state == "SUCCESS", result.traceback
        assert result.get() == value
        operation = self.operation(result.id)
        assert operation["state"] == s.OP_FAILED
        assert operation["error"].startswith(f"{error.__name__}: "), operation["error"]
        if text is not None:
            assert text in operation["error"]
        assert operation["total"] == 0
        assert self.jobs(operation["id"]) == []
        assert self.runs == []
        assert [type(exc) for _, exc in self.failures][-1] is error
        return operation


def age(rig: Rig, operation_id: str, seconds: float = 3600) -> None:
    """Pretend the operation was last touched ``seconds`` ago (the recovery grace period has passed)."""
    with rig.state.store.begin() as conn:
        conn.execute(s.operations.update().where(s.operations.c.id == operation_id)
                     .values(updated_at=utcnow() - timedelta(seconds=seconds)))


def fail_publishing(monkeypatch) -> None:
    def broker_down(app, children):
        raise ConnectionError("broker unreachable")

    monkeypatch.setattr(Publisher, "publish", broker_down)


def tracked_app(store_url: str, backend: str | None = None, spawned_children: bool = False):
    """An app on ``store_url`` whose ``t.parent`` spawns ``t.child`` n times (handler ``kids``)."""
    app = Celery("tracking", broker="memory://", backend=backend, set_as_current=False)
    manager = SpawnManager()
    install(app, manager, database_url=store_url)
    runs = []

    @app.task(name="t.parent", base=SpawnTask, shared=False)
    def parent(n):
        return n

    @app.task(name="t.child", base=SpawnTask if spawned_children else app.Task, shared=False)
    def child(i):
        runs.append(i)
        return i + 1

    @manager.handler("kids")
    def kids(context):
        return [child.s(i) for i in range(context.parent.result)]

    return app, parent, child, runs
