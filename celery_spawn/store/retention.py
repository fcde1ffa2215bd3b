"""Retention: finding trees that finished long ago and deleting them, a short transaction at a time.

A *tree* is every operation and job that shares a ``root_id``. It may go when
every operation in it is complete, its last one finished before the cutoff,
none of its jobs is unfinished, and no unfinished job outside it depends on
one of its jobs. Mixed into :class:`~celery_spawn.store.SpawnStore`.
"""
from __future__ import annotations

import dataclasses
from datetime import datetime
from typing import Sequence

import sqlalchemy as sa
from sqlalchemy.engine import Connection

from ..protocol import NON_FINAL
from . import schema as s
from .connection import StoreBase
from .dialects import chunked

#: Roots examined per candidate query.
ROOT_PAGE = 500
#: Ids per DELETE statement of a purge batch (fewer, longer statements: a purge is throughput work).
DELETE_CHUNK = 2000


@dataclasses.dataclass
class Deleted:
    """Rows one purge step removed."""

    trees: int = 0
    operations: int = 0
    jobs: int = 0
    edges: int = 0

    def add(self, other: Deleted) -> None:
        self.trees += other.trees
        self.operations += other.operations
        self.jobs += other.jobs
        self.edges += other.edges


class Retention(StoreBase):
    """Expired trees: which ones, how big, and their deletion in batches."""

    def expired_roots(self, cutoff: datetime, limit: int = ROOT_PAGE,
                      after: str | None = None) -> tuple[list[str], str | None]:
        """The roots of a page of trees that finished before ``cutoff`` and may go, and the page's cursor.

        The page is the next ``limit`` roots in the database's order after
        ``after`` (the cursor of the page before; None: the first page) whose
        operations all finished before ``cutoff``: one aggregate over the index
        on (root_id, finished_at). Then the two vetoes for those roots: an
        unfinished job in the tree, an unfinished job elsewhere that depends
        on one of its jobs. The cursor is None after the last page.
        """
        ops = s.operations
        query = (sa.select(ops.c.root_id).group_by(ops.c.root_id)
                 .having(sa.func.count() == sa.func.count(ops.c.finished_at))
                 .having(sa.func.max(ops.c.finished_at) < cutoff)
                 .order_by(ops.c.root_id).limit(limit))
        if after is not None:
            query = query.where(ops.c.root_id > after)
        with self.read() as conn:
            roots = list(conn.execute(query).scalars())
            if not roots:
                return [], None
            vetoed = self._live_roots(conn, roots)
        return [root for root in roots if root not in vetoed], (roots[-1] if len(roots) == limit else None)

    def _live_roots(self, conn: Connection, roots: Sequence[str]) -> set[str]:
        """Of ``roots``, those with an unfinished job, or with a job an unfinished job of another tree needs."""
        jobs, deps = s.jobs, s.dependencies
        live: set[str] = set()
        for chunk in chunked(list(roots)):
            live.update(conn.execute(
                sa.select(jobs.c.root_id).where(jobs.c.root_id.in_(chunk), jobs.c.state.in_(NON_FINAL)).distinct()
            ).scalars())
            target, dependent = jobs.alias("target"), jobs.alias("dependent")
            live.update(conn.execute(
                sa.select(target.c.root_id)
                .select_from(deps.join(target, target.c.id == deps.c.depends_on_id)
                             .join(dependent, dependent.c.id == deps.c.job_id))
                .where(target.c.root_id.in_(chunk), dependent.c.root_id != target.c.root_id,
                       dependent.c.state.in_(NON_FINAL))
                .distinct()
            ).scalars())
        return live

    def tree_sizes(self, roots: Sequence[str]) -> tuple[int, int]:
        """(operations, jobs) in the trees of ``roots``: what purging them removes."""
        operations = jobs = 0
        with self.read() as conn:
            for chunk in chunked(list(roots)):
                operations += int(conn.execute(sa.select(sa.func.count()).select_from(s.operations)
                                               .where(s.operations.c.root_id.in_(chunk))).scalar() or 0)
                jobs += int(conn.execute(sa.select(sa.func.count()).select_from(s.jobs)
                                         .where(s.jobs.c.root_id.in_(chunk))).scalar() or 0)
        return operations, jobs

    def delete_trees(self, roots: Sequence[str], cutoff: datetime, batch_size: int) -> Deleted:
        """Delete up to ``batch_size`` jobs of the trees of ``roots`` in one transaction.

        The trees are checked again inside it (a tree that came alive or
        finished too recently is left whole). A tree's operations go in the
        transaction that deletes its last jobs; a tree larger than one batch
        loses its deepest jobs first, over several calls, and stays a finished
        tree until its operations go. Returns what went; ``jobs == 0`` with
        ``trees == 0`` means nothing of ``roots`` is left to delete.
        """
        jobs, ops, deps = s.jobs, s.operations, s.dependencies
        deleted = Deleted()
        with self.begin() as conn:
            still = self._still_expired(conn, roots, cutoff)
            if not still:
                return deleted
            # Deepest first, root by root; both descending, so that the index on (root_id, depth) read
            # backwards gives the order and the LIMIT stops the read (a mixed order sorts every row of the roots).
            rows = conn.execute(
                sa.select(jobs.c.id, jobs.c.root_id).where(jobs.c.root_id.in_(still))
                .order_by(jobs.c.root_id.desc(), jobs.c.depth.desc()).limit(batch_size)
            ).all()
            ids = [row[0] for row in rows]
            for chunk in chunked(ids, DELETE_CHUNK):
                deleted.edges += conn.execute(deps.delete().where(
                    sa.or_(deps.c.job_id.in_(chunk), deps.c.depends_on_id.in_(chunk)))).rowcount or 0
                deleted.jobs += conn.execute(jobs.delete().where(jobs.c.id.in_(chunk))).rowcount or 0
            if len(rows) < batch_size:
                done = list(still)  # every job of these trees is gone
            else:
                # rows come root by root: every root before the last is whole; the last may have more jobs,
                # and the roots after it were not reached. Trees keep their operations until their last job goes.
                touched = list(dict.fromkeys(row[1] for row in rows))
                last = touched.pop()
                if conn.execute(sa.select(jobs.c.id).where(jobs.c.root_id == last).limit(1)).first() is None:
                    touched.append(last)
                done = touched
            rollups = s.task_rollups
            for chunk in chunked(done):
                # the operations' ids first: MariaDB runs a DELETE with an IN (subquery) as a scan of the table
                op_ids = list(conn.execute(sa.select(ops.c.id).where(ops.c.root_id.in_(chunk))).scalars())
                for op_chunk in chunked(op_ids):
                    conn.execute(rollups.delete().where(rollups.c.operation_id.in_(op_chunk)))
                    deleted.operations += conn.execute(ops.delete().where(ops.c.id.in_(op_chunk))).rowcount or 0
            deleted.trees = len(done)
        return deleted

    def _still_expired(self, conn: Connection, roots: Sequence[str], cutoff: datetime) -> list[str]:
        """Of ``roots``, in order, those whose trees still may go (the checks of :meth:`expired_roots`)."""
        ops = s.operations
        finished: set[str] = set()
        for chunk in chunked(list(roots)):
            finished.update(conn.execute(
                sa.select(ops.c.root_id).where(ops.c.root_id.in_(chunk)).group_by(ops.c.root_id)
                .having(sa.func.count() == sa.func.count(ops.c.finished_at))
                .having(sa.func.max(ops.c.finished_at) < cutoff)
            ).scalars())
        live = self._live_roots(conn, [root for root in roots if root in finished])
        return [root for root in roots if root in finished and root not in live]
