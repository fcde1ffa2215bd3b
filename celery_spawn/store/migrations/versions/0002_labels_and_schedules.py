"""Operation labels, scheduled children, and what recovery needs to send any child again.

Revision ID: 0002
Revises: 0001

``spawn_operations.label`` holds the caller's ``operation_id``, which several
spawns may now share; ``spawn_jobs.not_before`` holds a delayed child's due time;
``spawn_jobs.worker`` who claimed a start, ``spawn_jobs.redeliveries`` how often the
sweep sent a child again, and ``spawn_operations.children_lost`` the rollup of the
new ``lost`` state.
"""
import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import mysql

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None

TIMESTAMP = sa.DateTime().with_variant(mysql.DATETIME(fsp=6), "mysql", "mariadb")
SCHEDULED_ONLY = sa.text("state = 'scheduled'")


def upgrade() -> None:
    op.add_column("spawn_operations", sa.Column("label", sa.String(64), nullable=True))
    # Before this revision an explicit operation_id was the id itself: it becomes the label. A default
    # id is a uuid5 of the parent (36 characters with dashes, never chosen by hand in this form).
    op.execute(sa.text("UPDATE spawn_operations SET label = id "
                       "WHERE config IS NOT NULL AND config LIKE '%\"operation_id\": \"%'"))
    op.create_index("ix_spawn_operations_label_created", "spawn_operations", ["label", "created_at"])
    op.add_column("spawn_jobs", sa.Column("not_before", TIMESTAMP, nullable=True))
    op.add_column("spawn_jobs", sa.Column("worker", sa.String(255), nullable=True))
    op.add_column("spawn_jobs", sa.Column("redeliveries", sa.Integer, nullable=False, server_default="0"))
    op.add_column("spawn_operations", sa.Column("children_lost", sa.Integer, nullable=True))
    # Operations completed with a rollup count no lost child.
    op.execute(sa.text("UPDATE spawn_operations SET children_lost = 0 WHERE children_succeeded IS NOT NULL"))
    op.create_index("ix_spawn_jobs_scheduled_due", "spawn_jobs", ["state", "not_before"],
                    postgresql_where=SCHEDULED_ONLY, sqlite_where=SCHEDULED_ONLY)


def downgrade() -> None:
    op.drop_column("spawn_operations", "children_lost")
    op.drop_column("spawn_jobs", "redeliveries")
    op.drop_column("spawn_jobs", "worker")
    op.drop_index("ix_spawn_jobs_scheduled_due", table_name="spawn_jobs")
    op.drop_column("spawn_jobs", "not_before")
    op.drop_index("ix_spawn_operations_label_created", table_name="spawn_operations")
    op.drop_column("spawn_operations", "label")
