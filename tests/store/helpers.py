"""Rows for the store contract suite: whole operation and job rows, written straight into the tables.

Every row carries every column (the same keys), so it fits ``insert_jobs`` too. Values reach SQL only
as bound parameters (SQLAlchemy Core).
"""
from __future__ import annotations

from datetime import datetime, timedelta
from typing import Any, Iterable

import sqlalchemy as sa

from celery_spawn.store import schema as s
from celery_spawn.store import utcnow


def ago(seconds: float) -> datetime:
    """Naive UTC ``seconds`` before now."""
    return utcnow() - timedelta(seconds=seconds)


def op_row(op_id: str, parent: str = "root", *, state: str = s.OP_RUNNING, total: int = 0,
           created: datetime | None = None, **over: Any) -> dict:
    """A whole ``spawn_operations`` row."""
    now = created or utcnow()
    row = {
        "id": op_id, "label": None, "parent_id": parent, "root_id": parent, "parent_task": "tests.parent",
        "handler": "h", "queue": "q", "depth": 0, "state": state, "total": total, "published_through": -1,
        "config": None, "error": None, "on_complete": None, "wait_for_descendants": False, "fail_fast": False,
        "completed": state != s.OP_RUNNING, "callback_state": None, "created_at": now, "updated_at": now,
        "finished_at": None,
    }
    row.update(over)
    return row


def job_row(job_id: str, operation: str | None = "op", *, parent: str | None = "root", root: str = "root",
            position: int = 0, state: str = s.PENDING, created: datetime | None = None, **over: Any) -> dict:
    """A whole ``spawn_jobs`` row (``message`` names the job)."""
    row = {
        "id": job_id, "parent_id": parent, "root_id": root, "operation_id": operation, "position": position,
        "depth": 1 if parent else 0, "task_name": "tests.child", "queue": "q", "priority": None, "state": state,
        "pending_deps": 0, "retries": 0, "message": f'{{"id": "{job_id}"}}', "error": None,
        "created_at": created or utcnow(), "dispatched_at": None, "started_at": None, "finished_at": None,
    }
    row.update(over)
    return row


def edge(job_id: str, depends_on: str, *, ignore_failure: bool = False, satisfied: bool = False) -> dict:
    return {"job_id": job_id, "depends_on_id": depends_on, "ignore_failure": ignore_failure, "satisfied": satisfied}


def seed(store, operations: Iterable[dict] = (), jobs: Iterable[dict] = (), edges: Iterable[dict] = ()) -> None:
    """Insert rows with plain INSERTs (not through the store methods under test)."""
    with store.begin() as conn:
        for table, rows in ((s.operations, list(operations)), (s.jobs, list(jobs)), (s.dependencies, list(edges))):
            if rows:
                conn.execute(table.insert(), rows)


def set_job(store, job_id: str, **values: Any) -> None:
    with store.begin() as conn:
        conn.execute(s.jobs.update().where(s.jobs.c.id == job_id).values(**values))


def set_operation(store, op_id: str, **values: Any) -> None:
    with store.begin() as conn:
        conn.execute(s.operations.update().where(s.operations.c.id == op_id).values(**values))


def job(store, job_id: str) -> dict | None:
    with store.read() as conn:
        return store.get_job(conn, job_id)


def operation(store, op_id: str) -> dict | None:
    with store.read() as conn:
        return store.get_operation(conn, op_id)


def states(store, *ids: str) -> dict[str, str]:
    with store.read() as conn:
        return store.job_states(conn, ids)


def edges_of(store, job_id: str) -> dict[str, tuple[bool, bool]]:
    """``{dependency: (ignore_failure, satisfied)}`` of a job's edges."""
    with store.read() as conn:
        rows = conn.execute(sa.select(s.dependencies).where(s.dependencies.c.job_id == job_id)).mappings()
        return {r["depends_on_id"]: (bool(r["ignore_failure"]), bool(r["satisfied"])) for r in rows}
