"""The project's Celery app and its spawn store, seen from Django: the app's settings are Django's
(``CELERY_SPAWN_*`` through Celery's ``CELERY`` namespace), its store a Django database by default."""
from __future__ import annotations

import os
import sys
from collections.abc import Iterable
from typing import TYPE_CHECKING, TextIO

from ...dburl import django_database_url
from ...settings import DEFAULT_DATABASE_ALIAS
from ...state import get_state

if TYPE_CHECKING:
    from celery import Celery

__all__ = ["celery_app", "database_url", "migrate_store", "run_command"]

#: Where Celery's Django guide configures the app from (``app.config_from_object(SETTINGS, namespace=...)``).
DJANGO_SETTINGS = "django.conf:settings"
#: The app made from Django's settings when the project's own app was never created in this process.
_made: dict[str, Celery] = {}


def _from_django(app: Celery) -> bool:
    source = getattr(app, "_config_source", None)
    if source == DJANGO_SETTINGS:
        return True
    from django.conf import settings

    return source is settings


def celery_app() -> Celery:
    """The project's Celery app: the one configured from Django's settings (Celery's Django guide,
    ``app.config_from_object('django.conf:settings', namespace='CELERY')``).

    When the process holds several, the current one (or one with spawning installed) wins; when it
    holds none, an app is made from Django's settings with the ``CELERY`` namespace, once.
    """
    from celery import _state

    # Celery's silent fallback app (named 'default') is never configured from Django's settings: left out.
    active: Iterable[Celery] = _state._get_active_apps()  # type: ignore[attr-defined]
    apps = [app for app in active if app is not _made.get("app") and _from_django(app)]
    current = getattr(getattr(_state, "_tls", None), "current_app", None)  # this thread's, if it set one
    for app in apps:
        if app is current:
            return app
    installed = [app for app in apps if _has_state(app)]
    for candidates in (installed, apps):
        if candidates:
            return sorted(candidates, key=lambda app: str(app.main))[0]
    if "app" not in _made:
        from celery import Celery

        app = Celery("django", set_as_current=False)
        app.config_from_object(DJANGO_SETTINGS, namespace="CELERY")
        _made["app"] = app
    return _made["app"]


def _has_state(app: Celery) -> bool:
    from ...state import peek_state

    return peek_state(app) is not None


def database_url(alias: str | None = None) -> str:
    """The SQLAlchemy URL of a Django database (``DATABASES[alias]``; by default the one the spawn store uses).

    The URL carries the password: never print it (``celery_spawn.dburl.mask_password`` masks it).
    """
    from django.conf import settings

    if alias is None:
        alias = get_state(celery_app()).settings.database_alias or DEFAULT_DATABASE_ALIAS
    return django_database_url(settings.DATABASES, alias)


def migrate_store(using: str | None = None, verbosity: int = 1, stdout: TextIO | None = None) -> str | None:
    """Create or upgrade the spawn tables (the project's Alembic revisions), as ``manage.py migrate`` does.

    ``using`` is the Django database ``migrate`` ran on: the store is migrated with the database that
    holds it (its alias, ``default`` when ``CELERY_SPAWN_DATABASE_URL`` names another database), and not
    at all with ``CELERY_SPAWN_DJANGO_MIGRATE = False``. Returns the revision, or None when it did nothing.
    """
    state = get_state(celery_app())
    state.reload()  # the settings again: Django's test runner renames the test database before it migrates
    settings = state.settings
    if not settings.django_migrate:
        if verbosity >= 2 and stdout is not None:
            stdout.write("  celery-spawn store not migrated (CELERY_SPAWN_DJANGO_MIGRATE is off)\n")
        return None
    if using is not None and using != (settings.database_alias or DEFAULT_DATABASE_ALIAS):
        return None
    store = state.store
    try:
        revision = store.migrate()
    finally:
        store.dispose()  # no connection stays open to a database Django may drop (a test database)
    if verbosity >= 1 and stdout is not None:
        stdout.write(f"  celery-spawn store {store.safe_url} is at revision {revision}\n")
    return revision


def run_command(args: list[str], prog_name: str = "manage.py spawn", no_color: bool = False) -> int:
    """Run ``celery spawn <args>`` with the project's app, as ``celery -A proj spawn <args>``; the exit code."""
    from celery.bin.base import CLIContext

    from ...cli import spawn

    obj = CLIContext(app=celery_app(), no_color=no_color, workdir=os.getcwd(), quiet=False)
    try:
        spawn.main(args=args, prog_name=prog_name, obj=obj, standalone_mode=True)
    except SystemExit as exc:
        code = exc.code
        if code is None:
            return 0
        if isinstance(code, int):
            return code
        print(code, file=sys.stderr)
        return 1
    return 0
