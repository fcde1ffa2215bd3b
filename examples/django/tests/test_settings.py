"""CELERY_SPAWN_* settings flow through Celery's Django namespace; the store is Django's (test) database."""
from __future__ import annotations

import io

import pytest
from celery.exceptions import ImproperlyConfigured
from django.conf import settings
from django.core.management import call_command
from django.test import override_settings

from celery_spawn import get_state
from celery_spawn.contrib.django import celery_app, database_url, migrate_store


def test_the_project_app_is_found(app):
    assert celery_app() is app


def test_celery_spawn_settings_come_from_django_settings(app):
    assert settings.CELERY_SPAWN_DEFAULT_MAX_SPAWN_COUNT == 500
    assert get_state(app).settings.default_max_spawn_count == 500


def test_the_store_is_django_default_database_the_test_one(app, spawn_store):
    name = str(settings.DATABASES["default"]["NAME"])
    assert "test" in name  # pytest-django's test database, not the project's
    assert spawn_store.safe_url.endswith(name)
    assert get_state(app).settings.database_url == database_url() == database_url("default")
    password = settings.DATABASES["default"].get("PASSWORD")
    if password:
        assert password not in spawn_store.safe_url and password not in repr(get_state(app).settings)


@pytest.mark.django_db
def test_another_alias_is_named_and_checked(app):
    try:
        with override_settings(CELERY_SPAWN_DATABASE_ALIAS="reports"):
            with pytest.raises(ImproperlyConfigured, match="'reports' is not in Django's DATABASES"):
                get_state(app).reload()
    finally:
        get_state(app).reload()
    assert get_state(app).settings.database_alias is None


@pytest.mark.django_db
def test_migrate_brings_the_store_up_to_date_unless_turned_off(app):
    out = io.StringIO()
    call_command("migrate", stdout=out, verbosity=1)
    assert "celery-spawn store" in out.getvalue() and "is at revision" in out.getvalue()
    try:
        with override_settings(CELERY_SPAWN_DJANGO_MIGRATE=False):
            assert migrate_store(using="default") is None
            out = io.StringIO()
            call_command("migrate", stdout=out, verbosity=1)
            assert "celery-spawn store" not in out.getvalue()
    finally:
        get_state(app).reload()
    assert migrate_store(using="other-database") is None  # only with the database that holds the store
    assert migrate_store(using="default") == spawn_revision(app)


def spawn_revision(app) -> str:
    return get_state(app).store.revision()


@pytest.mark.django_db
def test_the_django_migrations_match_the_models():
    call_command("makemigrations", "celery_spawn", "--check", "--dry-run", verbosity=0)
