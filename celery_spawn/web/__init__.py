"""The web API and dashboard of celery-spawn (``pip install 'celery-spawn[web]'``).

Importing this package does not import Flask: ``celery spawn serve`` is
registered in every ``celery`` invocation, and the core package must work
without the ``web`` extra. :func:`create_app` imports it when called.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import flask
    from celery import Celery

__all__ = ["create_app"]


def create_app(app: Celery | None = None, *, database_url: str | None = None,
               token: str | None = None) -> flask.Flask:
    """A Flask (WSGI) application serving the JSON API and the dashboard; see :mod:`celery_spawn.web.api`."""
    from .api import create_app as _create_app

    return _create_app(app, database_url=database_url, token=token)
