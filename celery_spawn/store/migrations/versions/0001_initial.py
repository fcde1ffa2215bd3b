"""Initial tables: operations, jobs, dependency edges.

Revision ID: 0001
Revises:
"""
from alembic import op

from celery_spawn.store.schema import dependencies, jobs, operations

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None

TABLES = (operations, jobs, dependencies)


def upgrade() -> None:
    bind = op.get_bind()
    for table in TABLES:
        table.create(bind, checkfirst=True)


def downgrade() -> None:
    bind = op.get_bind()
    for table in reversed(TABLES):
        table.drop(bind, checkfirst=True)
