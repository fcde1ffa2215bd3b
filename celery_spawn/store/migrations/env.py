"""Alembic environment: runs on the connection celery-spawn hands over."""
from alembic import context

from celery_spawn.store.migrations import VERSION_TABLE
from celery_spawn.store.schema import metadata

connection = context.config.attributes["connection"]
context.configure(connection=connection, target_metadata=metadata, version_table=VERSION_TABLE,
                  render_as_batch=connection.dialect.name == "sqlite")
with context.begin_transaction():
    context.run_migrations()
