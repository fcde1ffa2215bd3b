"""Retention: finding the trees whose operations all finished before a cutoff.

Revision ID: 0003
Revises: 0002

``purge`` groups operations by ``root_id`` and keeps the roots whose
operations all have a ``finished_at`` older than the cutoff; this index
answers that from the index alone.
"""
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_index("ix_spawn_operations_root_finished", "spawn_operations", ["root_id", "finished_at"])


def downgrade() -> None:
    op.drop_index("ix_spawn_operations_root_finished", table_name="spawn_operations")
