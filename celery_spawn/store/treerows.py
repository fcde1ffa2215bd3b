"""A tree as it is read, before anything is nested: the shape both tree reads return.

Pure (no SQLAlchemy), for :mod:`.queries` and for the direct read of :mod:`.direct`.
"""
from __future__ import annotations

from typing import NamedTuple

#: Columns read for each node of a tree; a nested node carries all of them but ``parent_id``
#: (its place in the nesting says it), plus ``children`` and, where cut, ``hidden_children``.
TREE_FIELDS = ("id", "parent_id", "task_name", "state", "depth", "queue", "operation_id", "position")


class TreeRows(NamedTuple):
    """A tree as the store reads it, before anything is nested.

    ``rows`` are :data:`TREE_FIELDS` tuples (tuple-like rows on MySQL/MariaDB)
    with unique ids in no set order;
    the one whose id is ``start`` is the tree's top. A row whose parent is not
    among them stays detached (a root range may hold other recorded trees of
    the same Celery workflow). ``hidden`` maps a node cut off by ``max_depth``
    to the number of its children not read.
    """

    start: str
    rows: list[tuple]
    hidden: dict[str, int]
