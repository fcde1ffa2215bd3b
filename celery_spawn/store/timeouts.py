"""How long a store call may wait: the driver's and the server's own limits, set when a connection opens.

Pure (no SQLAlchemy): the engine applies them, and so does the direct read
of :mod:`.direct`, which connects with the driver alone.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any


@dataclasses.dataclass(frozen=True)
class Timeouts:
    """Seconds a store call may wait, each 0 for no limit: to connect, for one statement, for a row lock.

    PostgreSQL: libpq's ``connect_timeout``, and the session's ``statement_timeout`` and ``lock_timeout``
    (enforced by the server). MySQL/MariaDB: the client's ``connect_timeout`` and ``read_timeout`` /
    ``write_timeout`` (enforced by the client, so a server that never answers is bounded too), and
    ``innodb_lock_wait_timeout``. SQLite: the lock timeout is its busy timeout.
    """

    connect: float = 10.0
    statement: float = 60.0
    lock: float = 30.0

    def connect_args(self, backend: str) -> dict[str, Any]:
        """The DBAPI ``connect()`` arguments that apply them on ``backend``."""
        whole = {name: max(1, math.ceil(value)) for name, value in dataclasses.asdict(self).items() if value > 0}
        if backend == "sqlite":
            return {"timeout": self.lock if self.lock > 0 else 30.0}
        args: dict[str, Any] = {}
        if "connect" in whole:
            args["connect_timeout"] = whole["connect"]
        if backend == "postgresql":
            settings = [f"-c {name}_timeout={int(value * 1000)}"
                        for name, value in (("statement", self.statement), ("lock", self.lock)) if value > 0]
            if settings:
                args["options"] = " ".join(settings)
        elif backend in ("mysql", "mariadb"):
            if "statement" in whole:
                args["read_timeout"] = args["write_timeout"] = whole["statement"]
            if "lock" in whole:
                args["init_command"] = f"SET SESSION innodb_lock_wait_timeout = {whole['lock']}"
        return args
