"""The app's configuration: ``manage.py migrate`` migrates the spawn store after Django's own tables."""
from __future__ import annotations

from typing import Any

from django.apps import AppConfig
from django.db.models.signals import post_migrate


class SpawnDjangoConfig(AppConfig):
    """celery-spawn in a Django project: the store's settings, migrations, admin and command."""

    name = "celery_spawn.contrib.django"
    label = "celery_spawn"
    verbose_name = "Celery spawn"

    def ready(self) -> None:
        post_migrate.connect(_migrate_store, sender=self, dispatch_uid="celery_spawn.migrate_store")


def _migrate_store(sender: AppConfig, using: str, verbosity: int = 1, stdout: Any = None, **_: Any) -> None:
    from .project import migrate_store

    migrate_store(using=using, verbosity=verbosity, stdout=stdout)
