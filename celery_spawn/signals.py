"""Celery-style signals users can connect to.

    from celery_spawn.signals import spawn_recorded

    @spawn_recorded.connect
    def on_recorded(sender, result, **kwargs): ...
"""
from __future__ import annotations

from celery.utils.dispatch import Signal

#: A spawn was recorded in the store (sender: the parent task; ``result``: the SpawnResult).
spawn_recorded = Signal(name="spawn_recorded", providing_args=["result"])

#: A spawn was refused or failed (sender: the parent task; ``operation_id``, ``exception``).
spawn_failed = Signal(name="spawn_failed", providing_args=["operation_id", "exception"])

#: Every child (or descendant) of an operation is final (sender: the operation id; ``summary``).
operation_completed = Signal(name="operation_completed", providing_args=["operation_id", "summary"])
