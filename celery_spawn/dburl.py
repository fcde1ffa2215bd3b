"""A store URL from a Django ``DATABASES`` entry: the form SQLAlchemy's ``make_url`` reads back.

The string carries the password (the store connects with it); only its masked
form (:func:`mask_password`) is ever printed. Pure: no Django, no SQLAlchemy
import, so that the settings can use it while Celery reads its configuration.
"""
from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any
from urllib.parse import quote, urlencode

from celery.exceptions import ImproperlyConfigured

__all__ = ["DJANGO_APP", "django_database_url", "mask_password"]

#: The Django app of celery-spawn, as ``INSTALLED_APPS`` lists it (or its ``apps.<AppConfig>`` path).
DJANGO_APP = "celery_spawn.contrib.django"

#: Django's database engines (and the GIS ones built on them) and the SQLAlchemy dialect of each.
ENGINES = {
    "django.db.backends.postgresql": "postgresql",
    "django.db.backends.postgresql_psycopg2": "postgresql",
    "django.contrib.gis.db.backends.postgis": "postgresql",
    "django.db.backends.mysql": "mysql",
    "django.contrib.gis.db.backends.mysql": "mysql",
    "django.db.backends.sqlite3": "sqlite",
    "django.contrib.gis.db.backends.spatialite": "sqlite",
}
#: ``OPTIONS`` keys that only Django understands (the others go to the driver as URL query arguments).
DJANGO_ONLY_OPTIONS = frozenset({
    "isolation_level", "server_side_binding", "pool", "assume_role", "cursor_factory", "context",
    "init_command", "transaction_mode", "timeout",
})
#: Drivers' connection arguments that take a value out of a dict option (MySQL's ``ssl``).
_MYSQL_SSL_KEYS = ("ca", "cert", "key", "capath", "cipher")
_PASSWORD = re.compile(r"^([\w+]+://[^:/@?]*:)[^@]*@")


def mask_password(url: str) -> str:
    """``url`` with its password written ``***``, as SQLAlchemy's ``render_as_string()`` shows it."""
    return _PASSWORD.sub(r"\1***@", url)


def _invalid(alias: str, why: str) -> ImproperlyConfigured:
    return ImproperlyConfigured(f"Django database {alias!r} (DATABASES[{alias!r}]) {why}")


def _text(entry: Mapping[str, Any], key: str) -> str:
    value = entry.get(key)
    return "" if value is None else str(value)


def django_database_url(databases: Mapping[str, Any], alias: str = "default") -> str:
    """The SQLAlchemy URL of ``databases[alias]`` (Django's ``ENGINE``, ``NAME``, ``USER``, ``PASSWORD``,
    ``HOST``, ``PORT`` and the driver arguments of ``OPTIONS``); raises ``ImproperlyConfigured`` naming the
    alias and what is wrong with it."""
    if not isinstance(databases, Mapping) or not databases:
        raise ImproperlyConfigured("Django's DATABASES setting is empty: there is no database for the spawn store")
    if alias not in databases:
        raise ImproperlyConfigured(f"spawn_database_alias {alias!r} is not in Django's DATABASES "
                                   f"(its aliases: {', '.join(sorted(map(str, databases)))})")
    entry = databases[alias]
    if not isinstance(entry, Mapping):
        raise _invalid(alias, "is not a dict")
    engine = _text(entry, "ENGINE")
    backend = ENGINES.get(engine)
    if backend is None:
        raise _invalid(alias, f"has ENGINE {engine!r}, which the spawn store cannot use (it takes "
                       "PostgreSQL, MySQL/MariaDB and SQLite): set CELERY_SPAWN_DATABASE_URL instead")
    name = _text(entry, "NAME")
    if backend == "sqlite":
        return _sqlite_url(alias, name)
    if not name:
        raise _invalid(alias, "has no NAME")
    options = entry.get("OPTIONS") or {}
    if not isinstance(options, Mapping):
        raise _invalid(alias, "has OPTIONS that are not a dict")
    query = _query(alias, backend, options)
    host, port = _text(entry, "HOST"), _text(entry, "PORT")
    if host.startswith("/"):  # a Unix socket's folder (PostgreSQL) or file (MySQL)
        query["host" if backend == "postgresql" else "unix_socket"] = host
        host = ""
    if port and not port.isdigit():
        raise _invalid(alias, f"has PORT {port!r}, which is not a number")
    user, password = _text(entry, "USER"), _text(entry, "PASSWORD")
    url = f"{backend}://"
    if user or password:
        url += quote(user, safe="")
        if password:
            url += ":" + quote(password, safe="")
        url += "@"
    if ":" in host:
        host = f"[{host}]"
    url += host + (f":{port}" if port else "") + "/" + quote(name, safe="")
    if query:
        url += "?" + urlencode(sorted(query.items()))
    return url


def _sqlite_url(alias: str, name: str) -> str:
    if not name or name == ":memory:" or "mode=memory" in name:
        raise _invalid(alias, "is an in-memory SQLite database, which only its own connection sees: give NAME "
                       "a file (and TEST['NAME'] a file for tests), or set CELERY_SPAWN_DATABASE_URL")
    if name.startswith("file:"):  # a URI filename: SQLite reads it as a URI only when told
        return f"sqlite:///{name}{'&' if '?' in name else '?'}uri=true"
    return "sqlite:///" + quote(name, safe="/\\:~")


def _query(alias: str, backend: str, options: Mapping[str, Any]) -> dict[str, str]:
    """The scalar ``OPTIONS`` as the driver's URL query arguments (MySQL's ``ssl`` dict as ``ssl_<key>``)."""
    query: dict[str, str] = {}
    for key, value in options.items():
        if key in DJANGO_ONLY_OPTIONS or value is None:
            continue
        if backend == "mysql" and key == "ssl" and isinstance(value, Mapping):
            query.update({f"ssl_{k}": str(v) for k, v in value.items() if k in _MYSQL_SSL_KEYS and v is not None})
        elif isinstance(value, bool):
            query[key] = "true" if value else "false"
        elif isinstance(value, (str, int, float)):
            query[key] = str(value)
        else:
            raise _invalid(alias, f"has OPTIONS[{key!r}] of type {type(value).__name__}, which a database URL "
                           "cannot carry: set CELERY_SPAWN_DATABASE_URL (and CELERY_SPAWN_ENGINE_OPTIONS) instead")
    return query
