"""The project's Celery app: settings from Django's (``CELERY_*``, ``CELERY_SPAWN_*``), spawning installed."""
import os

from celery import Celery

from celery_spawn import install

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "proj.settings")

app = Celery("proj")
app.config_from_object("django.conf:settings", namespace="CELERY")
install(app)  # the store: DATABASES["default"], as no CELERY_SPAWN_DATABASE_URL is set
app.autodiscover_tasks()
