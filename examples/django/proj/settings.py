"""Settings of the example project: the Django defaults, Celery through ``CELERY_*``, and celery-spawn.

The database is SQLite in this folder, or PostgreSQL when ``EXAMPLE_DB=postgresql`` (with
``EXAMPLE_DB_NAME``, ``EXAMPLE_DB_USER``, ``EXAMPLE_DB_PASSWORD``, ``EXAMPLE_DB_HOST``, ``EXAMPLE_DB_PORT``).
"""
import os
from pathlib import Path

from celery_spawn.transport.spawnfs import folder_options

BASE_DIR = Path(__file__).resolve().parent.parent
DATA_DIR = Path(os.environ.get("EXAMPLE_DATA_DIR", BASE_DIR / ".data"))

SECRET_KEY = os.environ.get("DJANGO_SECRET_KEY", "example-only-not-a-secret")
DEBUG = os.environ.get("DJANGO_DEBUG", "1") == "1"
ALLOWED_HOSTS = ["127.0.0.1", "localhost"]

INSTALLED_APPS = [
    "django.contrib.admin",
    "django.contrib.auth",
    "django.contrib.contenttypes",
    "django.contrib.sessions",
    "django.contrib.messages",
    "django.contrib.staticfiles",
    "celery_spawn.contrib.django",
    "orders",
]

MIDDLEWARE = [
    "django.middleware.security.SecurityMiddleware",
    "django.contrib.sessions.middleware.SessionMiddleware",
    "django.middleware.common.CommonMiddleware",
    "django.middleware.csrf.CsrfViewMiddleware",
    "django.contrib.auth.middleware.AuthenticationMiddleware",
    "django.contrib.messages.middleware.MessageMiddleware",
    "django.middleware.clickjacking.XFrameOptionsMiddleware",
]

ROOT_URLCONF = "proj.urls"
TEMPLATES = [{
    "BACKEND": "django.template.backends.django.DjangoTemplates",
    "DIRS": [],
    "APP_DIRS": True,
    "OPTIONS": {"context_processors": [
        "django.template.context_processors.request",
        "django.contrib.auth.context_processors.auth",
        "django.contrib.messages.context_processors.messages",
    ]},
}]

if os.environ.get("EXAMPLE_DB") == "postgresql":
    DATABASES = {"default": {
        "ENGINE": "django.db.backends.postgresql",
        "NAME": os.environ.get("EXAMPLE_DB_NAME", "shop"),
        "USER": os.environ.get("EXAMPLE_DB_USER", "postgres"),
        "PASSWORD": os.environ.get("EXAMPLE_DB_PASSWORD", ""),
        "HOST": os.environ.get("EXAMPLE_DB_HOST", "127.0.0.1"),
        "PORT": os.environ.get("EXAMPLE_DB_PORT", "5432"),
    }}
else:
    DATABASES = {"default": {
        "ENGINE": "django.db.backends.sqlite3",
        "NAME": DATA_DIR / "db.sqlite3",
        # A file for the test database too: the spawn store opens its own connections to it.
        "TEST": {"NAME": DATA_DIR / "test-db.sqlite3"},
    }}
DATA_DIR.mkdir(parents=True, exist_ok=True)

USE_TZ = True
TIME_ZONE = "UTC"
STATIC_URL = "static/"
DEFAULT_AUTO_FIELD = "django.db.models.BigAutoField"

# Celery, through app.config_from_object("django.conf:settings", namespace="CELERY") in proj/celery.py.
# A folder as the broker, so that the example needs no server; a project uses redis:// or amqp://.
CELERY_BROKER_URL = os.environ.get("CELERY_BROKER_URL", "spawnfs://")
CELERY_BROKER_TRANSPORT_OPTIONS = folder_options(DATA_DIR / "broker")

# celery-spawn: CELERY_SPAWN_<NAME> is the setting spawn_<name>. Without CELERY_SPAWN_DATABASE_URL the
# store lives in DATABASES["default"] (CELERY_SPAWN_DATABASE_ALIAS names another), and `manage.py migrate`
# creates its tables; CELERY_SPAWN_DJANGO_MIGRATE = False leaves that to `manage.py spawn migrate`.
CELERY_SPAWN_DEFAULT_MAX_SPAWN_COUNT = 500
