"""``queries._nest``, pure logic: the same tree whatever order the rows come in.

The tree query asks the server for no order (a sort of the whole tree costs
it more than the nesting), so the rows may come children first, siblings
out of spawn order, or mixed with rows of other trees.
"""
from __future__ import annotations

import itertools
import random

from celery_spawn.store.queries import _nest

# (id, parent_id, task_name, state, depth, queue, operation_id, position)
ROWS = [
    ("r", None, "t.parent", "succeeded", 0, "q", None, 0),
    ("a", "r", "t.child", "succeeded", 1, "q", "op-r", 0),
    ("b", "r", "t.child", "failed", 1, "q", "op-r", 1),
    ("c", "r", "t.child", "pending", 1, "q", "op-r", 2),
    ("z", "r", "t.child", "pending", 1, "q", "op-r2", 0),  # a second spawn of r: ties on position 0 with a
    ("a.1", "a", "t.child", "succeeded", 2, "q", "op-a", 1),
    ("a.0", "a", "t.child", "succeeded", 2, "q", "op-a", 0),
    ("a.0.0", "a.0", "t.child", "started", 3, "other", "op-a.0", 0),
    ("other", "elsewhere", "t.child", "pending", 1, "q", "op-x", 0),  # another tree of the same range
]


def shape(node):
    return (node["id"], [shape(kid) for kid in node["children"]])


EXPECTED = ("r", [("a", [("a.0", [("a.0.0", [])]), ("a.1", [])]), ("z", []), ("b", []), ("c", [])])


def test_rows_in_spawn_order_nest_in_spawn_order():
    root, nodes = _nest(ROWS, "r")
    assert shape(root) == EXPECTED
    assert set(nodes) == {row[0] for row in ROWS}
    assert nodes["a.0.0"] == {"id": "a.0.0", "task_name": "t.child", "state": "started", "depth": 3, "queue": "other",
                              "operation_id": "op-a.0", "position": 0, "children": []}
    assert nodes["other"]["children"] == [] and all(nodes["other"] is not kid for kid in root["children"])


def test_any_row_order_gives_the_same_tree():
    rng = random.Random(7)
    orders = [list(reversed(ROWS))] + [rng.sample(ROWS, len(ROWS)) for _ in range(200)]
    for rows in orders:
        root, nodes = _nest(rows, "r")
        assert shape(root) == EXPECTED, [row[0] for row in rows]
        assert len(nodes) == len(ROWS)


def test_every_order_of_a_small_tree():
    small = ROWS[:4] + ROWS[5:7]
    for rows in itertools.permutations(small):
        root, _ = _nest(rows, "r")
        assert shape(root) == ("r", [("a", [("a.0", []), ("a.1", [])]), ("b", []), ("c", [])])


def test_the_start_is_nobodys_child():
    """A corrupt cycle r -> a -> r: the start heads the tree and is not nested below its own child."""
    rows = [("a", "r", "t", "succeeded", 1, "q", "op", 0), ("r", "a", "t", "succeeded", 0, "q", "op", 0)]
    for order in (rows, rows[::-1]):
        root, _ = _nest(order, "r")
        assert shape(root) == ("r", [("a", [])])


def test_unknown_start_gives_no_root():
    root, nodes = _nest(ROWS, "nope")
    assert root is None and len(nodes) == len(ROWS)
    assert _nest([], "r") == (None, {})
