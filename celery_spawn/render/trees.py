"""Trees for people and diagrams: text with guides, Mermaid and DOT, walked with an explicit stack."""
from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Mapping
from operator import itemgetter
from typing import Any

from .escape import has_control, printable
from .jsonout import encode_node, tree_json, tree_json_pieces
from .style import DIAGRAM_FILLS, SHORT_ID, TREE_FORMATS, state_word, style


def _walk(tree: dict) -> Iterator[tuple[dict, dict | None, str, bool]]:
    """Depth-first, in order: (node, parent, prefix of its children's lines, is last sibling)."""
    stack: list[tuple[dict, dict | None, str, bool]] = [(tree, None, "", True)]
    while stack:
        node, parent, prefix, last = stack.pop()
        yield node, parent, prefix, last
        kids = node.get("children") or []
        child_prefix = "" if parent is None else prefix + ("    " if last else "│   ")
        for index in range(len(kids) - 1, -1, -1):
            stack.append((kids[index], node, child_prefix, index == len(kids) - 1))


def tree_summary(tree: dict) -> dict:
    """``{"jobs", "levels", "hidden", "states": {state: n}}`` of a tree (hidden: children cut off)."""
    jobs = hidden = 0
    states: dict[str, int] = {}
    top = tree.get("depth") or 0
    deepest = top
    for node, _parent, _prefix, _last in _walk(tree):
        jobs += 1
        hidden += node.get("hidden_children") or 0
        states[node["state"]] = states.get(node["state"], 0) + 1
        deepest = max(deepest, node.get("depth") or 0)
    return {"jobs": jobs, "levels": deepest - top + 1, "hidden": hidden, "states": dict(sorted(states.items()))}



_TOP = object()  # the "parent queue" of the top node: never equal to a queue
#: Lines per chunk :func:`tree_text_chunks` yields.
CHUNK_LINES = 4096
_SPAWN_ORDER = itemgetter(7, 0)  # position, then id


def _children_by_parent(rows: Iterable[tuple], start: str) -> tuple[tuple | None, dict[Any, list[tuple]]]:
    """The top row and each parent's child rows in spawn order, from rows in no set order."""
    top = None
    kids: dict[Any, list[tuple]] = {}
    unsorted = set()
    for row in rows:
        if row[0] == start:  # nobody's child, even below a corrupt parent_id cycle
            top = row
            continue
        siblings = kids.get(row[1])
        if siblings is None:
            kids[row[1]] = [row]
        else:
            if siblings[-1][7] >= row[7]:
                unsorted.add(row[1])
            siblings.append(row)
    for parent_id in unsorted:
        kids[parent_id].sort(key=_SPAWN_ORDER)
    return top, kids


def tree_text_chunks(rows: Iterable[tuple], start: str, hidden: Mapping[str, int] | None = None, *,
                     color: bool = False, highlight: str | None = None, summary: bool = True,
                     cut_option: str = "--max-depth") -> Iterator[str]:
    """The text drawing of a tree given as flat rows, in chunks of lines (each ending with a newline).

    ``rows`` are tuples ``(id, parent_id, task_name, state, depth, queue,
    operation_id, position)`` in any order, as the store's ``tree_rows``
    reads them, with unique ids; ``start`` is the top's id and ``hidden`` maps
    a node cut off by a depth limit to its unread children. Lines are drawn
    with ``├──``/``└──`` glyphs: task name, state, id, and the queue where it
    changes; a node cut off ends with "… N more (raise ``cut_option``)", the
    option of the command that drew it.

    Nothing is nested: siblings are grouped by parent and walked with one
    explicit stack whose items carry their line's lead and their children's
    prefix, so a node costs a few string joins (big trees have 100,000). Without
    colour, a chunk is checked for control characters once and escaped line by
    line only when it holds one.
    """
    hidden = hidden or {}
    top, kids = _children_by_parent(rows, start)
    if top is None:
        return
    lines: list[str] = []
    add = lines.append
    jobs = hidden_total = 0
    states: dict[Any, int] = {}
    first = deepest = top[4] or 0
    stack: list[tuple[tuple, str, str, Any]] = [(top, "", "", _TOP)]  # (row, its lead, its children's prefix, ...)
    pop, push, extend = stack.pop, stack.append, stack.extend
    while stack:
        row, lead, kid_prefix, parent_queue = pop()
        job, _parent, name, state, depth, queue, _operation, _position = row
        jobs += 1
        if state in states:
            states[state] += 1
        else:
            states[state] = 1
        if depth is not None and depth > deepest:
            deepest = depth
        if color:
            line = lead + "  ".join([
                style(printable(name or "?"), color, bold=True) if parent_queue is _TOP else printable(name or "?"),
                state_word(state, color), style(printable(job), color, dim=True)])
        else:
            line = f"{lead}{name or '?'}  {state or '-'}  {job}"
        if queue and queue != parent_queue:
            line += f"  queue={printable(queue) if color else queue}"
        if highlight is not None and job == highlight:
            line += "  " + style("◀", color, bold=True)
        add(line)
        if hidden and job in hidden:
            cut = hidden[job]
            hidden_total += cut
            add(kid_prefix + "└── " + style(f"… {cut} more (raise {cut_option})", color, dim=True))
        children = kids.get(job)
        if children:
            push((children[-1], kid_prefix + "└── ", kid_prefix + "    ", queue))
            if len(children) > 1:
                mid, deeper = kid_prefix + "├── ", kid_prefix + "│   "
                extend([(child, mid, deeper, queue) for child in children[-2::-1]])
        if len(lines) >= CHUNK_LINES:
            yield _chunk(lines, color)
            lines.clear()
    if summary:
        counts = ", ".join(f"{printable(state)} {n}" for state, n in sorted(states.items(), key=lambda kv: str(kv[0])))
        more = f", {hidden_total} more below" if hidden_total else ""
        add("")
        add(f"{jobs} jobs, {deepest - first + 1} levels{more} ({counts})")
    if lines:
        yield _chunk(lines, color)


def tree_json_chunks(rows: Iterable[tuple], start: str, hidden: Mapping[str, int] | None = None) -> Iterator[str]:
    """The JSON of a tree given as flat rows (see :func:`tree_text_chunks`), in chunks; the last ends with a newline.

    The same text as :func:`~celery_spawn.render.jsonout.tree_json` of the
    nested tree ``spawn_tree`` reads (nodes in spawn order, ``hidden_children``
    on a node cut off by a depth limit), written as the rows are walked: no
    nested dicts for 100,000 nodes, and no recursion for 1,000 levels.
    """
    hidden = hidden or {}
    top, kids = _children_by_parent(rows, start)
    if top is None:
        return

    def head(row: tuple) -> str:
        job, _parent, name, state, depth, queue, operation, position = row
        fields = {"id": job, "task_name": name, "state": state, "depth": depth, "queue": queue,
                  "operation_id": operation, "position": position}
        if job in hidden:
            fields["hidden_children"] = hidden[job]
        return encode_node(fields)[:-1]  # the object without its closing brace

    out: list[str] = []
    add = out.append
    for piece in tree_json_pieces(top, head, lambda row: kids.get(row[0])):
        add(piece)
        if len(out) >= CHUNK_LINES:
            yield "".join(out)
            out.clear()
    add("\n")
    yield "".join(out)


def _chunk(lines: list[str], color: bool) -> str:
    """Lines as one text; with no colour (values drawn raw), any line holding a control character escaped."""
    if not color and has_control("".join(lines)):
        return "\n".join(map(printable, lines)) + "\n"
    return "\n".join(lines) + "\n"


def _flat_rows(tree: dict) -> tuple[list[tuple], dict[str, int]]:
    """A nested tree as :func:`tree_text_chunks` rows (position: the index among siblings) and cut counts."""
    rows: list[tuple] = []
    hidden: dict[str, int] = {}
    seen: set = set()
    stack: list[tuple[dict, Any, int]] = [(tree, None, 0)]
    while stack:
        node, parent_id, index = stack.pop()
        job: str = node["id"]
        if job in seen:  # a repeated id (a corrupt cycle) is drawn once
            continue
        seen.add(job)
        rows.append((job, parent_id, node.get("task_name"), node.get("state"), node.get("depth"), node.get("queue"),
                     node.get("operation_id"), index))
        if node.get("hidden_children"):
            hidden[job] = node["hidden_children"]
        stack.extend((kid, job, i) for i, kid in enumerate(node.get("children") or ()))
    return rows, hidden


def tree_text(tree: dict, *, color: bool = False, highlight: str | None = None, summary: bool = True,
              cut_option: str = "--max-depth") -> str:
    """A nested tree (``spawn_tree``, ``lineage_tree``) drawn as :func:`tree_text_chunks` draws rows."""
    rows, hidden = _flat_rows(tree)
    text = "".join(tree_text_chunks(rows, tree["id"], hidden, color=color, highlight=highlight,
                                    summary=summary, cut_option=cut_option))
    return text[:-1]


def _mermaid_text(value: Any) -> str:
    text = printable(str(value).replace("\n", " "))
    for raw, entity in (("&", "#amp;"), ('"', "#quot;"), ("<", "#lt;"), (">", "#gt;")):
        text = text.replace(raw, entity)
    return text


def tree_mermaid(tree: dict) -> str:
    """A Mermaid flowchart (``graph TD``): one box per job, coloured by state."""
    lines = ["graph TD"]
    names: dict[int, str] = {}
    classes: dict[str, list[str]] = {}

    def name_of(node: dict) -> str:
        key = id(node)
        if key not in names:
            names[key] = f"n{len(names)}"
        return names[key]

    for node, parent, _prefix, _last in _walk(tree):
        me = name_of(node)
        label = "<br/>".join(_mermaid_text(part) for part in (
            node.get("task_name") or "?", node["id"][:SHORT_ID], node.get("state") or "-"))
        lines.append(f'    {me}["{label}"]')
        if parent is not None:
            lines.append(f"    {name_of(parent)} --> {me}")
        state = node.get("state") or ""
        if state in DIAGRAM_FILLS:
            classes.setdefault(state, []).append(me)
        hidden = node.get("hidden_children")
        if hidden:
            lines.append(f'    {me}_more["… {hidden} more"]')
            lines.append(f"    {me} -.-> {me}_more")
    for state, members in classes.items():
        lines.append(f"    classDef {state} fill:{DIAGRAM_FILLS[state]},stroke:#555,color:#000")
        # Long class lines are fine for Mermaid, but keep them readable.
        for start in range(0, len(members), 50):
            lines.append(f"    class {','.join(members[start:start + 50])} {state}")
    return "\n".join(lines)


def _dot_text(value: Any) -> str:
    return printable(value, keep="\n").replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def tree_dot(tree: dict) -> str:
    """A Graphviz ``digraph``: one box per job, filled by state."""
    lines = [
        "digraph spawn_tree {",
        "    rankdir=TB;",
        '    node [shape=box, style="rounded,filled", fontname="Helvetica", fillcolor="#ffffff"];',
    ]
    for node, parent, _prefix, _last in _walk(tree):
        me = f'"{_dot_text(node["id"])}"'
        label = "\\n".join(_dot_text(part) for part in (
            node.get("task_name") or "?", node["id"][:SHORT_ID], node.get("state") or "-"))
        fill = DIAGRAM_FILLS.get(node.get("state") or "", "#ffffff")
        lines.append(f'    {me} [label="{label}", fillcolor="{fill}"];')
        if parent is not None:
            lines.append(f'    "{_dot_text(parent["id"])}" -> {me};')
        hidden = node.get("hidden_children")
        if hidden:
            more = f'"{_dot_text(node["id"])}…more"'
            lines.append(f'    {more} [label="… {hidden} more", style="dashed"];')
            lines.append(f"    {me} -> {more} [style=dashed];")
    lines.append("}")
    return "\n".join(lines)


def render_tree(tree: dict, fmt: str, *, color: bool = False, highlight: str | None = None,
                cut_option: str = "--max-depth") -> str:
    """A tree in one of :data:`TREE_FORMATS`; ``cut_option`` names the option that shows what a cut hides."""
    renderers: dict[str, Callable[[dict], str]] = {
        "json": tree_json, "mermaid": tree_mermaid, "dot": tree_dot,
        "text": lambda t: tree_text(t, color=color, highlight=highlight, cut_option=cut_option),
    }
    if fmt not in renderers:
        raise ValueError(f"unknown tree format {fmt!r}; known: {', '.join(TREE_FORMATS)}")
    return renderers[fmt](tree)


def lineage_tree(job: dict, ancestors: list[dict], subtree: dict | None) -> dict:
    """One tree for :func:`tree_text`: the ancestor chain (root first) down to the job, then its subtree."""
    fields = ("id", "task_name", "state", "depth", "queue", "operation_id", "position")
    node = subtree if subtree is not None else {**{f: job.get(f) for f in fields}, "children": []}
    for ancestor in ancestors:  # parent first: wrap outwards
        node = {**{f: ancestor.get(f) for f in fields}, "children": [node]}
    return node
