"""What every rendering shares: formats, state colours, and how a state or a styled word is written."""
from __future__ import annotations

from typing import Any

import click

from .escape import printable

#: Output formats of listings, and of trees.
FORMATS = ("text", "json")
TREE_FORMATS = ("text", "json", "mermaid", "dot")

#: Terminal colour of each job and operation state.
STATE_COLOURS = {
    "pending": "yellow", "held": "yellow", "scheduled": "yellow", "dispatched": "blue", "started": "cyan",
    "retrying": "magenta",
    "succeeded": "green", "failed": "red", "revoked": "bright_black", "cancelled": "bright_black", "lost": "red",
    "running": "cyan", "partially_failed": "yellow",
}
#: Fill colours of diagram nodes (light, readable with black text).
DIAGRAM_FILLS = {
    "pending": "#fff3cd", "held": "#ffe8a1", "scheduled": "#fff3cd", "dispatched": "#cfe2ff", "started": "#cff4fc",
    "retrying": "#f3d9fa", "succeeded": "#d1e7dd", "failed": "#f8d7da", "revoked": "#e2e3e5", "lost": "#f8d7da",
    "cancelled": "#e2e3e5",
}
#: Diagram labels show ids shortened to this many characters (the full id is in JSON).
SHORT_ID = 8


def style(text: str, color: bool, **style: Any) -> str:
    return click.style(text, **style) if color else text


def state_word(state: str | None, color: bool, width: int = 0) -> str:
    text = printable(state or "-").ljust(width)
    colour = STATE_COLOURS.get(state or "")
    if not colour:
        return text
    return style(text, color, fg=colour, bold=True) if state == "failed" else style(text, color, fg=colour)
