"""The ``celery spawn`` command group (registered through the ``celery.commands`` entry point).

Kept light: every ``celery`` invocation, ``worker`` included, imports this
package, so SQLAlchemy, the store and the renderers are imported inside the
commands. What the CLI shares with the web face (store resolution, the id
grammar, exit codes, options) is :mod:`celery_spawn.options`.
"""
from __future__ import annotations

from ..options import JOB_ID, RET_NOT_FOUND, RET_OK, RET_STORE, RET_USAGE, open_store, store_options
from . import manage, reads  # noqa: F401  (their commands join the group)
from .group import spawn

__all__ = ["JOB_ID", "RET_NOT_FOUND", "RET_OK", "RET_STORE", "RET_USAGE", "open_store", "spawn", "store_options"]


def main() -> None:  # pragma: no cover - `python -m celery_spawn.cli` without Celery's root command
    spawn(prog_name="celery spawn")


if __name__ == "__main__":  # pragma: no cover
    main()
