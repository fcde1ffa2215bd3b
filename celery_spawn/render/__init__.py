"""Rendering query results: text for people, JSON for scripts, Mermaid and DOT for diagrams.

Every function takes the plain data of :mod:`celery_spawn.store.queries` and
returns a string. Colours (``color=True``) are ANSI codes from ``click.style``;
the CLI asks for them only when it writes to a terminal. Text, Mermaid and
DOT write the control characters of stored values as escapes
(:func:`printable`); JSON escapes them itself. Trees are walked with an
explicit stack, never recursion, so a tree as deep as the store allows renders
in every format.
"""
from __future__ import annotations

from .escape import printable
from .jsonout import jsonable, to_json, tree_json
from .listings import jobs_text, monitor_text, operations_text, pending_text, stats_text
from .style import FORMATS, STATE_COLOURS, TREE_FORMATS
from .trees import (lineage_tree, render_tree, tree_dot, tree_json_chunks, tree_mermaid, tree_summary, tree_text,
                    tree_text_chunks)

__all__ = [
    "FORMATS", "TREE_FORMATS", "STATE_COLOURS", "jsonable", "to_json", "render_tree", "tree_text", "tree_json",
    "tree_mermaid", "tree_dot", "tree_summary", "operations_text", "jobs_text", "stats_text", "pending_text",
    "lineage_tree", "monitor_text", "printable", "tree_text_chunks", "tree_json_chunks",
]
