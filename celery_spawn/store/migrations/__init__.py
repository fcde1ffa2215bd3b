"""Versioned migrations (Alembic), run programmatically: ``celery spawn migrate`` or on first use."""
from __future__ import annotations

from pathlib import Path

import sqlalchemy as sa

VERSION_TABLE = "spawn_alembic_version"
HERE = Path(__file__).resolve().parent


def _config(connection: sa.Connection):
    from alembic.config import Config

    config = Config()
    config.set_main_option("script_location", str(HERE))
    config.attributes["connection"] = connection
    return config


def current_revision(engine: sa.Engine) -> str | None:
    from alembic.runtime.migration import MigrationContext

    with engine.connect() as conn:
        context = MigrationContext.configure(conn, opts={"version_table": VERSION_TABLE})
        return context.get_current_revision()


def head_revision() -> str:
    """The newest revision shipped with this package.

    Raises :class:`RuntimeError` when there is none: an install without its
    ``versions/`` files would otherwise "upgrade" to nothing and leave the
    store without tables.
    """
    from alembic.script import ScriptDirectory

    with sa.create_engine("sqlite://").connect() as conn:
        head = ScriptDirectory.from_config(_config(conn)).get_current_head()
    if head is None:
        raise RuntimeError(f"celery-spawn is installed without its migrations: no revision in {HERE / 'versions'}")
    return head


def upgrade(engine: sa.Engine, revision: str | None = None) -> str:
    """Upgrade to ``revision`` (default: head); safe when several processes race to create the tables."""
    from alembic import command

    head = revision or head_revision()
    if current_revision(engine) == head:
        return head
    try:
        with engine.begin() as conn:
            command.upgrade(_config(conn), head)
    except sa.exc.DatabaseError:
        # Another process may have created the tables between our check and our DDL.
        if current_revision(engine) != head:
            raise
    return head
