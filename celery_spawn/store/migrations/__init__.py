"""Versioned migrations (Alembic), run programmatically: ``celery spawn migrate`` or on first use."""
from __future__ import annotations

import contextlib
from collections.abc import Iterator
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


#: Name (MySQL/MariaDB) and key (PostgreSQL) of the lock that lets one process at a time migrate a store.
LOCK_NAME = "celery_spawn_migrations"
LOCK_KEY = 0x5350_4157_4E00  # "SPAWN", a constant bigint for pg_advisory_lock
#: Seconds a process waits for another one's migration (MySQL's GET_LOCK takes a timeout).
LOCK_WAIT = 120


def upgrade(engine: sa.Engine, revision: str | None = None) -> str:
    """Upgrade to ``revision`` (default: head); safe when several processes race to create the tables.

    The processes take turns: on PostgreSQL an advisory lock, on MySQL/MariaDB a named lock (its DDL is
    not transactional, so a process could otherwise see half of another's tables), on SQLite the one
    writer. The ones that waited find the schema up to date.
    """
    from alembic import command

    head = revision or head_revision()
    if current_revision(engine) == head:
        return head
    with engine.connect() as lock_conn, _migration_lock(lock_conn):
        if current_revision(engine) == head:
            return head
        try:
            with engine.begin() as conn:
                command.upgrade(_config(conn), head)
        except sa.exc.DatabaseError:
            # Another process without the lock (an older version) may have created the tables meanwhile.
            if current_revision(engine) != head:
                raise
    return head


@contextlib.contextmanager
def _migration_lock(conn: sa.Connection) -> Iterator[None]:
    backend = conn.dialect.name
    release: tuple[sa.TextClause, dict[str, object]]
    if backend == "postgresql":
        conn.execute(sa.text("SELECT pg_advisory_lock(:key)"), {"key": LOCK_KEY})
        release = sa.text("SELECT pg_advisory_unlock(:key)"), {"key": LOCK_KEY}
    elif backend in ("mysql", "mariadb"):
        if not conn.execute(sa.text("SELECT GET_LOCK(:name, :wait)"), {"name": LOCK_NAME, "wait": LOCK_WAIT}).scalar():
            raise sa.exc.OperationalError("GET_LOCK", {}, TimeoutError(f"another migration held {LOCK_NAME}"))
        release = sa.text("SELECT RELEASE_LOCK(:name)"), {"name": LOCK_NAME}
    else:
        yield
        return
    conn.commit()
    try:
        yield
    finally:
        conn.execute(*release)
        conn.commit()
