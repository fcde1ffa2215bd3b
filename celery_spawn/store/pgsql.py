"""The PostgreSQL statements of the hot tracking path, as SQL text: one statement per batch.

Each works on whole batches through ``unnest(arrays)``, so its text never
changes with the batch size and is compiled (or, with psycopg2, prepared)
once. :class:`~celery_spawn.store.dialects.PostgresDialect` runs them.
"""
from __future__ import annotations

import sqlalchemy as sa

from ..protocol import FINAL
from . import schema as s
from .prepared import PreparedStatement


def _final_list() -> str:
    return ", ".join(f"'{state}'" for state in FINAL)  # constants of the protocol, not user input


PG_FINISH = sa.text(f"""
    UPDATE {s.jobs.name} AS j
       SET state = v.state, error = v.error, finished_at = v.finished_at,
           started_at = COALESCE(j.started_at, v.started_at)
      FROM unnest(CAST(:ids AS varchar[]), CAST(:states AS varchar[]), CAST(:errors AS text[]),
                  CAST(:finished AS timestamp[]), CAST(:started AS timestamp[]))
           AS v(id, state, error, finished_at, started_at)
     WHERE j.id = v.id AND j.state NOT IN ({_final_list()})
 RETURNING j.id, j.operation_id
""")

PG_START = sa.text(f"""
    UPDATE {s.jobs.name} AS j
       SET state = '{s.STARTED}', started_at = v.started_at, worker = CAST(:worker AS varchar)
      FROM unnest(CAST(:ids AS varchar[]), CAST(:started AS timestamp[])) AS v(id, started_at)
     WHERE j.id = v.id AND j.state IN :startable
""").bindparams(sa.bindparam("startable", expanding=True))

#: After a ``met`` CTE (the dependency edges just satisfied, ``RETURNING job_id``): count them off their held
#: jobs, move the jobs with none left to ``pending`` (``released``), or straight to ``dispatched`` for those in
#: ``:published`` (published ahead, see :meth:`PostgresDialect.released_by`), and refresh the lease of the
#: operations of the pending ones where it is older than ``:lease_before`` (see :func:`lease_before`).
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

PG_RELEASE = sa.text(f"""
    WITH met AS (
        UPDATE {s.dependencies.name}
           SET satisfied = true
         WHERE depends_on_id = ANY(CAST(:done AS varchar[])) AND NOT satisfied
           AND (ignore_failure OR depends_on_id = ANY(CAST(:succeeded AS varchar[])))
     RETURNING job_id
    ), {_COUNT_OFF_AND_RELEASE}
    SELECT * FROM released
""")

PG_SUCCEED_AND_RELEASE = PreparedStatement("spawn_succeed_and_release", sa.text(f"""
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

#: The held dependents that successes of ``:ids`` will release: every unmet edge of theirs is on one of those
#: jobs, none final yet. The finishing rows and the dependents are locked (in that order, the order in which
#: the finishing statement updates them) until the transaction ends, so no duplicate finish, other release or
#: cancellation can act on them meanwhile. (``IS NOT DISTINCT FROM`` keeps the planner off the state index: with
#: few held rows in its statistics it would otherwise read every held row instead of the few dependents.)
PG_RELEASED_BY = PreparedStatement("spawn_released_by", sa.text(f"""
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
"""), {"ids": "varchar[]", "published": "varchar[]"})
