"""A spinner on stderr while a command works through many rows (``cancel``, ``recover``, ``migrate``).

Only on a terminal: piped or redirected, stderr gets nothing from it, so scripts
read the same output as before. The line is cleared before the command prints
its result.
"""
from __future__ import annotations

import contextlib
import sys
import threading
from collections.abc import Iterator

import click

#: Seconds between two frames.
INTERVAL = 0.1
FRAMES = "|/-\\"


def on_terminal() -> bool:
    """Whether stderr is a terminal (the spinner's only place)."""
    isatty = getattr(sys.stderr, "isatty", None)
    return bool(isatty and isatty())


@contextlib.contextmanager
def working(label: str) -> Iterator[None]:
    """Spin ``label`` on stderr until the block ends, when stderr is a terminal; else do nothing."""
    if not on_terminal():
        yield
        return
    done = threading.Event()

    def spin() -> None:
        frame = 0
        while True:
            click.echo(f"\r{label} {FRAMES[frame % len(FRAMES)]}", nl=False, err=True)
            frame += 1
            if done.wait(INTERVAL):
                break
        click.echo("\r" + " " * (len(label) + 2) + "\r", nl=False, err=True)

    thread = threading.Thread(target=spin, name="celery-spawn-progress", daemon=True)
    thread.start()
    try:
        yield
    finally:
        done.set()
        thread.join()
