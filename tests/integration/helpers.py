"""Helpers of the integration tests: reading the store, running ``celery spawn``, spawning workflows.

The fixtures they go with are in ``tests/conftest.py`` and ``tests/integration/conftest.py``.
"""
from __future__ import annotations

import subprocess
import sys

import sqlalchemy as sa

from celery_spawn import get_state
from celery_spawn.cli import RET_OK
from celery_spawn.handlers import default_operation_id
from celery_spawn.store import schema as s
from tests.app import callbacks
from tests.harness import ROOT, wait_for

TIMEOUT = 90


def store_rows(app, table, **where):
    store = get_state(app).store
    query = sa.select(table)
    for column, value in where.items():
        query = query.where(table.c[column] == value)
    with store.read() as conn:
        return [dict(r) for r in conn.execute(query).mappings()]


def children_of(app, parent_id):
    return sorted(store_rows(app, s.jobs, parent_id=parent_id), key=lambda r: r["position"])


def wait_children(app, parent_id, count):
    return wait_for(lambda: len(children_of(app, parent_id)) == count and children_of(app, parent_id),
                    TIMEOUT, what=f"{count} children of {parent_id}")


def results_of(app, rows):
    return [app.AsyncResult(row["id"]).get(timeout=TIMEOUT) for row in rows]


# ---- ``celery spawn`` as a subprocess -------------------------------------------------------------
def run(env: dict, *args: str, app: str | None = "tests.app", cwd=ROOT, timeout: float = 60,
        global_args: tuple[str, ...] = ()) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "celery", *global_args, *(["-A", app] if app else []), "spawn", *args]
    return subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)


def ok(backend, *args: str, **kwargs) -> str:
    result = run(backend.env(), *args, **kwargs)
    assert result.returncode == RET_OK, f"{args} exited {result.returncode}:\n{result.stdout}\n{result.stderr}"
    assert "Traceback" not in result.stderr, result.stderr
    return result.stdout


def fails(backend_or_env, code: int, *args: str, **kwargs) -> str:
    env = backend_or_env if isinstance(backend_or_env, dict) else backend_or_env.env()
    result = run(env, *args, **kwargs)
    assert result.returncode == code, f"{args} exited {result.returncode}, not {code}:\n{result.stdout}{result.stderr}"
    assert "Traceback" not in result.stderr + result.stdout, result.stderr
    return result.stderr


# ---- operations, callbacks and the workflows that make them ---------------------------------------
def operation_of(app, parent_id):
    rows = store_rows(app, s.operations, id=default_operation_id(parent_id))
    return rows[0] if rows else {}


def wait_operation_done(app, parent_id, timeout=TIMEOUT):
    return wait_for(lambda: (op := operation_of(app, parent_id)).get("completed") and op, timeout,
                    what=f"operation of {parent_id} to complete")


def callback_rows(app, operation_id=None):
    query = sa.select(callbacks)
    if operation_id is not None:
        query = query.where(callbacks.c.operation_id == operation_id)
    with get_state(app).store.read() as conn:
        return [dict(r) for r in conn.execute(query).mappings()]


def on_complete(app, **extra):
    return {"on_complete": dict(app.signature("tests.record_callback")), **extra}


def run_diamond(app, config: dict) -> tuple[list[dict], dict, dict]:
    """Spawn the diamond A -> B, C -> D and wait: its child rows, its completed operation, results by step."""
    parent = app.signature("tests.spawner", kwargs={"_spawn_config": config}).delay()
    parent.get(timeout=TIMEOUT)
    rows = wait_children(app, parent.id, 4)
    operation = wait_operation_done(app, parent.id)
    assert operation["state"] == "succeeded"
    steps = {}
    for row in rows:
        value = app.AsyncResult(row["id"]).get(timeout=TIMEOUT)
        steps[value["step"]] = value
    return rows, operation, steps


def run_nested(app, levels: int, fanout: int) -> tuple[str, dict]:
    """Spawn a ``tests.nest`` tree whose top operation waits for its descendants; its parent id and callback row."""
    config = on_complete(app, handler="nested", wait_for_descendants=True)
    parent = app.signature("tests.nest", kwargs={"levels": levels, "fanout": fanout, "_spawn_config": config}).delay()
    parent.get(timeout=TIMEOUT)
    operation_id = default_operation_id(parent.id)
    [row] = wait_for(lambda: callback_rows(app, operation_id), TIMEOUT, what="callback")
    return parent.id, row


def read_lines(path) -> list[dict]:
    """The JSON lines a worker of :mod:`tests.observed_app` wrote to ``path`` (none yet: ``[]``)."""
    import json

    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return []
    return [json.loads(line) for line in text.splitlines() if line.strip()]
