"""celery-spawn's Django app: add ``"celery_spawn.contrib.django"`` to ``INSTALLED_APPS``.

- The store lives in a Django database (``DATABASES["default"]``, or the alias
  ``CELERY_SPAWN_DATABASE_ALIAS`` names) unless ``CELERY_SPAWN_DATABASE_URL`` is set.
- ``manage.py migrate`` brings the spawn tables up to date (``CELERY_SPAWN_DJANGO_MIGRATE = False``
  turns that off); ``manage.py spawn <command>`` runs ``celery spawn <command>``.
- The admin shows operations and jobs, read-only, and cancels trees.

Django imports this package before its settings are ready: the modules below import Django's
models only where they are used.
"""
from __future__ import annotations

from typing import Any

__all__ = ["celery_app", "database_url", "migrate_store", "run_command"]


def __getattr__(name: str) -> Any:
    if name in __all__:
        from . import project

        return getattr(project, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
