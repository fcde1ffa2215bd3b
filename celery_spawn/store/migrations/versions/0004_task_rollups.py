"""Task rollups: ``stats --detailed`` per task name without reading the children of complete operations.

Revision ID: 0004
Revises: 0003

A complete operation with a rollup (its ``children_timed`` is set) gets one
row per task name of its children, filled here from the children themselves.
"""
import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import mysql

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None


def upgrade() -> None:
    timestamp = sa.DateTime().with_variant(mysql.DATETIME(fsp=6), "mysql", "mariadb")
    op.create_table(
        "spawn_task_rollups",
        sa.Column("operation_id", sa.String(64), primary_key=True),
        sa.Column("task_name", sa.String(255), primary_key=True),
        sa.Column("created_at", timestamp, nullable=False),
        sa.Column("jobs", sa.Integer, nullable=False),
        sa.Column("succeeded", sa.Integer, nullable=False),
        sa.Column("failed", sa.Integer, nullable=False),
        sa.Column("timed", sa.Integer, nullable=False),
        sa.Column("seconds", sa.Double, nullable=True),
        sa.Column("max_seconds", sa.Double, nullable=True),
    )
    op.create_index("ix_spawn_task_rollups_created", "spawn_task_rollups", ["created_at"])
    from celery_spawn.store import schema
    from celery_spawn.store.rollups import write_task_rollups

    write_task_rollups(op.get_bind(), schema.operations.c.children_timed.isnot(None))

def downgrade() -> None:
    op.drop_index("ix_spawn_task_rollups_created", table_name="spawn_task_rollups")
    op.drop_table("spawn_task_rollups")
