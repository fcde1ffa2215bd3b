"""JSON for scripts: any query result made JSON-ready, and a tree written without recursion."""
from __future__ import annotations

import json
from collections.abc import Callable, Iterator, Sequence
from datetime import datetime
from decimal import Decimal
from typing import Any



def jsonable(value: Any) -> Any:
    """Query results as JSON-ready data: datetimes (naive UTC) become ISO 8601 strings ending in ``Z``."""
    if isinstance(value, datetime):
        if value.tzinfo is not None:
            return value.isoformat()
        return value.isoformat() + "Z"
    if isinstance(value, Decimal):
        return float(value)
    if isinstance(value, dict):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [jsonable(v) for v in value]
    return value


def _json_default(value: Any) -> Any:
    if isinstance(value, (datetime, Decimal)):
        return jsonable(value)
    raise TypeError(f"{type(value).__name__} is not JSON serialisable")


_ENCODER = json.JSONEncoder(default=_json_default)


def _fast_encoder() -> Callable[[Any], str]:
    """``_ENCODER.encode`` without its per-call setup: the C encoder built once (CPython), checked once.

    ``JSONEncoder.encode`` builds a new C encoder on every call, which costs
    more than encoding one small tree node; a big tree encodes 100,000 of them.
    """
    try:
        from json.encoder import c_make_encoder, encode_basestring_ascii  # type: ignore[attr-defined]

        chunks = c_make_encoder(None, _json_default, encode_basestring_ascii, None, ": ", ", ", False, False, True)

        def encode(value: Any) -> str:
            return "".join(chunks(value, 0))

        sample = {"id": "a\"\u00e9\n", "n": 1, "f": 0.5, "none": None, "ok": True, "at": datetime(2026, 1, 2),
                  "list": [1, "x"]}
        if encode(sample) == _ENCODER.encode(sample):
            return encode
    except Exception:  # noqa: BLE001 - any surprise: the documented path
        pass
    return _ENCODER.encode


_encode = _fast_encoder()
#: One tree node's fields as compact JSON (the encoder :func:`tree_json` writes nodes with).
encode_node = _encode


def to_json(value: Any) -> str:
    """Indented JSON of a listing or stats (use :func:`tree_json` for trees)."""
    return json.dumps(jsonable(value), indent=2, sort_keys=False)


def tree_json(tree: dict) -> str:
    """A tree as JSON, one node per line, written without recursion (trees may be 1,000 levels deep)."""
    return "".join(tree_json_pieces(tree, _node_head, _node_children))


def _node_head(node: dict) -> str:
    fields = dict(node)
    del fields["children"]
    return _encode(fields)[:-1]  # the object without its closing brace


def _node_children(node: dict) -> Sequence[dict] | None:
    return node.get("children")


def tree_json_pieces(top: Any, head: Callable[[Any], str], children: Callable[[Any], Sequence[Any] | None]
                     ) -> Iterator[str]:
    """The JSON text of a tree, piece by piece: one node per line, its ``children`` last, indented by depth.

    ``head(node)`` is the node's fields as a JSON object without its closing
    brace, ``children(node)`` its child nodes in order. Walked with a stack,
    not recursion: trees may be 1,000 levels deep.
    """
    # Stack items: (node, its indent, what goes before its line), or text to write as it is.
    stack: list[Any] = [(top, "", "")]
    pop, push = stack.pop, stack.append
    while stack:
        item = pop()
        if item.__class__ is str:
            yield item
            continue
        node, pad, before = item
        kids = children(node)
        if not kids:
            yield f'{before}{pad}{head(node)}, "children": []}}'
            continue
        yield f'{before}{pad}{head(node)}, "children": [\n'
        push(f"\n{pad}]}}")
        inner = pad + "  "
        for index in range(len(kids) - 1, 0, -1):
            push((kids[index], inner, ",\n"))
        push((kids[0], inner, ""))
