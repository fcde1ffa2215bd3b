"""Trees for people and diagrams: text with guides, Mermaid and DOT, walked with an explicit stack."""
from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any


from .escape import printable
from .jsonout import tree_json
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


def tree_text(tree: dict, *, color: bool = False, highlight: str | None = None, summary: bool = True,
              cut_option: str = "--max-depth") -> str:
    """A tree drawn with ``├──``/``└──`` glyphs: task name, state, id, and the queue where it changes.

    One explicit stack whose items carry the line's glyphs and the prefix of the
    node's children already built, so a node costs a few string joins (big
    trees have 100,000 of them). A node cut off by the query ends with
    "… N more (raise ``cut_option``)": the option of the command that drew it.
    """
    lines: list[str] = []
    add = lines.append
    jobs = hidden_total = 0
    states: dict[Any, int] = {}
    top = deepest = tree.get("depth") or 0
    # (node, its line's lead, its children's prefix, its parent's queue)
    stack: list[tuple[dict, str, str, Any]] = [(tree, "", "", _TOP)]
    pop, push, extend = stack.pop, stack.append, stack.extend
    while stack:
        node, lead, kid_prefix, parent_queue = pop()
        state = node.get("state")
        jobs += 1
        states[state] = states.get(state, 0) + 1
        depth = node.get("depth") or 0
        if depth > deepest:
            deepest = depth
        name = printable(node.get("task_name") or "?")
        if color:
            parts = [style(name, color, bold=True) if parent_queue is _TOP else name, state_word(state, color),
                     style(printable(node["id"]), color, dim=True)]
        else:
            parts = [name, printable(state or "-"), printable(node["id"])]
        queue = node.get("queue")
        if queue and queue != parent_queue:
            parts.append(f"queue={printable(queue)}")
        line = lead + "  ".join(parts)
        if highlight is not None and node["id"] == highlight:
            line += "  " + style("◀", color, bold=True)
        add(line)
        hidden = node.get("hidden_children")
        if hidden:
            hidden_total += hidden
            add(kid_prefix + "└── " + style(f"… {hidden} more (raise {cut_option})", color, dim=True))
        kids = node.get("children")
        if kids:
            push((kids[-1], kid_prefix + "└── ", kid_prefix + "    ", queue))
            if len(kids) > 1:
                mid, deeper = kid_prefix + "├── ", kid_prefix + "│   "
                extend([(kid, mid, deeper, queue) for kid in kids[-2::-1]])
    if summary:
        ordered = sorted(states.items(), key=lambda kv: str(kv[0]))
        counts = ", ".join(f"{printable(state)} {n}" for state, n in ordered)
        more = f", {hidden_total} more below" if hidden_total else ""
        lines.append("")
        lines.append(f"{jobs} jobs, {deepest - top + 1} levels{more} ({counts})")
    return "\n".join(lines)


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
