"""The ``celery spawn`` command group (registered through the ``celery.commands`` entry point).

Kept light: every ``celery`` invocation, ``worker`` included, imports this module.
"""
from __future__ import annotations

import click


@click.group(name="spawn")
@click.pass_context
def spawn(ctx: click.Context) -> None:
    """Inspect and control spawn trees recorded by celery-spawn."""
