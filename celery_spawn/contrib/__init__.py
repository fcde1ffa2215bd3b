"""Extras that sit beside the package: :mod:`celery_spawn.contrib.pytest` (the testing kit's fixtures) and
:mod:`celery_spawn.contrib.testing` (its helpers, usable without pytest)."""
