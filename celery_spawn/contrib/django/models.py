"""Read-only Django models over the spawn tables (``managed = False``: the store's own migrations own them).

They are for the admin and the project's queries; every write goes through celery-spawn (a spawn, the
tracking of its children, :func:`celery_spawn.cancel`), never through these models.
"""
from __future__ import annotations

import datetime
from typing import Any, NoReturn

from django.conf import settings
from django.db import models
from django.utils import timezone

from ...protocol import CHILD_COUNT_COLUMNS, FINAL_JOB_STATES, JOB_STATES, OPERATION_STATES

__all__ = ["Job", "Operation", "ReadOnlyModel", "UTCDateTimeField"]

#: Column widths of the store (``store/schema.py``).
ID_LENGTH = 64
NAME_LENGTH = 255
#: The permission of the admin's cancel actions (``celery_spawn.cancel_spawn``).
CANCEL_PERMISSION = "cancel_spawn"


class UTCDateTimeField(models.DateTimeField):
    """The store's timestamps (naive UTC), aware in UTC when Django's ``USE_TZ`` is on."""

    def from_db_value(self, value: Any, expression: Any, connection: Any) -> Any:
        if isinstance(value, datetime.datetime) and settings.USE_TZ and timezone.is_naive(value):
            return value.replace(tzinfo=datetime.timezone.utc)
        return value


class ReadOnlyModel(models.Model):
    """A model over a spawn table: saving or deleting one raises."""

    class Meta:
        abstract = True
        managed = False

    def save(self, *args: Any, **kwargs: Any) -> NoReturn:
        raise TypeError(f"{type(self).__name__} is read-only: celery-spawn writes the spawn tables")

    def delete(self, *args: Any, **kwargs: Any) -> NoReturn:
        raise TypeError(f"{type(self).__name__} is read-only: cancel a tree with celery_spawn.cancel()")


def _id(**kwargs: Any) -> models.CharField:
    return models.CharField(max_length=ID_LENGTH, **kwargs)


def _name(**kwargs: Any) -> models.CharField:
    return models.CharField(max_length=NAME_LENGTH, null=True, blank=True, **kwargs)


class Operation(ReadOnlyModel):
    """One spawn: the children a parent job created, with its state and progress (``spawn_operations``)."""

    id = _id(primary_key=True)
    label = _id(null=True, blank=True, help_text="the spawn config's operation_id")
    parent_id = _id(verbose_name="parent job")
    root_id = _id(verbose_name="root job")
    parent_task = _name()
    handler = _name()
    queue = _name()
    depth = models.IntegerField(default=0)
    state = models.CharField(max_length=24, choices=[(state, state) for state in OPERATION_STATES])
    total = models.IntegerField(default=0, help_text="children spawned")
    published_through = models.IntegerField(null=True, blank=True)
    config = models.TextField(null=True, blank=True)
    error = models.TextField(null=True, blank=True)
    on_complete = models.TextField(null=True, blank=True)
    wait_for_descendants = models.BooleanField(default=False)
    fail_fast = models.BooleanField(default=False)
    completed = models.BooleanField(default=False)
    callback_state = models.CharField(max_length=16, null=True, blank=True)
    callback_run = models.CharField(max_length=16, null=True, blank=True)
    callback_worker = _name()
    callback_sends = models.IntegerField(default=0)
    created_at = UTCDateTimeField()
    updated_at = UTCDateTimeField()
    finished_at = UTCDateTimeField(null=True, blank=True)
    children_timed = models.IntegerField(null=True, blank=True)
    children_seconds = models.FloatField(null=True, blank=True)
    children_max_seconds = models.FloatField(null=True, blank=True)

    class Meta(ReadOnlyModel.Meta):
        db_table = "spawn_operations"
        ordering = ["-created_at"]
        verbose_name = "spawn operation"
        permissions = [(CANCEL_PERMISSION, "Can cancel spawn trees")]

    def __str__(self) -> str:
        return self.label or self.id


# The rollup's counts per final state (children_succeeded, ...), written when the operation completes.
for _state, _column in CHILD_COUNT_COLUMNS.items():
    Operation.add_to_class(_column, models.IntegerField(null=True, blank=True, help_text=f"children {_state}"))
del _state, _column


class Job(ReadOnlyModel):
    """A task in a spawn tree: a parent or a child, with its lineage and state (``spawn_jobs``)."""

    id = _id(primary_key=True)
    parent_id = _id(null=True, blank=True, verbose_name="parent job")
    root_id = _id(verbose_name="root job")
    operation_id = _id(null=True, blank=True, verbose_name="operation")
    position = models.IntegerField(default=0)
    depth = models.IntegerField(default=0)
    task_name = models.CharField(max_length=NAME_LENGTH)
    queue = _name()
    priority = models.IntegerField(null=True, blank=True)
    state = models.CharField(max_length=24, choices=[(state, state) for state in JOB_STATES])
    pending_deps = models.IntegerField(default=0)
    retries = models.IntegerField(default=0)
    message = models.TextField(null=True, blank=True)
    error = models.TextField(null=True, blank=True)
    created_at = UTCDateTimeField()
    dispatched_at = UTCDateTimeField(null=True, blank=True)
    started_at = UTCDateTimeField(null=True, blank=True)
    finished_at = UTCDateTimeField(null=True, blank=True)
    not_before = UTCDateTimeField(null=True, blank=True)
    worker = _name()
    redeliveries = models.IntegerField(default=0)

    class Meta(ReadOnlyModel.Meta):
        db_table = "spawn_jobs"
        ordering = ["-created_at"]
        verbose_name = "spawn job"

    def __str__(self) -> str:
        return f"{self.task_name} {self.id}"

    @property
    def finished(self) -> bool:
        return self.state in FINAL_JOB_STATES
