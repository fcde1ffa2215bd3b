"""``examples/django`` passes its own pytest-django suite on SQLite and on PostgreSQL.

The example runs in its own pytest process (its folder has its ``pytest.ini``), so that Django's
settings and pytest-django's fixtures never reach this suite. Its tests spawn for real (eagerly, and with
the children left in a folder broker), then check the settings, ``manage.py migrate``, ``manage.py
spawn``, and the admin in headless Chromium.
"""
from __future__ import annotations

import os
import subprocess
import sys

import pytest
import sqlalchemy as sa

from tests.harness import IN_CI, ROOT, throwaway_database

EXAMPLE = ROOT / "examples" / "django"

pytest.importorskip("django", reason="the django extra is not installed")
pytest.importorskip("pytest_django", reason="the django extra is not installed")


def run_example(tmp_path, artifacts, **env: str) -> subprocess.CompletedProcess:
    environ = {k: v for k, v in os.environ.items() if not k.startswith(("CELERY_", "DJANGO_", "EXAMPLE_"))}
    environ.update(PYTHONPATH=str(ROOT), EXAMPLE_DATA_DIR=str(tmp_path / "data"),
                   EXAMPLE_ARTIFACTS=str(artifacts), **env)
    if IN_CI:
        environ["CI"] = "true"
    return subprocess.run([sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-q", "-rs"], cwd=EXAMPLE,
                          env=environ, capture_output=True, text=True, timeout=600, check=False)


def passed(done: subprocess.CompletedProcess) -> str:
    output = done.stdout + done.stderr
    assert done.returncode == 0, output[-6000:]
    assert " passed" in done.stdout and "skipped" not in done.stdout, output[-3000:]
    return done.stdout


def test_the_django_example_on_sqlite(tmp_path, artifacts):
    passed(run_example(tmp_path, artifacts / "django-sqlite"))


def test_the_django_example_on_postgresql(tmp_path, artifacts):
    with throwaway_database("postgresql") as url:
        parts = sa.make_url(url)
        passed(run_example(tmp_path, artifacts / "django-postgresql", EXAMPLE_DB="postgresql",
                           EXAMPLE_DB_NAME=str(parts.database), EXAMPLE_DB_USER=parts.username or "",
                           EXAMPLE_DB_PASSWORD=parts.password or "", EXAMPLE_DB_HOST=parts.host or "127.0.0.1",
                           EXAMPLE_DB_PORT=str(parts.port or 5432)))
