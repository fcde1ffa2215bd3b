"""Rendering query results: text for people, JSON for scripts, Mermaid and DOT for diagrams.

Every function takes the plain data of :mod:`celery_spawn.store.queries` and
returns a string. Colours (``color=True``) are ANSI codes from ``click.style``;
the CLI asks for them only when it writes to a terminal. Trees are walked with
an explicit stack, never recursion, so a tree as deep as the store allows
renders in every format.
"""
from __future__ import annotations

import functools
import json
from collections.abc import Callable, Iterator
from datetime import datetime
from decimal import Decimal
from typing import Any

import click

__all__ = [
    "FORMATS", "TREE_FORMATS", "STATE_COLOURS", "jsonable", "to_json", "render_tree", "tree_text", "tree_json",
    "tree_mermaid", "tree_dot", "tree_summary", "operations_text", "jobs_text", "stats_text", "pending_text",
    "lineage_tree", "monitor_text",
]

#: Output formats of listings, and of trees.
FORMATS = ("text", "json")
TREE_FORMATS = ("text", "json", "mermaid", "dot")

#: Terminal colour of each job and operation state.
STATE_COLOURS = {
    "pending": "yellow", "held": "yellow", "dispatched": "blue", "started": "cyan", "retrying": "magenta",
    "succeeded": "green", "failed": "red", "revoked": "bright_black", "cancelled": "bright_black",
    "running": "cyan", "partially_failed": "yellow",
}
#: Fill colours of diagram nodes (light, readable with black text).
DIAGRAM_FILLS = {
    "pending": "#fff3cd", "held": "#ffe8a1", "dispatched": "#cfe2ff", "started": "#cff4fc",
    "retrying": "#f3d9fa", "succeeded": "#d1e7dd", "failed": "#f8d7da", "revoked": "#e2e3e5",
    "cancelled": "#e2e3e5",
}
#: Diagram labels show ids shortened to this many characters (the full id is in JSON).
SHORT_ID = 8


# ---- JSON -------------------------------------------------------------------------------------
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


def to_json(value: Any) -> str:
    """Indented JSON of a listing or stats (use :func:`tree_json` for trees)."""
    return json.dumps(jsonable(value), indent=2, sort_keys=False)


def tree_json(tree: dict) -> str:
    """A tree as JSON, one node per line, written without recursion (trees may be 1,000 levels deep)."""
    out: list[str] = []
    add = out.append
    # Stack items: (node, its indent, what goes before its line) or text to emit as is.
    stack: list[Any] = [(tree, "", "")]
    pop, push = stack.pop, stack.append
    while stack:
        item = pop()
        if item.__class__ is str:
            add(item)
            continue
        node, pad, before = item
        fields = dict(node)
        del fields["children"]
        head = _encode(fields)[:-1]  # the object without its closing brace
        kids = node.get("children")
        if not kids:
            add(f'{before}{pad}{head}, "children": []}}')
            continue
        add(f'{before}{pad}{head}, "children": [\n')
        push(f"\n{pad}]}}")
        inner = pad + "  "
        for index in range(len(kids) - 1, 0, -1):
            push((kids[index], inner, ",\n"))
        push((kids[0], inner, ""))
    return "".join(out)


# ---- trees: shared walk -----------------------------------------------------------------------
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


def _style(text: str, color: bool, **style: Any) -> str:
    return click.style(text, **style) if color else text


def _state(state: str | None, color: bool, width: int = 0) -> str:
    text = (state or "-").ljust(width)
    colour = STATE_COLOURS.get(state or "")
    if not colour:
        return text
    return _style(text, color, fg=colour, bold=True) if state == "failed" else _style(text, color, fg=colour)


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
    states: dict[str, int] = {}
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
        name = node.get("task_name") or "?"
        if color:
            parts = [_style(name, color, bold=True) if parent_queue is _TOP else name, _state(state, color),
                     _style(node["id"], color, dim=True)]
        else:
            parts = [name, state or "-", node["id"]]
        queue = node.get("queue")
        if queue and queue != parent_queue:
            parts.append(f"queue={queue}")
        line = lead + "  ".join(parts)
        if highlight is not None and node["id"] == highlight:
            line += "  " + _style("◀", color, bold=True)
        add(line)
        hidden = node.get("hidden_children")
        if hidden:
            hidden_total += hidden
            add(kid_prefix + "└── " + _style(f"… {hidden} more (raise {cut_option})", color, dim=True))
        kids = node.get("children")
        if kids:
            push((kids[-1], kid_prefix + "└── ", kid_prefix + "    ", queue))
            if len(kids) > 1:
                mid, deeper = kid_prefix + "├── ", kid_prefix + "│   "
                extend([(kid, mid, deeper, queue) for kid in kids[-2::-1]])
    if summary:
        counts = ", ".join(f"{state} {n}" for state, n in sorted(states.items(), key=lambda kv: str(kv[0])))
        more = f", {hidden_total} more below" if hidden_total else ""
        lines.append("")
        lines.append(f"{jobs} jobs, {deepest - top + 1} levels{more} ({counts})")
    return "\n".join(lines)


def _mermaid_text(value: Any) -> str:
    text = str(value)
    for raw, entity in (("&", "#amp;"), ('"', "#quot;"), ("<", "#lt;"), (">", "#gt;")):
        text = text.replace(raw, entity)
    return text.replace("\n", " ")


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
    return str(value).replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


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


# ---- listings ---------------------------------------------------------------------------------
def _when(value: Any) -> str:
    if isinstance(value, datetime):
        return value.strftime("%Y-%m-%d %H:%M:%S")
    return "-" if value is None else str(value)


def _seconds(value: float | None) -> str:
    if value is None:
        return "-"
    if value < 1:
        return f"{value * 1000:.0f}ms"
    if value < 120:
        return f"{value:.2f}s"
    if value < 7200:
        return f"{value / 60:.1f}m"
    return f"{value / 3600:.1f}h"


def _percent(value: float | None) -> str:
    return "-" if value is None else f"{value * 100:.1f}%"


def _clip(value: Any, width: int = 40) -> str:
    text = "-" if value is None else str(value).replace("\n", " ")
    return text if len(text) <= width else text[:width - 1] + "…"


def _table(headers: list[str], rows: list[list[str]], color: bool, state_column: int | None = None) -> list[str]:
    """Left-aligned columns; the state column is coloured after padding (ANSI codes have no width)."""
    widths = [len(h) for h in headers]
    for row in rows:
        for index, cell in enumerate(row):
            widths[index] = max(widths[index], len(cell))
    lines = ["  ".join(_style(h.ljust(w), color, bold=True) for h, w in zip(headers, widths)).rstrip()]
    for row in rows:
        cells = []
        for index, (cell, width) in enumerate(zip(row, widths)):
            cells.append(_state(cell, color, width) if index == state_column else cell.ljust(width))
        lines.append("  ".join(cells).rstrip())
    return lines


def _progress(progress: dict | None) -> str:
    if not progress:
        return "-"
    percent = progress.get("percent")
    return f"{progress['done']}/{progress['total']}" + ("" if percent is None else f" {percent:.0f}%")


def _counts(counts: dict[str, int], color: bool) -> str:
    if not counts:
        return "no children"
    return ", ".join(f"{_state(state, color)} {n}" for state, n in sorted(counts.items()))


def operations_text(operations: list[dict], *, detailed: bool = False, color: bool = False) -> str:
    """Spawn operations as a table, newest first; ``detailed`` adds a line of counts, timing and error each."""
    if not operations:
        return "No spawn operations."
    headers = ["CREATED (UTC)", "OPERATION", "PARENT JOB", "HANDLER", "QUEUE", "STATE", "PROGRESS"]
    rows = [[_when(op["created_at"]), op["id"], op["parent_id"], _clip(op.get("handler"), 30),
             _clip(op.get("queue"), 30), op["state"], _progress(op.get("progress"))] for op in operations]
    lines = _table(headers, rows, color, state_column=5)
    if not detailed:
        return "\n".join(lines)
    out = [lines[0]]
    for line, op in zip(lines[1:], operations):
        out.append(line)
        duration = None
        if op.get("finished_at") and op.get("created_at"):
            duration = (op["finished_at"] - op["created_at"]).total_seconds()
        out.append(f"    task {op.get('parent_task') or '-'}, depth {op.get('depth')}, root {op.get('root_id')}")
        out.append(f"    children: {_counts(op.get('counts') or {}, color)}; "
                   f"finished {_when(op.get('finished_at'))} ({_seconds(duration)})")
        if op.get("error"):
            out.append("    error: " + _style(_clip(op["error"], 200), color, fg="red"))
    return "\n".join(out)


def jobs_text(jobs: list[dict], *, color: bool = False) -> str:
    """Jobs as a table in spawn order (``tree --children-only``, lineage lists)."""
    if not jobs:
        return "No jobs."
    headers = ["#", "JOB", "TASK", "STATE", "QUEUE", "STARTED (UTC)", "FINISHED (UTC)"]
    rows = [[str(job.get("position", "")), job["id"], _clip(job.get("task_name"), 40), job["state"],
             _clip(job.get("queue"), 30), _when(job.get("started_at")), _when(job.get("finished_at"))]
            for job in jobs]
    return "\n".join(_table(headers, rows, color, state_column=3))


def stats_text(stats: dict, *, color: bool = False) -> str:
    """The stats of :func:`celery_spawn.store.queries.stats` for people."""
    window = stats["window"]
    scope = f"queue {stats['queue']}" if stats.get("queue") is not None else "all queues"
    bold = functools.partial(_style, color=color, bold=True)
    durations = stats["durations"]
    lines = [
        bold(f"Spawn statistics, last {window['hours']:g} h ({_when(window['since'])} to "
             f"{_when(window['until'])} UTC), {scope}"),
        f"  operations          {stats['operations']}  ({_counts(stats['operations_by_state'], color)})",
        f"  children            {stats['children']}  ({_counts(stats['children_by_state'], color)})",
        (f"  children per spawn  avg {_num(stats['avg_children_per_spawn'])}, "
         f"max {_num(stats['max_children_per_spawn'])}"),
        (f"  success rate        {_percent(stats['success_rate'])} of finished operations, "
         f"{_percent(stats['child_success_rate'])} of finished children"),
        (f"  operation duration  avg {_seconds(durations['operation_avg_seconds'])}, "
         f"max {_seconds(durations['operation_max_seconds'])}"),
        (f"  child run time      avg {_seconds(durations['child_avg_seconds'])}, "
         f"max {_seconds(durations['child_max_seconds'])}"),
    ]
    for title, key in (("By queue", "queue"), ("By handler", "handler")):
        groups = stats.get(f"by_{key}") or []
        if not groups:
            continue
        lines += ["", bold(title)]
        rows = [[_clip(g[key], 40), str(g["operations"]), str(g["children"]), _num(g["avg_children_per_spawn"]),
                 _num(g["max_children_per_spawn"]), _percent(g["success_rate"]),
                 _seconds(g["avg_duration_seconds"]), _seconds(g["max_duration_seconds"])] for g in groups]
        lines += ["  " + line for line in _table(
            [key.upper(), "OPERATIONS", "CHILDREN", "AVG", "MAX", "SUCCESS", "AVG TIME", "MAX TIME"], rows, False)]
    if "by_task" in stats:
        lines += ["", bold("Children by task")]
        rows = [[_clip(t["task_name"], 50), str(t["jobs"]), str(t["succeeded"]), str(t["failed"]),
                 _percent(t["success_rate"]), _seconds(t["avg_seconds"]), _seconds(t["max_seconds"])]
                for t in stats["by_task"]]
        lines += ["  " + line for line in _table(
            ["TASK", "JOBS", "SUCCEEDED", "FAILED", "SUCCESS", "AVG TIME", "MAX TIME"], rows, False)]
        for title, key, value in (("Largest operations", "largest", lambda o: f"{o['total']} children"),
                                  ("Slowest operations", "slowest", lambda o: _seconds(o["seconds"]))):
            if stats.get(key):
                lines += ["", bold(title)]
                lines += [f"  {o['id']}  parent {o['parent_id']}  {_clip(o.get('handler'), 30)}  {value(o)}"
                          for o in stats[key]]
    return "\n".join(lines)


def _num(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:g}"
    return str(value)


def pending_text(entries: list[dict], *, color: bool = False) -> str:
    """Operations with undispatched children, each followed by its first waiting children."""
    if not entries:
        return "Nothing pending: every recorded child has been dispatched."
    headers = ["OPERATION", "PARENT JOB", "HANDLER", "PENDING", "HELD", "OLDEST (UTC)", "LAST TOUCH (UTC)"]
    rows = [[e["operation_id"], e.get("parent_id") or "-", _clip(e.get("handler"), 30), str(e["pending"]),
             str(e["held"]), _when(e.get("oldest")), _when(e.get("updated_at"))] for e in entries]
    table = _table(headers, rows, color)
    lines = [table[0]]
    for line, entry in zip(table[1:], entries):
        lines.append(line)
        jobs = entry.get("jobs") or []
        for index, job in enumerate(jobs):
            last = index == len(jobs) - 1 and len(jobs) >= entry["pending"] + entry["held"]
            deps = job.get("pending_deps") if job.get("state") == "held" else 0
            waits = f", waits on {deps}" if deps else ""
            lines.append(f"  {'└──' if last else '├──'} #{job['position']} {job['id']}  {job['task_name']}  "
                         f"{_state(job['state'], color)}{waits}  queue={job.get('queue') or '-'}")
        rest = entry["pending"] + entry["held"] - len(jobs)
        if rest > 0:
            lines.append(f"  └── … {rest} more")
    return "\n".join(lines)


def monitor_text(snapshot: dict, *, color: bool = False) -> str:
    """One frame of ``celery spawn monitor``: running operations with progress bars, last hour's stats."""
    bold = functools.partial(_style, color=color, bold=True)
    stats = snapshot["stats"]
    scope = f"queue {snapshot['queue']}" if snapshot.get("queue") is not None else "all queues"
    lines = [
        (bold(f"celery spawn monitor: {snapshot['store']}, {scope}")
         + f"  ({_when(snapshot['at'])} UTC, every {snapshot['interval']:g}s, Ctrl-C to quit)"),
        "",
        (f"last hour: {stats['operations']} operations ({_counts(stats['operations_by_state'], color)}), "
         f"{stats['children']} children ({_counts(stats['children_by_state'], color)})"),
        (f"success rate {_percent(stats['success_rate'])} of operations, "
         f"{_percent(stats['child_success_rate'])} of children; "
         f"child run time avg {_seconds(stats['durations']['child_avg_seconds'])}"),
        (f"waiting to dispatch: {snapshot['pending_children']} children in {snapshot['pending_operations']}"
         f"{'+' if snapshot.get('pending_more') else ''} operations"),
        "",
        bold(f"Running operations ({len(snapshot['running'])})"),
    ]
    if not snapshot["running"]:
        lines.append("  none")
    for op in snapshot["running"]:
        progress = op.get("progress") or {}
        total = progress.get("total") or 0
        done = progress.get("done") or 0
        width = 24
        filled = int(width * done / total) if total else 0
        bar = _style("█" * filled, color, fg="green") + "░" * (width - filled)
        lines.append(f"  {op['id']}  {_clip(op.get('handler'), 24):24}  {bar} {done}/{total}  "
                     f"parent {op['parent_id']}")
    if snapshot.get("error"):
        lines += ["", _style(f"store error: {snapshot['error']}", color, fg="red")]
    return "\n".join(lines)
