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
    #: The roots, in order, that :meth:`Retention.delete_trees` has yet to delete (or to look at).
    remaining: list[str] = dataclasses.field(default_factory=list)


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
        """Of ``roots``, those with an unfinished job, or with a job an unfinished job of another tree needs.

        A tree's jobs are its operations' children and the jobs no operation
        spawned: its top, at depth 0. The children are looked up per operation
        in the index on (operation_id, state), which holds the answer, and the
        top in the index on (root_id, depth): a few rows are read per tree,
        where reading its jobs by root would read every one.
        """
        jobs, deps, ops = s.jobs, s.dependencies, s.operations
        live: set[str] = set()
        for chunk in chunked(list(roots)):
            live.update(conn.execute(
                sa.select(ops.c.root_id).select_from(ops.join(jobs, jobs.c.operation_id == ops.c.id))
                .where(ops.c.root_id.in_(chunk), jobs.c.state.in_(NON_FINAL)).distinct()
            ).scalars())
            # The tops' states are read and judged here: with the states in the WHERE, PostgreSQL may pick the
            # (state, created_at) index from stale statistics and filter millions of unfinished rows (1 s a batch
            # beside a spawn load, measured), where (root_id, depth) gives the few rows wanted.
            live.update(root for root, state in conn.execute(
                sa.select(jobs.c.root_id, jobs.c.state).where(jobs.c.root_id.in_(chunk), jobs.c.depth == 0))
                if state in NON_FINAL)
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
        """Delete the next whole trees of ``roots``, up to ``batch_size`` jobs, in one transaction.

        The batch is the trees, in the database's order of ``roots``, whose
        jobs all fit in ``batch_size``: they go by ``root_id``, with their
        edges, operations and rollups. When the first tree alone is larger, the
        batch is its ``batch_size`` deepest jobs instead, and the tree keeps its
        operations (it stays a finished tree) until a later call takes its last
        jobs. The trees are checked again inside the transaction, and a tree
        that came alive or finished too recently is left whole. Returns what
        went, with the roots still to go in ``remaining``.
        """
        jobs = s.jobs
        deleted = Deleted()
        with self.begin() as conn:
            self.dialect.relax_commit(conn)  # a batch lost in a crash comes back: the next purge takes it
            # the next batch_size + 1 jobs' roots, in the database's order: one index-only range that stops there
            seen = list(conn.execute(sa.select(jobs.c.root_id).where(jobs.c.root_id.in_(roots))
                                     .order_by(jobs.c.root_id).limit(batch_size + 1)).scalars())
            oversized = False
            if len(seen) <= batch_size:
                candidates = list(roots)  # every tree of roots fits: the jobless ones too
            else:
                candidates = list(dict.fromkeys(seen))[:-1]  # the last one is cut by the limit: not whole
                if not candidates:  # one tree bigger than a batch: its deepest jobs
                    candidates, oversized = [seen[0]], True
            still = self._still_expired(conn, candidates, cutoff)
            taken = set(candidates)
            deleted.remaining = [root for root in roots if root not in taken]
            if not still:
                return deleted
            if oversized:
                return self._delete_deepest(conn, still[0], batch_size, deleted)
            deleted.edges += self.dialect.delete_tree_edges(conn, still)
            for chunk in chunked(still):
                deleted.jobs += conn.execute(jobs.delete().where(jobs.c.root_id.in_(chunk))).rowcount or 0
            self._delete_operations(conn, still, deleted)
        return deleted

    def _delete_deepest(self, conn: Connection, root: str, batch_size: int, deleted: Deleted) -> Deleted:
        """The ``batch_size`` deepest jobs of a tree too big for one batch; its operations with its last jobs."""
        jobs, deps = s.jobs, s.dependencies
        # deepest first: the index on (root_id, depth) read backwards, stopped by the LIMIT
        ids = list(conn.execute(sa.select(jobs.c.id).where(jobs.c.root_id == root)
                                .order_by(jobs.c.depth.desc()).limit(batch_size)).scalars())
        for chunk in chunked(ids, DELETE_CHUNK):
            deleted.edges += conn.execute(deps.delete().where(
                sa.or_(deps.c.job_id.in_(chunk), deps.c.depends_on_id.in_(chunk)))).rowcount or 0
            deleted.jobs += conn.execute(jobs.delete().where(jobs.c.id.in_(chunk))).rowcount or 0
        if conn.execute(sa.select(jobs.c.id).where(jobs.c.root_id == root).limit(1)).first() is None:
            self._delete_operations(conn, [root], deleted)
        else:
            deleted.remaining.insert(0, root)
        return deleted

    def _delete_operations(self, conn: Connection, roots: Sequence[str], deleted: Deleted) -> None:
        """The operations and per-task rollups of trees whose jobs are gone: the trees are gone."""
        ops, rollups = s.operations, s.task_rollups
        for chunk in chunked(list(roots)):
            # the operations' ids first: MariaDB runs a DELETE with an IN (subquery) as a scan of the table
            op_ids = list(conn.execute(sa.select(ops.c.id).where(ops.c.root_id.in_(chunk))).scalars())
            for op_chunk in chunked(op_ids):
                conn.execute(rollups.delete().where(rollups.c.operation_id.in_(op_chunk)))
                deleted.operations += conn.execute(ops.delete().where(ops.c.id.in_(op_chunk))).rowcount or 0
        deleted.trees += len(roots)

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
