"""The Celery app the fault explorer's workers run: ``celery -A tests.chaos.app worker``.

The reliability suite's app (acks_late, reject_on_worker_lost, a result
backend, the recovery sweep every 2 s with a 5 s grace, lost messages sent
again after 8 s, Redis's visibility timeout from the environment) plus:

* ``chaos.root``: a SpawnTask parent that retries on StoreError and spawns
  the schedule's tree (its ``plan``) through the ``chaos_tree`` handler:
  children with dependencies on earlier siblings, a ``spawn_delay``, and an
  ``on_complete`` callback;
* ``chaos.node``: a SpawnTask child that writes ``start`` to the history,
  sleeps its ``pause``, and, when its call carries a plan of its own, spawns
  the next level the same way (nesting);
* ``chaos.callback``: every operation's ``on_complete``.

The ``succeeded`` and ``callback`` history rows are written from
``task_success``, which Celery sends after the result backend holds the
success: the moment after which celery-spawn promises the child never runs
again. Extra environment: ``SPAWN_CHAOS_HISTORY_URL`` (see :mod:`tests.chaos.history`).
"""
from __future__ import annotations

import os
import time
from typing import Any

from celery import Celery
from celery import signals as celery_signals

from celery_spawn import SpawnConfig, SpawnTask, StoreError, depends_on, get_state
from celery_spawn.protocol import SPAWN_CONFIG_KWARG
from tests.app import settings_from_environment
from tests.chaos import history
from tests.reliability.app import make_reliability_app

ROOT = "chaos.root"
NODE = "chaos.node"
CALLBACK = "chaos.callback"
HANDLER = "chaos_tree"
#: A parent whose spawn meets a store outage retries every second, for this many times at most.
STORE_RETRIES = 300


def spawn_config(app: Celery, tag: str, plan: dict[str, Any]) -> dict[str, Any]:
    """The ``_spawn_config`` of one spawn of the tree: the handler, the plan's delay, the callback."""
    return {"handler": HANDLER, "spawn_delay_ms": plan["delay_ms"], "max_spawn_count": 100,
            "on_complete": dict(app.signature(CALLBACK, kwargs={"tag": tag}))}


def root_signature(app: Celery, tag: str, plan: dict[str, Any]):
    return app.signature(ROOT, kwargs={"tag": tag, "plan": plan, SPAWN_CONFIG_KWARG: spawn_config(app, tag, plan)})


def make_chaos_app(broker: str, backend: str | None, database_url: str, queue: str = "celery",
                   fs_folder: str | None = None, visibility_timeout: float | None = None) -> Celery:
    app = make_reliability_app(broker, backend, database_url, queue, fs_folder, visibility_timeout)
    manager = get_state(app).manager

    @manager.handler(HANDLER)
    def tree(context):
        """The children of one level of the plan: earlier siblings as dependencies, a plan of their own as kwargs."""
        tag, plan = context.parent.kwargs["tag"], context.parent.kwargs["plan"]
        made = []
        for node in plan["children"]:
            kwargs: dict[str, Any] = {"tag": tag, "pause": node["pause"]}
            if node["plan"]:
                kwargs.update(plan=node["plan"])
                kwargs[SPAWN_CONFIG_KWARG] = spawn_config(context.app, tag, node["plan"])
            sig = context.app.signature(NODE, kwargs=kwargs)
            context.freeze(sig)
            if node["after"]:
                depends_on(sig, *(made[index] for index in node["after"]))
            made.append(sig)
        return made

    retry = {"autoretry_for": (StoreError,), "retry_kwargs": {"max_retries": STORE_RETRIES, "countdown": 1}}

    @app.task(shared=False, name=ROOT, base=SpawnTask, bind=True, spawn_config=SpawnConfig(max_spawn_count=100),
              **retry)
    def root(self, tag, plan):
        return len(plan["children"])

    @app.task(shared=False, name=NODE, base=SpawnTask, bind=True, **retry)
    def node(self, tag, pause, plan=None):
        history.write(tag, self.request.id, history.START)
        if pause:
            time.sleep(pause)
        return pause

    @app.task(shared=False, name=CALLBACK, bind=True)
    def callback(self, summary, tag):
        # A plain task: that it runs once, whatever the broker delivers, is celery-spawn's to ensure.
        history.write(tag, summary["operation_id"], history.CALLBACK_START)
        return summary["operation_id"]

    return app


@celery_signals.task_success.connect(weak=False)
def _record_success(sender=None, result=None, **_: Any) -> None:
    """In the pool process, after Celery stored the result: the history's ``succeeded`` or ``callback`` row."""
    if sender is None or sender.name not in (NODE, CALLBACK):
        return
    kwargs = sender.request.kwargs or {}
    if sender.name == NODE:
        history.write(kwargs["tag"], sender.request.id, history.SUCCEEDED)
    else:
        history.write(kwargs["tag"], result, history.CALLBACK)


def _from_environment() -> Celery:
    timeout = os.environ.get("SPAWN_TEST_VISIBILITY_TIMEOUT")
    return make_chaos_app(**settings_from_environment(), visibility_timeout=float(timeout) if timeout else None)


app = _from_environment()
