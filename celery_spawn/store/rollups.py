"""The per-task rollups of complete operations (``spawn_task_rollups``), written in SQL from their children.

Used when an operation completes and by the migration that created the table,
so it depends on nothing but the schema and the dialects.
"""
from __future__ import annotations

import sqlalchemy as sa
from sqlalchemy.engine import Connection

from . import schema as s
from .dialects import dialect_of


def write_task_rollups(conn: Connection, which: sa.ColumnElement[bool]) -> None:
    """Insert the per-task rollups of the operations ``which`` selects (complete ones: every child final).

    One ``INSERT ... SELECT`` grouped by operation and task name; the
    children's rows never leave the database.
    """
    jobs, ops = s.jobs, s.operations
    timed, seconds, longest = dialect_of(conn).duration_aggregates(jobs.c.started_at, jobs.c.finished_at)
    rows = (
        sa.select(jobs.c.operation_id, jobs.c.task_name, ops.c.created_at, sa.func.count().label("jobs"),
                  sa.func.sum(sa.case((jobs.c.state == s.SUCCEEDED, 1), else_=0)).label("succeeded"),
                  sa.func.sum(sa.case((jobs.c.state == s.FAILED, 1), else_=0)).label("failed"),
                  timed.label("timed"), seconds.label("seconds"), longest.label("max_seconds"))
        .select_from(ops.join(jobs, jobs.c.operation_id == ops.c.id)).where(which)
        .group_by(jobs.c.operation_id, jobs.c.task_name, ops.c.created_at)
    )
    columns = ["operation_id", "task_name", "created_at", "jobs", "succeeded", "failed", "timed", "seconds",
               "max_seconds"]
    conn.execute(s.task_rollups.insert().from_select(columns, rows))
