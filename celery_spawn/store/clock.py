"""The store's clock: the database server's time, so that hosts whose clocks disagree still agree on ages.

Leases, grace periods, redelivery cutoffs, due times and ``--running-hours``
windows all compare a timestamp one process wrote with the time another
process reads. Taking both from each host's own clock lets a host whose clock
runs ahead see everyone's live work as stale. So every time the store writes
or compares is this process's clock corrected by its offset from the
database server's, measured on each new connection (``SELECT`` of the
server's time, halfway through the round trip) and again every
:data:`REMEASURE_SECONDS` on checkout. SQLite is on this host: no offset.
"""
from __future__ import annotations

import logging
import threading
import time
from datetime import datetime, timedelta, timezone
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Engine

logger = logging.getLogger("celery_spawn.store")

#: Seconds after which a checkout measures the offset again (clocks are stepped, and drift).
REMEASURE_SECONDS = 300.0
#: The server's time as seconds since the epoch, by dialect.
_SERVER_EPOCH = {
    "postgresql": "SELECT EXTRACT(EPOCH FROM clock_timestamp())",
    "mysql": "SELECT UNIX_TIMESTAMP(NOW(6))",
    "mariadb": "SELECT UNIX_TIMESTAMP(NOW(6))",
}


class _Offset:
    """Seconds to add to this host's clock to read the database server's (one per process)."""

    def __init__(self) -> None:
        self.seconds = 0.0
        self.measured_at: float | None = None  # time.monotonic() of the last measurement
        self._lock = threading.Lock()

    def set(self, seconds: float) -> None:
        with self._lock:
            self.seconds = seconds
            self.measured_at = time.monotonic()

    def stale(self) -> bool:
        return self.measured_at is None or time.monotonic() - self.measured_at > REMEASURE_SECONDS


OFFSET = _Offset()


def utcnow() -> datetime:
    """Now on the database server's clock: naive UTC, as stored."""
    return datetime.now(timezone.utc).replace(tzinfo=None) + timedelta(seconds=OFFSET.seconds)


def server_eta(seconds: float) -> datetime:
    """``seconds`` from now on the database server's clock (this host's, where it was never measured): the
    ``eta`` of a message this process sends for later, which another host holds until then by its own
    clock. A ``countdown`` is dated by the sender's clock, so a host whose clock runs ahead would delay
    every retry it sends by as much."""
    return datetime.now(timezone.utc) + timedelta(seconds=OFFSET.seconds + seconds)


def hold_if_ahead(delay: float, longest: float = 5.0) -> None:
    """Wait out ``delay`` (at most ``longest`` seconds) here when this host's clock runs ahead of the server's
    by more than that: a message it sends with :func:`server_eta` is due at once by its own clock, and one
    that comes back to this host would run (or be looked at) straight away, again and again."""
    if -OFFSET.seconds > delay:
        time.sleep(min(delay, longest))


def offset_seconds() -> float:
    """How far the database server's clock is ahead of this host's (negative: behind), as last measured."""
    return OFFSET.seconds


def measure(dbapi_connection: Any, dialect: str) -> float | None:
    """Measure the server's clock on a raw DBAPI connection and keep the offset; None if it cannot."""
    statement = _SERVER_EPOCH.get(dialect)
    if statement is None:
        return None
    cursor = dbapi_connection.cursor()
    try:
        before = time.time()
        cursor.execute(statement)
        server = float(cursor.fetchone()[0])
        after = time.time()
    except Exception as exc:  # a measurement never breaks a connection: the last offset stays
        logger.debug("the database server's clock could not be read: %s", exc)
        return None
    finally:
        try:
            cursor.close()
            dbapi_connection.rollback()  # end the transaction the SELECT began (drivers without autocommit)
        except Exception:
            pass
    offset = server - (before + after) / 2
    if abs(offset - OFFSET.seconds) > 1.0:
        logger.info("the database server's clock is %+.1f s from this host's: the store uses the server's", offset)
    OFFSET.set(offset)
    return offset


def follow_server_clock(engine: Engine) -> None:
    """Measure the server's clock on every new connection of ``engine``, and on checkout when stale."""
    dialect = engine.dialect.name
    if dialect not in _SERVER_EPOCH:
        return

    @sa.event.listens_for(engine, "connect")
    def _on_connect(dbapi_connection: Any, _record: Any) -> None:
        measure(dbapi_connection, dialect)

    @sa.event.listens_for(engine, "checkout")
    def _on_checkout(dbapi_connection: Any, _record: Any, _proxy: Any) -> None:
        if OFFSET.stale():
            measure(dbapi_connection, dialect)
