"""The example project; its Celery app is loaded with Django, as Celery's Django guide does."""
from .celery import app as celery_app

__all__ = ["celery_app"]
