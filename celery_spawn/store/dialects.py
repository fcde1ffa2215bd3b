"""The statements that differ between PostgreSQL, MySQL/MariaDB and SQLite, chosen once per store.

:class:`Dialect` is the portable form, in SQLAlchemy Core: SQLite runs it
as it is. :class:`MySQLDialect` adds row locks that skip locked rows and its
``INSERT IGNORE``. :class:`PostgresDialect` replaces the hot tracking writes
with one statement each over ``unnest(arrays)`` (compiled once, whatever the
batch size), bulk inserts with ``COPY``, and adds the read that lets a
dependency hop publish its next step before it writes (see
:meth:`PostgresDialect.released_by`).

"Release" means one thing throughout: dependency edges on jobs that just
ended are marked satisfied and counted off their held dependents, and a
dependent with none left moves ``held -> pending`` (to be published).
"""
from __future__ import annotations

from datetime import datetime, timedelta
from typing import Any, Iterator, NamedTuple, Sequence

import sqlalchemy as sa
from sqlalchemy.engine import Connection

from . import schema as s
from .schema import utcnow
from .pgcopy import copy_rows, supports_copy
from .pgsql import PG_FINISH, PG_RELEASE, PG_RELEASED_BY, PG_START, PG_SUCCEED_AND_RELEASE

FINAL = tuple(sorted(s.FINAL_JOB_STATES))
#: Rows per statement at most (parameter limits, lock lists).
CHUNK = 500
#: Seconds a refreshed operation lease is left as it is (at most a tenth of the recovery grace).
LEASE_REFRESH = 1.0
#: The columns a released job is published from.
RELEASED_COLUMNS = ("id", "parent_id", "root_id", "message", "operation_id")


class Finish(NamedTuple):
    job_id: str
    state: str
    error: str | None
    finished_at: datetime
    #: The start, when it was never written (folded into this finish by the write-behind).
    started_at: datetime | None = None


def chunked(items: Sequence[Any], size: int = CHUNK) -> Iterator[Sequence[Any]]:
    """``items`` in slices of at most ``size``."""
    for start in range(0, len(items), size):
        yield items[start:start + size]


def lease_before(now: datetime, grace_seconds: float) -> datetime:
    """Refresh an operation's lease only when it is older than this.

    A release refreshes the lease of its operation so that the recovery sweep
    (which takes operations untouched for ``grace_seconds``) leaves the
    released children to the releaser. A lease younger than a tenth of the
    grace needs no refresh; refreshing it on every hop of a chain made a dead
    row version of the operation per hop, which every later hop's lookups
    walked past until a vacuum (hops grew 40% slower over 600 steps).
    """
    return now - timedelta(seconds=min(LEASE_REFRESH, grace_seconds / 10))


class Dialect:
    """Portable statements (SQLAlchemy Core); SQLite uses them as they are."""

    name = "sqlite"
    #: ``FOR UPDATE SKIP LOCKED``: several sweepers share the work instead of waiting on each other.
    skip_locked = False
    #: Whether a release may be read and locked before the finish that causes it is written.
    reads_releases_ahead = False

    # ---- statement forms ---------------------------------------------------------------------
    def insert_ignore(self, table: sa.Table) -> sa.Insert:
        """INSERT that skips rows whose primary key exists."""
        return table.insert().prefix_with("OR IGNORE")

    def for_update(self, query: sa.Select) -> sa.Select:
        """Lock the rows read, skipping those another caller holds, where the database can."""
        return query.with_for_update(skip_locked=True) if self.skip_locked else query

    def relax_commit(self, conn: Connection) -> None:
        """Let this transaction's commit skip waiting for the disk, where the database allows it."""

    def insert_jobs(self, conn: Connection, rows: Sequence[dict]) -> None:
        for chunk in chunked(rows):
            conn.execute(s.jobs.insert(), list(chunk))

    #: Whether big reads are streamed from the server (rows arrive while Python works on the first).
    streams_reads = False

    def delete_tree_edges(self, conn: Connection, roots: Sequence[str]) -> int:
        """Delete the dependency edges from or to a job of the trees of ``roots`` (before their jobs go)."""
        deps = s.dependencies
        deleted = 0
        for chunk in chunked(roots):
            for column in (deps.c.job_id, deps.c.depends_on_id):  # two statements: each one an index's
                deleted += conn.execute(self._delete_edges_on(column, chunk)).rowcount or 0
        return deleted

    def _delete_edges_on(self, column: sa.Column, roots: Sequence[str]) -> sa.Delete:
        """Delete the edges whose ``column`` is a job of the trees of ``roots``: a semi-join."""
        of_trees = sa.select(s.jobs.c.id).where(s.jobs.c.root_id.in_(roots))
        return s.dependencies.delete().where(column.in_(of_trees))

    def seconds_between(self, start: Any, end: Any) -> sa.ColumnElement:
        """``end - start`` in seconds (float)."""
        return (sa.func.julianday(end) - sa.func.julianday(start)) * 86400.0

    def duration_aggregates(self, start: Any, end: Any) -> tuple[sa.ColumnElement, ...]:
        """Aggregates ``(count, sum, max)`` of ``end - start`` in seconds, over rows with both set.

        The per-row work is the cheapest difference each database has (a
        PostgreSQL interval, a MySQL integer of microseconds), computed twice,
        not three times: the count needs no arithmetic. The conversion to
        seconds is done once per group, not once per row.
        """
        diff = self.seconds_between(start, end)
        return _timed(start, end), sa.func.sum(diff), sa.func.max(diff)

    # ---- job transitions ---------------------------------------------------------------------
    def start_jobs(self, conn: Connection, starts: Sequence[tuple[str, datetime]], startable: Sequence[str],
                   worker: str | None = None) -> None:
        """Mark jobs started at their own times by ``worker``, where their state is one of ``startable``."""
        for chunk in chunked(starts):
            conn.execute(
                s.jobs.update().where(s.jobs.c.id == sa.bindparam("b_id"),
                                      sa.or_(*(s.jobs.c.state == state for state in startable)))
                .values(state=s.STARTED, started_at=sa.bindparam("b_started", type_=s.TIMESTAMP),
                        worker=sa.bindparam("b_worker", type_=s.NAME)),
                [{"b_id": job, "b_started": at, "b_worker": worker} for job, at in chunk],
            )

    def finish_jobs(self, conn: Connection, finishes: Sequence[Finish]) -> dict[str, str | None]:
        """Apply each finish to a job not yet final; returns ``{job id: operation id}`` of the jobs moved."""
        won: dict[str, str | None] = {}
        for chunk in chunked(finishes):
            live = dict(conn.execute(
                sa.select(s.jobs.c.id, s.jobs.c.operation_id)
                .where(s.jobs.c.id.in_([f.job_id for f in chunk]), s.jobs.c.state.notin_(FINAL)).with_for_update()
            ).all())
            moving = [f for f in chunk if f.job_id in live]
            if moving:
                conn.execute(
                    s.jobs.update().where(s.jobs.c.id == sa.bindparam("b_id"),
                                          *(s.jobs.c.state != state for state in FINAL))
                    .values(state=sa.bindparam("b_state"), error=sa.bindparam("b_error"),
                            finished_at=sa.bindparam("b_finished", type_=s.TIMESTAMP),
                            started_at=sa.func.coalesce(s.jobs.c.started_at,
                                                        sa.bindparam("b_started", type_=s.TIMESTAMP))),
                    [{"b_id": f.job_id, "b_state": f.state, "b_error": f.error, "b_finished": f.finished_at,
                      "b_started": f.started_at} for f in moving],
                )
            won.update((f.job_id, live[f.job_id]) for f in moving)
        return won

    def release(self, conn: Connection, succeeded: Sequence[str], ended: Sequence[str],
                grace_seconds: float) -> list[dict]:
        """Release the held dependents of finished jobs; returns the rows of those now ``pending``.

        ``ended`` jobs (failed, revoked, cancelled) count only for dependents
        that ignore their failure; the others were cancelled already. The
        operations of released dependents get their lease refreshed, so that
        the recovery sweep leaves those pending rows to the caller to publish.
        """
        released = self._satisfy(conn, succeeded, only_ignoring=False) if succeeded else []
        if ended:
            released += self._satisfy(conn, ended, only_ignoring=True)
        return self._claim_released(conn, released, grace_seconds)

    def _satisfy(self, conn: Connection, done_ids: Sequence[str], only_ignoring: bool) -> list[str]:
        """Mark edges on ``done_ids`` satisfied and count them off their dependents; returns those."""
        query = sa.select(s.dependencies.c.job_id).where(
            s.dependencies.c.depends_on_id.in_(done_ids), s.dependencies.c.satisfied.is_(False))
        if only_ignoring:
            query = query.where(s.dependencies.c.ignore_failure.is_(True))
        dependents = list(conn.execute(query).scalars())
        if not dependents:
            return []
        edges = s.dependencies.update().where(
            s.dependencies.c.depends_on_id.in_(done_ids), s.dependencies.c.job_id.in_(dependents),
            s.dependencies.c.satisfied.is_(False))
        if only_ignoring:
            edges = edges.where(s.dependencies.c.ignore_failure.is_(True))
        conn.execute(edges.values(satisfied=True))
        for job in sorted(dependents):  # one row each, in a fixed order: a job may wait on several of done_ids
            conn.execute(
                s.jobs.update().where(s.jobs.c.id == job, s.jobs.c.state == s.HELD)
                .values(pending_deps=s.jobs.c.pending_deps - 1)
            )
        return dependents

    def _claim_released(self, conn: Connection, candidates: Sequence[str], grace_seconds: float) -> list[dict]:
        """Held jobs whose last dependency is met become pending: exactly one caller wins each."""
        won: list[str] = []
        for job in dict.fromkeys(candidates):
            changed = conn.execute(
                s.jobs.update().where(s.jobs.c.id == job, s.jobs.c.state == s.HELD, s.jobs.c.pending_deps <= 0)
                .values(state=s.PENDING)
            ).rowcount
            if changed:
                won.append(job)
        if not won:
            return []
        rows = [dict(r) for r in conn.execute(
            sa.select(*(s.jobs.c[c] for c in RELEASED_COLUMNS)).where(s.jobs.c.id.in_(won))
        ).mappings()]
        operations = sorted({r["operation_id"] for r in rows if r["operation_id"]})
        if operations:
            now = utcnow()
            conn.execute(s.operations.update().where(s.operations.c.id.in_(operations),
                                                     s.operations.c.updated_at < lease_before(now, grace_seconds))
                         .values(updated_at=now))
        return rows

    # ---- publishing ahead (PostgreSQL only) --------------------------------------------------
    def succeeds_in_one_statement(self, finishes: int, marks: int, all_succeeded: bool) -> bool:
        """Whether :meth:`succeed_and_release` takes this batch."""
        return False

    def released_by(self, conn: Connection, succeeding: Sequence[str], published: Sequence[str] = ()) -> list[dict]:
        """The rows the successes of ``succeeding`` will release, locked (only where ``reads_releases_ahead``)."""
        return []

    def succeed_and_release(self, conn: Connection, finishes: Sequence[Finish], marks: Sequence[str],
                            grace_seconds: float, published: Sequence[str]
                            ) -> tuple[dict[str, str | None], list[dict]]:
        raise RuntimeError(f"{self.name} finishes and releases in several statements: use finish_and_release")



def _timed(start: Any, end: Any) -> sa.ColumnElement:
    """How many rows have both timestamps (no arithmetic)."""
    return sa.func.count(sa.case((start.isnot(None), end)))


class MySQLDialect(Dialect):
    """MySQL and MariaDB: skip-locked sweeps, ``INSERT IGNORE``, streamed reads."""

    name = "mysql"
    skip_locked = True
    #: mysqlclient otherwise receives and converts every row before the first one is used.
    streams_reads = True

    def insert_ignore(self, table: sa.Table) -> sa.Insert:
        return table.insert().prefix_with("IGNORE")

    def _delete_edges_on(self, column: sa.Column, roots: Sequence[str]) -> sa.Delete:
        # a join: MariaDB runs a DELETE with an IN (subquery) as a scan of the table it deletes from
        return s.dependencies.delete().where(column == s.jobs.c.id, s.jobs.c.root_id.in_(roots))

    def seconds_between(self, start: Any, end: Any) -> sa.ColumnElement:
        return self._microseconds(start, end) / 1000000.0

    def duration_aggregates(self, start: Any, end: Any) -> tuple[sa.ColumnElement, ...]:
        diff = self._microseconds(start, end)
        return _timed(start, end), sa.func.sum(diff) / 1000000.0, sa.func.max(diff) / 1000000.0

    @staticmethod
    def _microseconds(start: Any, end: Any) -> sa.ColumnElement:
        return sa.func.timestampdiff(sa.literal_column("MICROSECOND"), start, end)


class PostgresDialect(Dialect):
    """PostgreSQL: one statement per tracking batch, ``COPY`` for job rows, releases read ahead."""

    name = "postgresql"
    skip_locked = True
    reads_releases_ahead = True

    def insert_ignore(self, table: sa.Table) -> sa.Insert:
        from sqlalchemy.dialects.postgresql import insert

        return insert(table).on_conflict_do_nothing()

    def relax_commit(self, conn: Connection) -> None:
        conn.exec_driver_sql("SET LOCAL synchronous_commit TO OFF")

    def seconds_between(self, start: Any, end: Any) -> sa.ColumnElement:
        return sa.extract("epoch", end - start)

    def duration_aggregates(self, start: Any, end: Any) -> tuple[sa.ColumnElement, ...]:
        diff = end - start
        return _timed(start, end), sa.extract("epoch", sa.func.sum(diff)), sa.extract("epoch", sa.func.max(diff))

    def insert_jobs(self, conn: Connection, rows: Sequence[dict]) -> None:
        """One ``COPY`` on psycopg2 (not on cooperative connections, which refuse it), else INSERTs."""
        if supports_copy(conn):
            copy_rows(conn, s.jobs, rows)
        else:
            super().insert_jobs(conn, rows)

    def start_jobs(self, conn: Connection, starts: Sequence[tuple[str, datetime]], startable: Sequence[str],
                   worker: str | None = None) -> None:
        for chunk in chunked(starts):
            conn.execute(PG_START, {"ids": [job for job, _ in chunk], "started": [at for _, at in chunk],
                                     "startable": list(startable), "worker": worker})

    def finish_jobs(self, conn: Connection, finishes: Sequence[Finish]) -> dict[str, str | None]:
        won: dict[str, str | None] = {}
        for chunk in chunked(finishes):
            rows = conn.execute(PG_FINISH, {
                "ids": [f.job_id for f in chunk], "states": [f.state for f in chunk],
                "errors": [f.error for f in chunk], "finished": [f.finished_at for f in chunk],
                "started": [f.started_at for f in chunk]}).all()
            won.update((row.id, row.operation_id) for row in rows)
        return won

    def release(self, conn: Connection, succeeded: Sequence[str], ended: Sequence[str],
                grace_seconds: float) -> list[dict]:
        now = utcnow()
        rows = conn.execute(PG_RELEASE, {"done": [*succeeded, *ended], "succeeded": list(succeeded), "ids": [],
                                          "published": [], "now": now,
                                          "lease_before": lease_before(now, grace_seconds)}).mappings()
        return [{k: row[k] for k in RELEASED_COLUMNS} for row in rows if row["state"] == s.PENDING]

    def succeeds_in_one_statement(self, finishes: int, marks: int, all_succeeded: bool) -> bool:
        return all_succeeded and finishes <= CHUNK and marks <= CHUNK

    def released_by(self, conn: Connection, succeeding: Sequence[str], published: Sequence[str] = ()) -> list[dict]:
        """What lets a dependency hop publish its next step before it writes anything.

        The caller publishes these rows, then passes their ids as ``published``
        to :meth:`succeed_and_release` in the same transaction, which marks
        them dispatched instead of returning them. ``published`` here leaves
        out the ids a failed earlier attempt already published.
        """
        rows = PG_RELEASED_BY.execute(conn, {"ids": list(succeeding), "published": list(published)}).mappings()
        return [dict(row) for row in rows]

    def succeed_and_release(self, conn: Connection, finishes: Sequence[Finish], marks: Sequence[str] = (),
                            grace_seconds: float = 60.0, published: Sequence[str] = ()
                            ) -> tuple[dict[str, str | None], list[dict]]:
        """One round trip for a batch of successes: finish them, release their held dependents, and return
        ``({job id: operation id} moved, rows of dependents now pending)``.

        ``marks``, children published earlier, are marked dispatched by the same
        statement (not those it finishes: a row is updated once per statement);
        so are the dependents in ``published`` (published ahead, see
        :meth:`released_by`) when it releases them, and they are not returned.
        """
        now = utcnow()
        rows = PG_SUCCEED_AND_RELEASE.execute(conn, {
            "ids": [f.job_id for f in finishes], "finished": [f.finished_at for f in finishes],
            "started": [f.started_at for f in finishes], "marks": list(marks), "published": list(published),
            "now": now, "lease_before": lease_before(now, grace_seconds)}).mappings().all()
        won = {row["id"]: row["operation_id"] for row in rows if row["won"]}
        released = [{k: row[k] for k in RELEASED_COLUMNS} for row in rows if not row["won"]]
        return won, released



_DIALECTS = {"postgresql": PostgresDialect(), "mysql": MySQLDialect(), "mariadb": MySQLDialect()}
_PORTABLE = Dialect()


def dialect_for(backend: str) -> Dialect:
    """The dialect object of a SQLAlchemy backend name (they hold no state: one each)."""
    return _DIALECTS.get(backend, _PORTABLE)


def dialect_of(conn: Connection) -> Dialect:
    """The dialect object of a connection (for the read queries, which take a connection)."""
    return dialect_for(conn.dialect.name)
