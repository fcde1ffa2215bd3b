"""The ``celery spawn`` group, and the commands other packages add to it through entry points.

A package adds a command with an entry point in the ``celery_spawn.commands``
group (the web extra adds ``serve`` so). They are loaded only when asked
for: a ``celery`` invocation that does not use them pays nothing.
"""
from __future__ import annotations

import atexit
import gc
from typing import Any

import click

from ..options import GROUP_URL_KEY

#: The entry point group of commands added to ``celery spawn``.
ENTRY_POINT_GROUP = "celery_spawn.commands"


class SpawnGroup(click.Group):
    """A click group that also offers the commands registered under :data:`ENTRY_POINT_GROUP`."""

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted({*super().list_commands(ctx), *(ep.name for ep in _entry_points())})

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        command = super().get_command(ctx, cmd_name)
        if command is not None:
            return command
        for entry_point in _entry_points():
            if entry_point.name == cmd_name:
                loaded = entry_point.load()
                self.add_command(loaded, cmd_name)
                return loaded
        return None


def _entry_points() -> Any:
    from importlib.metadata import entry_points

    return entry_points(group=ENTRY_POINT_GROUP)


@click.group(name="spawn", cls=SpawnGroup)
@click.option("--database-url", "-u", "group_url", metavar="URL", default=None,
              help="The store of every command below, as if given to it (a command's own -u wins).")
@click.pass_context
def spawn(ctx: click.Context, group_url: str | None) -> None:
    """Inspect and manage spawn trees recorded by celery-spawn.

    \b
    Exit codes: 0 ok, 1 unknown id, 2 usage error, 3 store unreachable.
    """
    if group_url:
        ctx.meta[GROUP_URL_KEY] = group_url
    _freeze_heap_at_exit()


_freezing = False


def _freeze_heap_at_exit() -> None:
    """Spare the interpreter's teardown the collector's passes over every object a command imported and read.

    A command's process ends when the command does; frozen (:func:`gc.freeze`)
    at exit, SQLAlchemy's classes and a big tree's rows are released without
    being scanned for cycles first: about 0.1 s of every ``celery spawn``
    command. Registered once, so a test runner calling commands in-process
    is frozen only as it exits.
    """
    global _freezing
    if not _freezing:
        _freezing = True
        atexit.register(gc.freeze)
