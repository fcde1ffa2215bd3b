"""Callback claims: an ``on_complete`` starts once, and one the broker lost is sent again.

Revision ID: 0005
Revises: 0004

``callback_run`` follows a published callback's run (waiting, started, ended,
lost), ``callback_worker`` is who claimed its start, and ``callback_sends``
how many times it was published. Callbacks sent before this revision keep a
NULL run: nothing is sent again for them.
"""
import sqlalchemy as sa
from alembic import op

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column("spawn_operations", sa.Column("callback_run", sa.String(16), nullable=True))
    op.add_column("spawn_operations", sa.Column("callback_worker", sa.String(255), nullable=True))
    op.add_column("spawn_operations", sa.Column("callback_sends", sa.Integer, nullable=False, server_default="0"))
    op.create_index("ix_spawn_operations_callback_run", "spawn_operations", ["callback_run", "updated_at"])


def downgrade() -> None:
    op.drop_index("ix_spawn_operations_callback_run", table_name="spawn_operations")
    op.drop_column("spawn_operations", "callback_sends")
    op.drop_column("spawn_operations", "callback_worker")
    op.drop_column("spawn_operations", "callback_run")
