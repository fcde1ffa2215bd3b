"""Listings for people: operations, jobs, stats, pending work and the monitor's frame, as aligned tables."""
from __future__ import annotations

import functools
from datetime import datetime
from typing import Any


from .escape import has_control, printable
from .style import state_word, style


def _when(value: Any) -> str:
    if isinstance(value, datetime):
        return value.strftime("%Y-%m-%d %H:%M:%S")
    return "-" if value is None else printable(value)


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
    text = "-" if value is None else printable(value)
    return text if len(text) <= width else text[:width - 1] + "…"


def _table(headers: list[str], rows: list[list[str]], color: bool, state_column: int | None = None) -> list[str]:
    """Left-aligned columns; the state column is coloured after padding (ANSI codes have no width).

    Every cell is written :func:`printable` first: a control character never reaches the terminal.
    """
    rows = [[printable(cell) for cell in row] if has_control("".join(row)) else row for row in rows]
    widths = [len(h) for h in headers]
    for row in rows:
        for index, cell in enumerate(row):
            widths[index] = max(widths[index], len(cell))
    lines = ["  ".join(style(h.ljust(w), color, bold=True) for h, w in zip(headers, widths)).rstrip()]
    for row in rows:
        cells = []
        for index, (cell, width) in enumerate(zip(row, widths)):
            cells.append(state_word(cell, color, width) if index == state_column else cell.ljust(width))
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
    return ", ".join(f"{state_word(state, color)} {n}" for state, n in sorted(counts.items()))


def operations_text(operations: list[dict], *, detailed: bool = False, color: bool = False) -> str:
    """Spawn operations as a table, newest first; ``detailed`` adds a line of counts, timing and error each.

    A LABEL column follows OPERATION when any operation shown has a label.
    """
    if not operations:
        return "No spawn operations."
    labelled = any(op.get("label") is not None for op in operations)
    headers = ["CREATED (UTC)", "OPERATION", *(["LABEL"] if labelled else []), "PARENT JOB", "HANDLER", "QUEUE",
               "STATE", "PROGRESS"]
    rows = [[_when(op["created_at"]), op["id"], *([_clip(op.get("label"), 64)] if labelled else []), op["parent_id"],
             _clip(op.get("handler"), 30), _clip(op.get("queue"), 30), op["state"], _progress(op.get("progress"))]
            for op in operations]
    lines = _table(headers, rows, color, state_column=headers.index("STATE"))
    if not detailed:
        return "\n".join(lines)
    out = [lines[0]]
    for line, op in zip(lines[1:], operations):
        out.append(line)
        duration = None
        if op.get("finished_at") and op.get("created_at"):
            duration = (op["finished_at"] - op["created_at"]).total_seconds()
        out.append(f"    task {printable(op.get('parent_task') or '-')}, depth {op.get('depth')}, "
                   f"root {printable(op.get('root_id'))}")
        out.append(f"    children: {_counts(op.get('counts') or {}, color)}; "
                   f"finished {_when(op.get('finished_at'))} ({_seconds(duration)})")
        if op.get("error"):
            out.append("    error: " + style(_clip(op["error"], 200), color, fg="red"))
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
    scope = f"queue {printable(stats['queue'])}" if stats.get("queue") is not None else "all queues"
    bold = functools.partial(style, color=color, bold=True)
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
                lines += [f"  {printable(o['id'])}  parent {printable(o['parent_id'])}  "
                          f"{_clip(o.get('handler'), 30)}  {value(o)}" for o in stats[key]]
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
    headers = ["OPERATION", "PARENT JOB", "HANDLER", "PENDING", "HELD", "SCHEDULED", "OLDEST (UTC)",
               "LAST TOUCH (UTC)"]
    rows = [[e["operation_id"], e.get("parent_id") or "-", _clip(e.get("handler"), 30), str(e["pending"]),
             str(e["held"]), str(e.get("scheduled", 0)), _when(e.get("oldest")), _when(e.get("updated_at"))]
            for e in entries]
    table = _table(headers, rows, color)
    lines = [table[0]]
    for line, entry in zip(table[1:], entries):
        lines.append(line)
        jobs = entry.get("jobs") or []
        waiting = entry["pending"] + entry["held"] + entry.get("scheduled", 0)
        for index, job in enumerate(jobs):
            last = index == len(jobs) - 1 and len(jobs) >= waiting
            lines.append(f"  {'└──' if last else '├──'} #{job['position']} {printable(job['id'])}  "
                         f"{printable(job['task_name'])}  {state_word(job['state'], color)}{_waits(job)}  "
                         f"queue={printable(job.get('queue') or '-')}")
        rest = waiting - len(jobs)
        if rest > 0:
            lines.append(f"  └── … {rest} more")
    return "\n".join(lines)


def _waits(job: dict) -> str:
    """What a waiting child waits for: its dependencies, or its time."""
    deps = job.get("pending_deps") if job.get("state") == "held" else 0
    if deps:
        return f", waits on {deps}"
    if job.get("state") == "scheduled" and job.get("not_before") is not None:
        return f", due {_when(job['not_before'])}"
    return ""


def monitor_text(snapshot: dict, *, color: bool = False) -> str:
    """One frame of ``celery spawn monitor``: running operations with progress bars, last hour's stats."""
    bold = functools.partial(style, color=color, bold=True)
    stats = snapshot["stats"]
    scope = f"queue {printable(snapshot['queue'])}" if snapshot.get("queue") is not None else "all queues"
    lines = [
        (bold(f"celery spawn monitor: {printable(snapshot['store'])}, {scope}")
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
        bar = style("█" * filled, color, fg="green") + "░" * (width - filled)
        lines.append(f"  {printable(op['id'])}  {_clip(op.get('handler'), 24):24}  {bar} {done}/{total}  "
                     f"parent {printable(op['parent_id'])}")
    if snapshot.get("error"):
        lines += ["", style(f"store error: {printable(snapshot['error'])}", color, fg="red")]
    return "\n".join(lines)
