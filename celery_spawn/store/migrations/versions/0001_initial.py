"""Initial tables: operations, jobs, dependency edges.

Revision ID: 0001
Revises:

The tables are spelled out as they were at this revision (not imported from
the current schema), so that later revisions can alter them.
"""
import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import mysql

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None

metadata = sa.MetaData()
ID = sa.String(64)
NAME = sa.String(255)
LONG_TEXT = sa.Text().with_variant(mysql.LONGTEXT(), "mysql", "mariadb")
TIMESTAMP = sa.DateTime().with_variant(mysql.DATETIME(fsp=6), "mysql", "mariadb")
CHILD_COUNT_COLUMNS = ("children_cancelled", "children_failed", "children_revoked", "children_succeeded")

operations = sa.Table(
    "spawn_operations",
    metadata,
    sa.Column("id", ID, primary_key=True),
    sa.Column("parent_id", ID, nullable=False),
    sa.Column("root_id", ID, nullable=False),
    sa.Column("parent_task", NAME, nullable=True),
    sa.Column("handler", NAME, nullable=True),
    sa.Column("queue", NAME, nullable=True),
    sa.Column("depth", sa.Integer, nullable=False, default=0),
    sa.Column("state", sa.String(24), nullable=False),
    sa.Column("total", sa.Integer, nullable=False, default=0),
    sa.Column("published_through", sa.Integer, nullable=True),
    sa.Column("config", LONG_TEXT, nullable=True),
    sa.Column("error", LONG_TEXT, nullable=True),
    sa.Column("on_complete", LONG_TEXT, nullable=True),
    sa.Column("wait_for_descendants", sa.Boolean, nullable=False, default=False),
    sa.Column("fail_fast", sa.Boolean, nullable=False, default=False),
    sa.Column("completed", sa.Boolean, nullable=False, default=False),
    sa.Column("callback_state", sa.String(16), nullable=True),
    sa.Column("created_at", TIMESTAMP, nullable=False),
    sa.Column("updated_at", TIMESTAMP, nullable=False),
    sa.Column("finished_at", TIMESTAMP, nullable=True),
    *(sa.Column(name, sa.Integer, nullable=True) for name in CHILD_COUNT_COLUMNS),
    sa.Column("children_timed", sa.Integer, nullable=True),
    sa.Column("children_seconds", sa.Double, nullable=True),
    sa.Column("children_max_seconds", sa.Double, nullable=True),
    sa.Index("ix_spawn_operations_parent", "parent_id"),
    sa.Index("ix_spawn_operations_created", "created_at"),
    sa.Index("ix_spawn_operations_queue_created", "queue", "created_at"),
    sa.Index("ix_spawn_operations_state_updated", "state", "updated_at"),
    sa.Index("ix_spawn_operations_callback", "callback_state", "updated_at"),
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
    sa.Index("ix_spawn_jobs_parent", "parent_id"),
    sa.Index("ix_spawn_jobs_root_depth", "root_id", "depth"),
    sa.Index("ix_spawn_jobs_operation_position", "operation_id", "position"),
    sa.Index("ix_spawn_jobs_operation_state", "operation_id", "state", "started_at", "finished_at"),
    sa.Index("ix_spawn_jobs_state_created", "state", "created_at", "operation_id"),
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

TABLES = (operations, jobs, dependencies)


def upgrade() -> None:
    bind = op.get_bind()
    for table in TABLES:
        table.create(bind, checkfirst=True)


def downgrade() -> None:
    bind = op.get_bind()
    for table in reversed(TABLES):
        table.drop(bind, checkfirst=True)
