"""Many job state changes at once, each with its own values, in as few statements as the backend allows.

The write-behind hands over batches of starts and finishes. On PostgreSQL a
batch is one ``UPDATE ... FROM unnest(arrays)`` whose SQL never changes (so
it is compiled once and the batch size costs nothing to prepare); elsewhere
the rows are locked with one SELECT and updated with one executemany.
Finishing is guarded (``state`` not final) and reports the rows it moved,
so a duplicate finish changes nothing and its caller knows it lost.
"""
from __future__ import annotations

from datetime import datetime, timedelta
from typing import NamedTuple, Sequence

import sqlalchemy as sa
from sqlalchemy.engine import Connection

from . import schema as s
from .prepared import PreparedStatement
from .sql import utcnow

FINAL = tuple(sorted(s.FINAL_JOB_STATES))
#: Rows per statement at most (parameter limits, lock lists).
CHUNK = 500


class Finish(NamedTuple):
    job_id: str
    state: str
    error: str | None
    finished_at: datetime
    #: The start, when it was never written (folded into this finish by the write-behind).
    started_at: datetime | None = None


def _final_list() -> str:
    return ", ".join(f"'{state}'" for state in FINAL)  # constants of schema.py, not user input


_PG_FINISH = sa.text(f"""
    UPDATE {s.jobs.name} AS j
       SET state = v.state, error = v.error, finished_at = v.finished_at,
           started_at = COALESCE(j.started_at, v.started_at)
      FROM unnest(CAST(:ids AS varchar[]), CAST(:states AS varchar[]), CAST(:errors AS text[]),
                  CAST(:finished AS timestamp[]), CAST(:started AS timestamp[]))
           AS v(id, state, error, finished_at, started_at)
     WHERE j.id = v.id AND j.state NOT IN ({_final_list()})
 RETURNING j.id, j.operation_id
""")

_PG_START = sa.text(f"""
    UPDATE {s.jobs.name} AS j
       SET state = '{s.STARTED}', started_at = v.started_at
      FROM unnest(CAST(:ids AS varchar[]), CAST(:started AS timestamp[])) AS v(id, started_at)
     WHERE j.id = v.id AND j.state IN :startable
""").bindparams(sa.bindparam("startable", expanding=True))


def finish_jobs(conn: Connection, finishes: Sequence[Finish]) -> dict[str, str | None]:
    """Apply each finish to a job not yet final; returns ``{job id: operation id}`` of the jobs moved."""
    won: dict[str, str | None] = {}
    for start in range(0, len(finishes), CHUNK):
        chunk = finishes[start:start + CHUNK]
        if conn.dialect.name == "postgresql":
            rows = conn.execute(_PG_FINISH, {
                "ids": [f.job_id for f in chunk], "states": [f.state for f in chunk],
                "errors": [f.error for f in chunk], "finished": [f.finished_at for f in chunk],
                "started": [f.started_at for f in chunk]}).all()
            won.update((row.id, row.operation_id) for row in rows)
        else:
            won.update(_finish_locked(conn, chunk))
    return won


def _finish_locked(conn: Connection, chunk: Sequence[Finish]) -> dict[str, str | None]:
    live = dict(conn.execute(
        sa.select(s.jobs.c.id, s.jobs.c.operation_id)
        .where(s.jobs.c.id.in_([f.job_id for f in chunk]), s.jobs.c.state.notin_(FINAL)).with_for_update()
    ).all())
    moving = [f for f in chunk if f.job_id in live]
    if moving:
        conn.execute(
            s.jobs.update().where(s.jobs.c.id == sa.bindparam("b_id"), *(s.jobs.c.state != state for state in FINAL))
            .values(state=sa.bindparam("b_state"), error=sa.bindparam("b_error"),
                    finished_at=sa.bindparam("b_finished", type_=s.TIMESTAMP),
                    started_at=sa.func.coalesce(s.jobs.c.started_at, sa.bindparam("b_started", type_=s.TIMESTAMP))),
            [{"b_id": f.job_id, "b_state": f.state, "b_error": f.error, "b_finished": f.finished_at,
              "b_started": f.started_at} for f in moving],
        )
    return {f.job_id: live[f.job_id] for f in moving}


def start_jobs(conn: Connection, starts: Sequence[tuple[str, datetime]], startable: Sequence[str]) -> None:
    """Mark jobs started at their own times, where their state is one of ``startable``."""
    for begin in range(0, len(starts), CHUNK):
        chunk = starts[begin:begin + CHUNK]
        if conn.dialect.name == "postgresql":
            conn.execute(_PG_START, {"ids": [job for job, _ in chunk], "started": [at for _, at in chunk],
                                     "startable": list(startable)})
        else:
            conn.execute(
                s.jobs.update().where(s.jobs.c.id == sa.bindparam("b_id"),
                                      sa.or_(*(s.jobs.c.state == state for state in startable)))
                .values(state=s.STARTED, started_at=sa.bindparam("b_started", type_=s.TIMESTAMP)),
                [{"b_id": job, "b_started": at} for job, at in chunk],
            )


#: After a ``met`` CTE (the dependency edges just satisfied, ``RETURNING job_id``): count them off their held
#: jobs, move the jobs with none left to ``pending`` (``released``), or straight to ``dispatched`` for those in
#: ``:published`` (published ahead, see :func:`released_by_pg`), and refresh the lease of the operations of the
#: pending ones where it is older than ``:lease_before`` (see :func:`lease_before`).
_COUNT_OFF_AND_RELEASE = f"""counted AS (
        SELECT job_id, count(*) AS n FROM met GROUP BY job_id
    ), released AS (
        UPDATE {s.jobs.name} AS j
           SET pending_deps = j.pending_deps - c.n,
               state = CASE WHEN j.pending_deps - c.n > 0 THEN j.state
                            WHEN j.id = ANY(CAST(:published AS varchar[])) THEN '{s.DISPATCHED}'
                            ELSE '{s.PENDING}' END,
               dispatched_at = CASE WHEN j.pending_deps - c.n <= 0 AND j.id = ANY(CAST(:published AS varchar[]))
                                    THEN :now ELSE j.dispatched_at END
          FROM counted AS c
         WHERE j.id = c.job_id AND j.state = '{s.HELD}' AND NOT (j.id = ANY(CAST(:ids AS varchar[])))
     RETURNING j.id, j.state, j.parent_id, j.root_id, j.message, j.operation_id
    ), leased AS (
        UPDATE {s.operations.name} SET updated_at = :now
         WHERE id IN (SELECT operation_id FROM released WHERE state = '{s.PENDING}') AND updated_at < :lease_before
    )"""


_PG_RELEASE = sa.text(f"""
    WITH met AS (
        UPDATE {s.dependencies.name}
           SET satisfied = true
         WHERE depends_on_id = ANY(CAST(:done AS varchar[])) AND NOT satisfied
           AND (ignore_failure OR depends_on_id = ANY(CAST(:succeeded AS varchar[])))
     RETURNING job_id
    ), {_COUNT_OFF_AND_RELEASE}
    SELECT * FROM released
""")


#: Seconds a refreshed operation lease is left as it is (at most a tenth of the recovery grace).
LEASE_REFRESH = 1.0


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


def release_dependents_pg(conn: Connection, succeeded: Sequence[str], ended: Sequence[str],
                          grace_seconds: float) -> list[dict]:
    """PostgreSQL, one statement: count the met edges of ``succeeded`` (and the failure-ignoring edges of
    ``ended``) off their held dependents; returns those whose last dependency was met, now ``pending``."""
    now = utcnow()
    rows = conn.execute(_PG_RELEASE, {"done": [*succeeded, *ended], "succeeded": list(succeeded), "ids": [],
                                      "published": [], "now": now,
                                      "lease_before": lease_before(now, grace_seconds)}).mappings()
    return [{k: v for k, v in row.items() if k != "state"} for row in rows if row["state"] == s.PENDING]


_PG_SUCCEED_AND_RELEASE = PreparedStatement("spawn_succeed_and_release", sa.text(f"""
    WITH done AS (
        UPDATE {s.jobs.name} AS j
           SET state = '{s.SUCCEEDED}', error = NULL, finished_at = v.finished_at,
               started_at = COALESCE(j.started_at, v.started_at)
          FROM unnest(CAST(:ids AS varchar[]), CAST(:finished AS timestamp[]), CAST(:started AS timestamp[]))
               AS v(id, finished_at, started_at)
         WHERE j.id = v.id AND j.state NOT IN ({_final_list()})
     RETURNING j.id, j.operation_id
    ), met AS (
        UPDATE {s.dependencies.name}
           SET satisfied = true
         WHERE depends_on_id IN (SELECT id FROM done) AND NOT satisfied
     RETURNING job_id
    ), marked AS (
        UPDATE {s.jobs.name} SET state = '{s.DISPATCHED}', dispatched_at = :now
         WHERE id = ANY(CAST(:marks AS varchar[])) AND state = '{s.PENDING}'
           AND NOT (id = ANY(CAST(:ids AS varchar[])))
    ), {_COUNT_OFF_AND_RELEASE}
    SELECT true AS won, id, operation_id, CAST(NULL AS varchar) AS parent_id, CAST(NULL AS varchar) AS root_id,
           CAST(NULL AS text) AS message
      FROM done
    UNION ALL
    SELECT false, id, operation_id, parent_id, root_id, message FROM released WHERE state = '{s.PENDING}'
"""), {"ids": "varchar[]", "finished": "timestamp[]", "started": "timestamp[]", "marks": "varchar[]",
       "published": "varchar[]", "now": "timestamp", "lease_before": "timestamp"})


def succeed_and_release_pg(conn: Connection, finishes: Sequence[Finish], marks: Sequence[str] = (),
                           grace_seconds: float = 60.0, published: Sequence[str] = ()
                           ) -> tuple[dict[str, str | None], list[dict]]:
    """PostgreSQL, one round trip for a batch of successes: finish them, count them off their held
    dependents, and return ``({job id: operation id} moved, rows of dependents now pending)``.

    The operations of released dependents get their lease refreshed, so that
    the recovery sweep leaves those pending rows to this caller to publish.
    ``marks``, children published earlier, are marked dispatched by the same
    statement (not those it finishes: a row is updated once per statement);
    so are the dependents in ``published`` (published ahead of this statement,
    see :func:`released_by_pg`) when it releases them, and they are not returned."""
    now = utcnow()
    rows = _PG_SUCCEED_AND_RELEASE.execute(conn, {
        "ids": [f.job_id for f in finishes], "finished": [f.finished_at for f in finishes],
        "started": [f.started_at for f in finishes], "marks": list(marks), "published": list(published),
        "now": now, "lease_before": lease_before(now, grace_seconds)}).mappings().all()
    won = {row["id"]: row["operation_id"] for row in rows if row["won"]}
    released = [{k: row[k] for k in ("id", "parent_id", "root_id", "message", "operation_id")}
                for row in rows if not row["won"]]
    return won, released


#: The held dependents that successes of ``:ids`` will release: every unmet edge of theirs is on one of those
#: jobs, none final yet. The finishing rows and the dependents are locked (in that order, the order in which
#: the finishing statement updates them) until the transaction ends, so no duplicate finish, other release or
#: cancellation can act on them meanwhile. (``IS NOT DISTINCT FROM`` keeps the planner off the state index: with
#: few held rows in its statistics it would otherwise read every held row instead of the few dependents.)
_PG_RELEASED_BY = sa.text(f"""
    WITH finishing AS (
        SELECT id FROM {s.jobs.name}
         WHERE id = ANY(CAST(:ids AS varchar[])) AND state NOT IN ({_final_list()})
           FOR UPDATE
    ), counted AS (
        SELECT d.job_id, count(*) AS n
          FROM {s.dependencies.name} AS d JOIN finishing AS f ON d.depends_on_id = f.id
         WHERE NOT d.satisfied
         GROUP BY d.job_id
    )
    SELECT j.id, j.parent_id, j.root_id, j.message, j.operation_id
      FROM {s.jobs.name} AS j JOIN counted AS c ON j.id = c.job_id
     WHERE j.state IS NOT DISTINCT FROM '{s.HELD}' AND j.pending_deps = c.n
       AND NOT (j.id = ANY(CAST(:published AS varchar[]))) AND NOT (j.id = ANY(CAST(:ids AS varchar[])))
       FOR UPDATE OF j
""")


def released_by_pg(conn: Connection, succeeding: Sequence[str], published: Sequence[str] = ()) -> list[dict]:
    """PostgreSQL: the rows of the held dependents that successes of ``succeeding`` will release, locked.

    This is what lets a dependency hop publish its next step before it writes
    anything: the caller publishes these rows, then passes their ids as
    ``published`` to :func:`succeed_and_release_pg` in the same transaction,
    which marks them dispatched instead of returning them. ``published``
    here leaves out the ids a failed earlier attempt already published.
    """
    rows = conn.execute(_PG_RELEASED_BY, {"ids": list(succeeding), "published": list(published)}).mappings()
    return [dict(row) for row in rows]
