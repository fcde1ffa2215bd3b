"""Recursive walks over the lineage columns, written once: down a subtree, up to the root.

Every walk is a recursive CTE over an index (``parent_id`` going down, the
primary key going up) with a ``level`` column counted from its start, so a
query can stop at a depth and say how far each row lies.
"""
from __future__ import annotations

import sqlalchemy as sa

from . import schema as s

_jobs = s.jobs


def down(start: sa.ColumnElement[bool], *, columns: tuple[str, ...] = ("id",), max_level: int | None = None,
         name: str = "spawn_down") -> sa.CTE:
    """The jobs matching ``start`` (level 0) and every job below them, down to ``max_level`` levels."""
    cols = [_jobs.c[c] for c in columns]
    tree = sa.select(*cols, sa.literal(0, sa.Integer).label("level")).where(start).cte(name, recursive=True)
    step = sa.select(*cols, (tree.c.level + 1).label("level")).join(tree, _jobs.c.parent_id == tree.c.id)
    if max_level is not None:
        step = step.where(tree.c.level < max_level)
    return tree.union_all(step)


def below_operation(operation_id: str, name: str = "spawn_operation_tree") -> sa.CTE:
    """An operation's children (level 0) and all their descendants."""
    return down(_jobs.c.operation_id == operation_id, name=name)


def below_job(job_id: str, name: str = "spawn_job_tree") -> sa.CTE:
    """A job's children (level 0) and all their descendants, the job itself left out."""
    return down(_jobs.c.parent_id == job_id, name=name)


def up(job_id: str, max_level: int, name: str = "spawn_up") -> sa.CTE:
    """The job (level 0) and its ancestors up to ``max_level``, over the primary key."""
    anchor = sa.select(_jobs.c.id, _jobs.c.parent_id, sa.literal(0, sa.Integer).label("level")).where(
        _jobs.c.id == job_id)
    chain = anchor.cte(name, recursive=True)
    step = (sa.select(_jobs.c.id, _jobs.c.parent_id, (chain.c.level + 1).label("level"))
            .join(chain, _jobs.c.id == chain.c.parent_id)
            .where(chain.c.level < max_level))
    return chain.union_all(step)
