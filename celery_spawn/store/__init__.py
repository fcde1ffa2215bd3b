"""The SQL lineage store: the only part of celery-spawn that knows SQL (tables, dialects, migrations).

:class:`SpawnStore` is its interface for the engine and the faces; the read
side for the faces is :mod:`celery_spawn.store.queries`, and
:mod:`celery_spawn.store.direct` reads a whole tree without SQLAlchemy.

The names below are loaded on first use, so that importing a module of the
package (``direct``, ``timeouts``) does not import SQLAlchemy with it.
"""
from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .base import SpawnStore
    from .cancels import Cancelled
    from .dialects import Finish, chunked
    from .engine import redact
    from .schema import utcnow
    from .timeouts import Timeouts
    from .transitions import Finished

#: Each public name and the module that defines it.
_HOMES = {
    "SpawnStore": ".base",
    "Cancelled": ".cancels",
    "Finish": ".dialects",
    "chunked": ".dialects",
    "redact": ".engine",
    "utcnow": ".schema",
    "Timeouts": ".timeouts",
    "Finished": ".transitions",
}

__all__ = ["Cancelled", "Finish", "Finished", "SpawnStore", "Timeouts", "chunked", "redact", "utcnow"]


def __getattr__(name: str) -> Any:
    home = _HOMES.get(name)
    if home is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(home, __name__), name)
    globals()[name] = value
    return value
