"""The SQL lineage store: the only part of celery-spawn that knows SQL (tables, dialects, migrations).

:class:`SpawnStore` is its interface for the engine and the faces; the read
side for the faces is :mod:`celery_spawn.store.queries`.
"""
from .base import SpawnStore
from .cancels import Cancelled
from .dialects import Finish, chunked
from .engine import Timeouts, redact
from .schema import utcnow
from .transitions import Finished

__all__ = ["Cancelled", "Finish", "Finished", "SpawnStore", "Timeouts", "chunked", "redact", "utcnow"]
