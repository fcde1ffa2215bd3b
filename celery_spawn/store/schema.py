"""The lineage store's tables (SQLAlchemy Core).

Lineage is plain indexed columns (``parent_id``, ``root_id``, ``depth``) and
an edge table for dependencies, so that trees are recursive CTEs over an index
and stats are aggregates over an index: nothing scans JSON.
"""
from __future__ import annotations

from datetime import datetime

import sqlalchemy as sa
from sqlalchemy.dialects import mysql

from .clock import utcnow as server_now

# The states live in the protocol module; re-exported here for the store's own code.
from ..protocol import (  # noqa: F401
    CALLBACK_ENDED, CALLBACK_FAILED, CALLBACK_LOST, CALLBACK_PENDING, CALLBACK_SENT, CALLBACK_STARTABLE,
    CALLBACK_STARTED, CALLBACK_WAITING, CANCELLED, CHILD_COUNT_COLUMNS, DISPATCHED, FAILED, LOST,
    FINAL_JOB_STATES, HELD, JOB_STATES, OP_CANCELLED, OP_FAILED, OP_PARTIALLY_FAILED, OP_RUNNING, OP_SUCCEEDED,
    OPERATION_STATES, PENDING, RETRYING, REVOKED, SCHEDULED, STARTED, SUCCEEDED, UNDISPATCHED_JOB_STATES,
)

metadata = sa.MetaData()

ID = sa.String(64)
NAME = sa.String(255)
#: Serialised messages and errors can exceed MySQL's 64 KiB TEXT.
LONG_TEXT = sa.Text().with_variant(mysql.LONGTEXT(), "mysql", "mariadb")
#: Timestamps are naive UTC with microseconds (MySQL's DATETIME drops them unless asked).
TIMESTAMP = sa.DateTime().with_variant(mysql.DATETIME(fsp=6), "mysql", "mariadb")


def utcnow() -> datetime:
    """Now, naive UTC as stored, on the database server's clock (see :mod:`.clock`)."""
    return server_now()


operations = sa.Table(
    "spawn_operations",
    metadata,
    sa.Column("id", ID, primary_key=True),
    # The caller's ``operation_id``: a label that several spawns may share (a periodic task's fixed
    # name). The first spawn with a label gets it as its id; later ones get ``label~hash`` ids.
    sa.Column("label", ID, nullable=True),
    sa.Column("parent_id", ID, nullable=False),
    sa.Column("root_id", ID, nullable=False),
    sa.Column("parent_task", NAME, nullable=True),
    sa.Column("handler", NAME, nullable=True),
    sa.Column("queue", NAME, nullable=True),
    sa.Column("depth", sa.Integer, nullable=False, default=0),
    sa.Column("state", sa.String(24), nullable=False),
    sa.Column("total", sa.Integer, nullable=False, default=0),
    # Publishing progress of the children recorded straight as ``dispatched`` (those without dependency
    # edges): each of them at a position up to this one reached the broker. NULL: none is in flight.
    sa.Column("published_through", sa.Integer, nullable=True),
    sa.Column("config", LONG_TEXT, nullable=True),
    sa.Column("error", LONG_TEXT, nullable=True),
    sa.Column("on_complete", LONG_TEXT, nullable=True),
    sa.Column("wait_for_descendants", sa.Boolean, nullable=False, default=False),
    sa.Column("fail_fast", sa.Boolean, nullable=False, default=False),
    sa.Column("completed", sa.Boolean, nullable=False, default=False),
    sa.Column("callback_state", sa.String(16), nullable=True),
    # The ``on_complete`` run (CALLBACK_WAITING ... CALLBACK_LOST; NULL: none sent yet, or sent by a version
    # before claims), who claimed its start (``hostname/pid``), and how many times it was published.
    sa.Column("callback_run", sa.String(16), nullable=True),
    sa.Column("callback_worker", NAME, nullable=True),
    sa.Column("callback_sends", sa.Integer, nullable=False, default=0, server_default="0"),
    sa.Column("created_at", TIMESTAMP, nullable=False),
    sa.Column("updated_at", TIMESTAMP, nullable=False),
    sa.Column("finished_at", TIMESTAMP, nullable=True),
    # The children's rollup, written with ``completed`` by the worker that completes the operation (their
    # states and times never change again): a count per final state (CHILD_COUNT_COLUMNS), how many have
    # both started_at and finished_at, and the sum and maximum of finished_at - started_at in seconds, so
    # that stats read one row per operation instead of one per child. NULL: no rollup (the operation is
    # not complete, or was completed without one, e.g. by a store-only cancel); stats count its children.
    *(sa.Column(name, sa.Integer, nullable=True) for name in CHILD_COUNT_COLUMNS.values()),
    sa.Column("children_timed", sa.Integer, nullable=True),
    sa.Column("children_seconds", sa.Double, nullable=True),
    sa.Column("children_max_seconds", sa.Double, nullable=True),
    sa.Index("ix_spawn_operations_parent", "parent_id"),
    sa.Index("ix_spawn_operations_created", "created_at"),
    sa.Index("ix_spawn_operations_queue_created", "queue", "created_at"),
    sa.Index("ix_spawn_operations_state_updated", "state", "updated_at"),
    sa.Index("ix_spawn_operations_callback", "callback_state", "updated_at"),
    # callbacks sent and never started, for the sweep that sends again what the broker lost
    sa.Index("ix_spawn_operations_callback_run", "callback_run", "updated_at"),
    # the operations of a label, newest first (tree/cancel/list --operation LABEL)
    sa.Index("ix_spawn_operations_label_created", "label", "created_at"),
    # the trees whose operations all finished before a cutoff (purge: group by root, max finished_at)
    sa.Index("ix_spawn_operations_root_finished", "root_id", "finished_at"),
)

jobs = sa.Table(
    "spawn_jobs",
    metadata,
    sa.Column("id", ID, primary_key=True),
    sa.Column("parent_id", ID, nullable=True),
    sa.Column("root_id", ID, nullable=False),
    sa.Column("operation_id", ID, nullable=True),
    sa.Column("position", sa.Integer, nullable=False, default=0),
    sa.Column("depth", sa.Integer, nullable=False, default=0),
    sa.Column("task_name", NAME, nullable=False),
    sa.Column("queue", NAME, nullable=True),
    sa.Column("priority", sa.Integer, nullable=True),
    sa.Column("state", sa.String(24), nullable=False),
    sa.Column("pending_deps", sa.Integer, nullable=False, default=0),
    sa.Column("retries", sa.Integer, nullable=False, default=0),
    sa.Column("message", LONG_TEXT, nullable=True),
    sa.Column("error", LONG_TEXT, nullable=True),
    sa.Column("created_at", TIMESTAMP, nullable=False),
    sa.Column("dispatched_at", TIMESTAMP, nullable=True),
    sa.Column("started_at", TIMESTAMP, nullable=True),
    sa.Column("finished_at", TIMESTAMP, nullable=True),
    # A ``scheduled`` child's due time (``spawn_delay``): the store holds it until then, not a worker.
    sa.Column("not_before", TIMESTAMP, nullable=True),
    # Who claimed its start (``hostname/pid``), so a copy of its message can tell whether it still runs.
    sa.Column("worker", NAME, nullable=True),
    # How many times the recovery sweep sent it again (a message the broker lost); past a limit: ``lost``.
    sa.Column("redeliveries", sa.Integer, nullable=False, default=0, server_default="0"),
    # Every index here is paid for by each spawned row (and each state change), so each one serves a query:
    # children by parent and the recursive walks below a job
    sa.Index("ix_spawn_jobs_parent", "parent_id"),
    # a whole tree from its top: one range on root_id, cut by depth (queries.spawn_tree)
    sa.Index("ix_spawn_jobs_root_depth", "root_id", "depth"),
    # an operation's children in spawn order: publishing pages, range marks, listings
    sa.Index("ix_spawn_jobs_operation_position", "operation_id", "position"),
    # completion probes (does this operation still have an unfinished child?) and, covering, the count
    # and durations of an operation's children per state: the rollup written when it completes and the
    # stats of operations without one. The timestamps change with the state, which moves the entry anyway
    sa.Index("ix_spawn_jobs_operation_state", "operation_id", "state", "started_at", "finished_at"),
    # jobs by state and age (pending, the recovery sweep, detailed stats per task) and, covering, the
    # undispatched children per operation (queries.pending)
    sa.Index("ix_spawn_jobs_state_created", "state", "created_at", "operation_id"),
    # scheduled children by due time, for the worker that publishes them; where the database can, only
    # scheduled rows are in it, so other rows pay nothing for it
    sa.Index("ix_spawn_jobs_scheduled_due", "state", "not_before",
             postgresql_where=sa.text("state = 'scheduled'"), sqlite_where=sa.text("state = 'scheduled'")),
)

dependencies = sa.Table(
    "spawn_dependencies",
    metadata,
    sa.Column("job_id", ID, primary_key=True),
    sa.Column("depends_on_id", ID, primary_key=True),
    sa.Column("ignore_failure", sa.Boolean, nullable=False, default=False),
    sa.Column("satisfied", sa.Boolean, nullable=False, default=False),
    sa.Index("ix_spawn_dependencies_depends_on", "depends_on_id"),
)

#: Per task name, the children of a complete operation: what ``stats --detailed`` breaks down by task,
#: written with the operation's own rollup (the same snapshot, the same guarantees: every child is final,
#: so the row never goes stale) and deleted with the operation.
task_rollups = sa.Table(
    "spawn_task_rollups",
    metadata,
    sa.Column("operation_id", ID, primary_key=True),
    sa.Column("task_name", NAME, primary_key=True),
    sa.Column("created_at", TIMESTAMP, nullable=False),  # the operation's: the stats window is on it
    sa.Column("jobs", sa.Integer, nullable=False),
    sa.Column("succeeded", sa.Integer, nullable=False),
    sa.Column("failed", sa.Integer, nullable=False),
    sa.Column("timed", sa.Integer, nullable=False),
    sa.Column("seconds", sa.Double, nullable=True),
    sa.Column("max_seconds", sa.Double, nullable=True),
    sa.Index("ix_spawn_task_rollups_created", "created_at"),
)
