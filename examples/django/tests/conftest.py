"""Fixtures of the example's tests: the project's Celery app, spawns run eagerly, and Chromium."""
from __future__ import annotations

import os
import secrets
import shutil
import subprocess
from pathlib import Path

import pytest

from celery_spawn import get_state
from celery_spawn.contrib.testing import run_spawn_eagerly
from proj import celery_app

FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync", "--hide-scrollbars",
         "--disable-dev-shm-usage"]


@pytest.fixture(scope="session", autouse=True)
def spawn_store(django_db_setup):
    """The project's spawn store, in the test database; closed before Django drops that database."""
    store = get_state(celery_app).store
    yield store
    store.dispose()


@pytest.fixture
def app():
    return celery_app


@pytest.fixture
def order(transactional_db):
    """An order fulfilled eagerly: the parent and its three children, succeeded; the parent's id."""
    from orders.tasks import fulfil_order

    result = run_spawn_eagerly(fulfil_order, f"order-{secrets.token_hex(3)}", ["apples", "pears", "plums"])
    return result.id


@pytest.fixture
def waiting_order(transactional_db):
    """An order whose parent ran here and whose children wait in the broker (no worker): the parent's id."""
    from orders.tasks import fulfil_order

    return fulfil_order.apply(args=(f"order-{secrets.token_hex(3)}", ["figs", "dates"])).id


# ---- Chromium ---------------------------------------------------------------------------------------
@pytest.fixture(scope="session")
def browser() -> str:
    found = next(filter(None, map(shutil.which, ("chromium", "chromium-browser", "google-chrome"))), None)
    if found is None:
        if os.environ.get("CI"):
            pytest.fail("Chromium is not installed (scripts/system-deps.sh installs it)", pytrace=False)
        pytest.skip("Chromium is not installed")
    return found


@pytest.fixture
def artifacts(tmp_path) -> Path:
    folder = Path(os.environ.get("EXAMPLE_ARTIFACTS") or tmp_path / "artifacts")
    folder.mkdir(parents=True, exist_ok=True)
    return folder


@pytest.fixture
def chromium(browser, tmp_path, live_server, settings, admin_user):
    """Runs Chromium logged in to the admin as a superuser: ``chromium(path, *flags)`` returns its stdout."""
    settings.ROOT_URLCONF = "browser_urls"
    settings.BROWSER_LOGIN_TOKEN = token = secrets.token_urlsafe(16)

    def run(path: str, *flags: str) -> str:
        url = f"{live_server.url}/login-for-tests/{token}/?next={path}"
        done = subprocess.run([browser, *FLAGS, f"--user-data-dir={tmp_path / 'profile'}", *flags, url],
                              capture_output=True, text=True, timeout=90, check=False)
        assert done.returncode == 0, done.stderr[-2000:]
        return done.stdout

    return run
