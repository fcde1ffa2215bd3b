"""Kombu broker transports that ship with celery-spawn.

``spawnfs://`` (:mod:`celery_spawn.transport.spawnfs`) is the server-less
broker of the example and the tests: a folder on disk. Importing
``celery_spawn`` registers the alias with kombu; the transport itself is
imported only when an app uses it.
"""
