"""The explorer's summary table, and its place in ``docs/reliability.md`` (between two marker comments)."""
from __future__ import annotations

import collections
import datetime
from pathlib import Path

from tests.chaos.checker import ScheduleResult
from tests.chaos.schedule import FAULT_KINDS

DOCS = Path(__file__).resolve().parent.parent.parent / "docs" / "reliability.md"
BEGIN = "<!-- chaos-explorer-table:begin -->"
END = "<!-- chaos-explorer-table:end -->"
STACK_NAMES = {"redis-postgresql": "Redis + PostgreSQL", "amqp-mysql": "RabbitMQ + MariaDB"}
MACHINE = "2-core VM"


def table(results: list[ScheduleResult], seed: int, when: datetime.date | None = None,
          planned: int | None = None) -> str:
    """Markdown: a row per stack and a total, then the faults by kind and the notes.

    ``planned``: the schedules the run was asked for, when it was stopped before the end.
    """
    when = when or datetime.date.today()
    cut_short = ""
    if planned and planned > len(results):
        cut_short = f" (the run was stopped after these, of {planned} planned)"
    lines = [f"{len(results)} schedules from seed {seed}{cut_short}, {when.isoformat()}, {MACHINE}:", "",
             "| stack | schedules | faults injected | children | lost | started again after success "
             "| callbacks exactly once |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    groups = [(STACK_NAMES.get(stack, stack), [r for r in results if r.stack == stack])
              for stack in dict.fromkeys(r.stack for r in results)]
    if len(groups) > 1:
        groups.append(("all", results))
    for name, rows in groups:
        lines.append(f"| {name} | {len(rows)} | {sum(len(r.injected) for r in rows):,} "
                     f"| {sum(r.children for r in rows):,} | {sum(len(r.lost) for r in rows)} "
                     f"| {sum(len(r.doubled) for r in rows)} "
                     f"| {sum(r.callbacks_once for r in rows):,} of {sum(r.operations for r in rows):,} |")
    kinds = collections.Counter(kind for r in results for kind in r.injected + r.skipped)
    skipped = sum(len(r.skipped) for r in results)
    reruns = sum(r.reruns for r in results)
    backend_only = sum(r.backend_only for r in results)
    callbacks_backend_only = sum(r.callbacks_backend_only for r in results)
    exits = sum(r.worker_exits for r in results)
    failed = [r.seed for r in results if not r.ok]
    lines += ["", "Faults drawn, by kind: " + ", ".join(f"{kind} {kinds.get(kind, 0)}" for kind in FAULT_KINDS)
              + "." + (f" {skipped} of them found nothing to hit (a kill while no worker process was up), "
                       "so are not counted as injected." if skipped else ""),
              f"Children whose body ran more than once before it succeeded (killed or cut mid-run): {reruns}; "
              f"children whose success only the result backend saw (killed between storing it and "
              f"`task_success`): {backend_only}, and callbacks: {callbacks_backend_only}; workers that exited by "
              f"themselves and were restarted: {exits}.",
              "Schedules with a problem: " + (", ".join(f"seed {seed}" for seed in failed) if failed else "none") + "."]
    return "\n".join(lines)


def write_docs(text: str, path: Path = DOCS) -> None:
    """Replace what lies between the markers of ``path`` with ``text``."""
    document = path.read_text()
    head, found, rest = document.partition(BEGIN)
    _, found_end, tail = rest.partition(END)
    if not (found and found_end):
        raise ValueError(f"{path} lacks the markers {BEGIN} and {END}")
    path.write_text(f"{head}{BEGIN}\n{text}\n{END}{tail}")
