"""The store URL from Django's ``DATABASES``, and the settings that choose it, without Django itself.

``app.conf`` of an app configured from Django's settings answers ``DATABASES`` and ``INSTALLED_APPS`` as well
as the ``CELERY_SPAWN_*`` names: a plain dict stands for it here. The Django app itself is tested by
``examples/django`` (pytest-django, run by tests/integration/test_django_example.py).
"""
from __future__ import annotations

import logging

import pytest
import sqlalchemy as sa
from celery import Celery
from celery.exceptions import ImproperlyConfigured

from celery_spawn.dburl import django_database_url, mask_password
from celery_spawn.settings import DEFAULT_DATABASE_URL, SpawnSettings
from celery_spawn.store import SpawnStore

APP = "celery_spawn.contrib.django"
PASSWORD = "p@ss:w/rd %?#&+é"


def pg(**entry) -> dict:
    return {"default": {"ENGINE": "django.db.backends.postgresql", "NAME": "shop", "USER": "spawner",
                        "PASSWORD": PASSWORD, "HOST": "db.internal", "PORT": 5433, **entry}}


def django_conf(databases: dict, apps=(APP,), **conf) -> dict:
    return {"DATABASES": databases, "INSTALLED_APPS": ["django.contrib.admin", *apps], **conf}


def test_a_postgresql_entry_becomes_a_url_sqlalchemy_reads_back_whole():
    url = sa.make_url(django_database_url(pg()))
    assert (url.drivername, url.username, url.password, url.host, url.port, url.database) == \
        ("postgresql", "spawner", PASSWORD, "db.internal", 5433, "shop")


def test_the_printed_form_never_shows_the_password():
    built = django_database_url(pg())
    assert mask_password(built) == "postgresql://spawner:***@db.internal:5433/shop"
    assert mask_password(built) == sa.make_url(built).render_as_string(hide_password=True)
    settings = SpawnSettings.load(django_conf(pg()), environ={})
    assert settings.database_url == built
    for shown in (repr(settings), str(settings), SpawnStore(built, auto_migrate=False).safe_url):
        assert PASSWORD not in shown and "rd %" not in shown and "p%40ss" not in shown
    assert "spawner:***@db.internal" in repr(settings)


def test_options_go_to_the_driver_and_a_socket_folder_is_the_host_argument():
    url = sa.make_url(django_database_url(pg(HOST="/var/run/postgresql", PORT="",
                                             OPTIONS={"sslmode": "require", "isolation_level": 2, "pool": True,
                                                      "options": "-c search_path=spawn"})))
    assert url.host is None and url.port is None
    assert dict(url.query) == {"host": "/var/run/postgresql", "sslmode": "require",
                               "options": "-c search_path=spawn"}


def test_mysql_and_its_ssl_dict():
    entry = {"default": {"ENGINE": "django.db.backends.mysql", "NAME": "shop", "USER": "root", "HOST": "127.0.0.1",
                         "PORT": "3306", "OPTIONS": {"charset": "utf8mb4", "ssl": {"ca": "/ca.pem"},
                                                     "init_command": "SET sql_mode='STRICT_TRANS_TABLES'"}}}
    url = sa.make_url(django_database_url(entry))
    assert (url.drivername, url.username, url.password, url.host, url.port) == \
        ("mysql", "root", None, "127.0.0.1", 3306)
    assert dict(url.query) == {"charset": "utf8mb4", "ssl_ca": "/ca.pem"}


@pytest.mark.parametrize("name, database, query", [
    ("/srv/app/db.sqlite3", "/srv/app/db.sqlite3", {}),
    ("/srv/my app/db?.sqlite3", "/srv/my app/db?.sqlite3", {}),
    ("file:test.db?cache=shared", "file:test.db", {"cache": "shared", "uri": "true"}),
])
def test_sqlite_files(name, database, query):
    url = sa.make_url(django_database_url({"default": {"ENGINE": "django.db.backends.sqlite3", "NAME": name}}))
    assert (url.drivername, url.database, dict(url.query)) == ("sqlite", database, query)


@pytest.mark.parametrize("databases, alias, message", [
    ({}, "default", "DATABASES setting is empty"),
    (pg(), "reports", "'reports' is not in Django's DATABASES (its aliases: default)"),
    ({"default": {"ENGINE": "django.db.backends.oracle", "NAME": "x"}}, "default",
     "has ENGINE 'django.db.backends.oracle', which the spawn store cannot use"),
    ({"default": {"ENGINE": "django.db.backends.sqlite3", "NAME": ":memory:"}}, "default", "in-memory SQLite"),
    (pg(NAME=""), "default", "DATABASES['default']) has no NAME"),
    (pg(PORT="fivefourthreetwo"), "default", "PORT 'fivefourthreetwo', which is not a number"),
    (pg(OPTIONS={"sslcontext": object()}), "default", "OPTIONS['sslcontext'] of type object"),
    ({"default": "postgresql://x"}, "default", "is not a dict"),
])
def test_bad_entries_are_named(databases, alias, message):
    with pytest.raises(ImproperlyConfigured) as caught:
        django_database_url(databases, alias)
    assert message in str(caught.value)
    assert PASSWORD not in str(caught.value)


def test_with_the_django_app_installed_the_store_is_the_default_database(caplog):
    with caplog.at_level(logging.INFO, logger="celery_spawn"):
        settings = SpawnSettings.load(django_conf(pg()), environ={})
    assert settings.database_url == django_database_url(pg())
    assert "Django database 'default' (postgresql://spawner:***@db.internal:5433/shop)" in caplog.text
    assert PASSWORD not in caplog.text


def test_or_the_database_another_alias_names():
    databases = {**pg(), "spawn": {"ENGINE": "django.db.backends.sqlite3", "NAME": "/srv/spawn.sqlite3"}}
    settings = SpawnSettings.load(django_conf(databases, spawn_database_alias="spawn"), environ={})
    assert settings.database_url == "sqlite:////srv/spawn.sqlite3"
    from_env = SpawnSettings.load(django_conf(databases), environ={"CELERY_SPAWN_DATABASE_ALIAS": "spawn"})
    assert from_env.database_url == "sqlite:////srv/spawn.sqlite3"


def test_the_apps_config_path_counts_as_installed():
    conf = django_conf(pg(), apps=("celery_spawn.contrib.django.apps.SpawnDjangoConfig",))
    assert SpawnSettings.load(conf, environ={}).database_url == django_database_url(pg())


def test_a_database_url_wins_over_django_databases():
    url = "postgresql://other@127.0.0.1/spawn"
    assert SpawnSettings.load(django_conf(pg(), spawn_database_url=url), environ={}).database_url == url
    assert SpawnSettings.load(django_conf(pg()), environ={"CELERY_SPAWN_DATABASE_URL": url}).database_url == url
    assert SpawnSettings.load(django_conf(pg()), environ={}, database_url=url).database_url == url


def test_without_the_django_app_django_databases_are_left_alone():
    assert SpawnSettings.load(django_conf(pg(), apps=()), environ={}).database_url == DEFAULT_DATABASE_URL
    assert SpawnSettings.load({}, environ={}).database_url == DEFAULT_DATABASE_URL


def test_an_alias_without_django_settings_is_an_error_that_says_so():
    with pytest.raises(ImproperlyConfigured, match="spawn_database_alias .*CELERY_SPAWN_DATABASE_ALIAS.*"
                                                   "not configured from Django's settings"):
        SpawnSettings.load({"spawn_database_alias": "reports"}, environ={})


def test_a_bad_alias_is_named():
    with pytest.raises(ImproperlyConfigured, match="'reports' is not in Django's DATABASES"):
        SpawnSettings.load(django_conf(pg(), spawn_database_alias="reports"), environ={})


@pytest.mark.parametrize("value, expected", [(False, False), ("off", False), ("1", True)])
def test_django_migrate_is_a_boolean_setting(value, expected):
    assert SpawnSettings.load({"spawn_django_migrate": value}, environ={}).django_migrate is expected
    with pytest.raises(ImproperlyConfigured, match="spawn_django_migrate .*CELERY_SPAWN_DJANGO_MIGRATE"):
        SpawnSettings.load({"spawn_django_migrate": "sometimes"}, environ={})


def test_through_a_celery_app_conf():
    app = Celery("django_settings_test", broker="memory://", set_as_current=False)
    app.conf.update(django_conf(pg()))
    from celery_spawn import get_state

    assert get_state(app).settings.database_url == django_database_url(pg())
