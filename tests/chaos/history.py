"""What the explorer's tasks say they did, kept apart from celery-spawn's store.

Workers write one row per event to ``chaos_history`` in a database of its own
on the store's server, reached directly (never through the proxy the store
is cut with), autocommitted, one connection per write:

* ``start``: a child's body began (a child killed and run again has several);
* ``succeeded``: Celery stored the child's result (written from ``task_success``,
  which fires after the result backend holds the success);
* ``callback-start`` and ``callback``: the same for an ``on_complete`` callback
  (its row's ``job_id`` is the operation id).
"""
from __future__ import annotations

import os
import socket
import time

import sqlalchemy as sa

#: The history database's SQLAlchemy URL, in the workers' environment.
HISTORY_URL_ENV = "SPAWN_CHAOS_HISTORY_URL"

START = "start"
SUCCEEDED = "succeeded"
CALLBACK_START = "callback-start"
CALLBACK = "callback"

history = sa.Table(
    "chaos_history", sa.MetaData(),
    sa.Column("tag", sa.String(64), nullable=False, index=True),
    sa.Column("job_id", sa.String(64), nullable=False),
    sa.Column("event", sa.String(16), nullable=False),
    sa.Column("host", sa.String(64)),
    sa.Column("pid", sa.Integer),
    sa.Column("at", sa.Double, nullable=False),
)

_engine: tuple[int, sa.Engine] | None = None


def engine_for(url: str) -> sa.Engine:
    return sa.create_engine(url, poolclass=sa.NullPool, isolation_level="AUTOCOMMIT")


def _engine_here() -> sa.Engine:
    """This process's engine (a forked pool process builds its own)."""
    global _engine
    if _engine is None or _engine[0] != os.getpid():
        url = os.environ.get(HISTORY_URL_ENV)
        if not url:
            raise RuntimeError(f"{HISTORY_URL_ENV} is not set: the chaos tasks have nowhere to write their history")
        _engine = (os.getpid(), engine_for(url))
    return _engine[1]


def write(tag: str, job_id: str, event: str, attempts: int = 5) -> None:
    """Append one row, now; a failed write is tried again (the history database is never cut)."""
    row = {"tag": tag, "job_id": job_id, "event": event, "host": socket.gethostname()[:64], "pid": os.getpid(),
           "at": time.time()}
    for attempt in range(attempts):
        try:
            with _engine_here().connect() as conn:
                conn.execute(history.insert(), [row])
            return
        except sa.exc.OperationalError:
            if attempt == attempts - 1:
                raise
            time.sleep(0.2)


def create(url: str) -> None:
    engine = engine_for(url)
    try:
        history.create(engine, checkfirst=True)
    finally:
        engine.dispose()


def read(engine: sa.Engine, tag: str) -> list[dict]:
    """Every row of one schedule, oldest first."""
    with engine.connect() as conn:
        query = sa.select(history).where(history.c.tag == tag).order_by(history.c.at)
        return [dict(r) for r in conn.execute(query).mappings()]
