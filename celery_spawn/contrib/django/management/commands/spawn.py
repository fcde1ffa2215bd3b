"""``manage.py spawn <command>``: the ``celery spawn`` commands on the project's app and store."""
from __future__ import annotations

import argparse
import os
import sys
from typing import Any

from django.core.management.base import BaseCommand, CommandError

#: Django's own options, which ``manage.py`` reads before the command runs (``--settings=x`` or ``--settings x``).
_DJANGO_OPTIONS = ("--settings", "--pythonpath")


def _without_django_options(args: list[str]) -> tuple[list[str], bool]:
    """The arguments for ``celery spawn``, and whether ``--no-color`` was among them (Django's and Celery's)."""
    kept: list[str] = []
    no_color = False
    skip = False
    for arg in args:
        if skip:
            skip = False
        elif arg in _DJANGO_OPTIONS:
            skip = True
        elif arg.startswith(tuple(f"{option}=" for option in _DJANGO_OPTIONS)):
            pass
        elif arg == "--no-color":
            no_color = True
        else:
            kept.append(arg)
    return kept, no_color


class Command(BaseCommand):
    help = ("Run a celery spawn command (tree, list, stats, cancel, migrate, ...) with the project's Celery app, "
            "as `celery -A proj spawn ...` does. `manage.py spawn --help` lists them.")

    def run_from_argv(self, argv: list[str]) -> None:
        """Hand every argument to the click group: ``manage.py spawn tree X --full`` is ``celery spawn tree X
        --full``, with its exit codes (1 unknown id, 2 usage, 3 store unreachable)."""
        from django.db import connections

        from ...project import run_command

        args, no_color = _without_django_options(argv[2:])
        try:
            code = run_command(args, prog_name=f"{os.path.basename(argv[0])} {argv[1]}", no_color=no_color)
        finally:
            connections.close_all()
        sys.exit(code)

    def add_arguments(self, parser: argparse.ArgumentParser) -> None:
        parser.add_argument("args", nargs=argparse.REMAINDER, metavar="COMMAND [ARGS]",
                            help="a celery spawn command and its arguments")

    def handle(self, *args: Any, **options: Any) -> None:
        """``call_command("spawn", "stats")``: the same, with a non-zero exit code as a :class:`CommandError`."""
        from ...project import run_command

        code = run_command(list(args), no_color=bool(options.get("no_color")))
        if code:
            raise CommandError(f"spawn {' '.join(args[:1])} exited with code {code}", returncode=code)
