"""The verdict on one schedule: the store's final tree against the history the tasks wrote.

Every child of the plan runs to success when nothing breaks, so after a
schedule has healed and completed:

* **lost**: a child the store recorded that did not end ``succeeded`` (``lost``,
  failed, cancelled, or never final), or a child of the plan the store never
  recorded;
* **doubled** (started again after it succeeded): a child whose body started
  after Celery had stored its success (a ``start`` row later than its first
  ``succeeded`` row), or that succeeded twice;
* **callbacks**: every operation of the tree completed and ran its
  ``on_complete`` exactly once (one ``callback`` row, or none and its success
  in the result backend: a callback's pool process killed between the two,
  as for children below);
* **agreement**: the store says ``succeeded`` exactly for the children the
  history saw succeed. A pool process killed between Celery storing a
  child's result and ``task_success`` leaves no ``succeeded`` row; the store
  learns that success from the result backend, and so does the check.

Anything else that does not add up (a second operation for a parent, a
history row for a job the store does not know) is a problem too.
"""
from __future__ import annotations

import collections
import dataclasses
from typing import Callable

import sqlalchemy as sa

from celery_spawn import get_state
from celery_spawn.engine.completion import completion_task_id
from celery_spawn.protocol import FINAL_JOB_STATES, SUCCEEDED
from celery_spawn.store import schema as s
from tests.chaos import history
from tests.chaos.schedule import Schedule


@dataclasses.dataclass
class ScheduleResult:
    """What one schedule did and what the check found."""

    seed: int
    stack: str
    children: int = 0
    operations: int = 0
    lost: list[str] = dataclasses.field(default_factory=list)
    doubled: list[str] = dataclasses.field(default_factory=list)
    callbacks_once: int = 0
    problems: list[str] = dataclasses.field(default_factory=list)
    #: Children whose success only the result backend saw (killed between storing it and task_success).
    backend_only: int = 0
    #: Callbacks whose success only the result backend saw (the same, for an ``on_complete``).
    callbacks_backend_only: int = 0
    #: Bodies that ran more than once before succeeding (a kill or a copy, then a run to success).
    reruns: int = 0
    injected: list[str] = dataclasses.field(default_factory=list)
    skipped: list[str] = dataclasses.field(default_factory=list)
    workers_started: int = 0
    worker_exits: int = 0
    seconds: float = 0.0

    @property
    def ok(self) -> bool:
        return not (self.problems or self.lost or self.doubled) and self.callbacks_once == self.operations


def _rows(app, query) -> list[dict]:
    with get_state(app).store.read() as conn:
        return [dict(r) for r in conn.execute(query).mappings()]


def tree_operations(app, root_id: str) -> list[dict]:
    return _rows(app, sa.select(s.operations).where(s.operations.c.root_id == root_id))


def tree_children(app, root_id: str) -> list[dict]:
    return _rows(app, sa.select(s.jobs).where(s.jobs.c.root_id == root_id, s.jobs.c.id != root_id))


def check(app, history_engine: sa.Engine, schedule: Schedule, root_id: str) -> ScheduleResult:
    """Read the tree of ``root_id`` from the store and its history, and judge them."""
    return judge(schedule, tree_children(app, root_id), tree_operations(app, root_id),
                 history.read(history_engine, root_id),
                 lambda job_id: app.AsyncResult(job_id).state == "SUCCESS")


def judge(schedule: Schedule, children: list[dict], ops: list[dict], rows: list[dict],
          backend_succeeded: Callable[[str], bool]) -> ScheduleResult:
    """The verdict from the store's child and operation rows and the history rows (pure but for the backend)."""
    result = ScheduleResult(schedule.seed, schedule.stack)
    jobs = {row["id"]: row for row in children}
    starts: dict[str, list[float]] = collections.defaultdict(list)
    successes: dict[str, list[float]] = collections.defaultdict(list)
    callbacks: collections.Counter[str] = collections.Counter()
    for row in rows:
        if row["event"] == history.START:
            starts[row["job_id"]].append(row["at"])
        elif row["event"] == history.SUCCEEDED:
            successes[row["job_id"]].append(row["at"])
        elif row["event"] == history.CALLBACK:
            callbacks[row["job_id"]] += 1

    result.children, result.operations = len(jobs), len(ops)
    if len(jobs) != schedule.children:
        result.problems.append(f"the store recorded {len(jobs)} children, the plan has {schedule.children}")
        result.lost.extend(f"<unrecorded #{n}>" for n in range(max(0, schedule.children - len(jobs))))
    if len(ops) != schedule.operations:
        result.problems.append(f"the store recorded {len(ops)} operations, the plan has {schedule.operations}")
    per_parent = collections.Counter(op["parent_id"] for op in ops)
    result.problems.extend(f"{n} operations for parent {parent}" for parent, n in per_parent.items() if n > 1)

    for job_id, job in jobs.items():
        if job["state"] != SUCCEEDED:
            result.lost.append(job_id)
            final = "final" if job["state"] in FINAL_JOB_STATES else "not final"
            result.problems.append(f"child {job_id} ended {job['state']} ({final}; error {job['error']!r})")
        succeeded = successes.get(job_id, [])
        ran = starts.get(job_id, [])
        if len(succeeded) > 1 or (succeeded and any(at > succeeded[0] for at in ran)):
            result.doubled.append(job_id)
            result.problems.append(f"child {job_id} started again after it succeeded: starts {ran}, "
                                   f"successes {succeeded}")
        if len(ran) > 1:
            result.reruns += 1
        # Agreement of the store's final state with the history.
        if job["state"] == SUCCEEDED and not succeeded:
            if ran and backend_succeeded(job_id):
                result.backend_only += 1
            else:
                result.problems.append(f"child {job_id} is succeeded in the store, the history saw "
                                       f"{len(ran)} starts and no success")
        elif job["state"] != SUCCEEDED and succeeded:
            result.problems.append(f"child {job_id} succeeded in the history, the store says {job['state']}")
    strangers = (set(starts) | set(successes)) - set(jobs)
    if strangers:
        result.problems.append(f"the history has rows for jobs the store does not know: {sorted(strangers)[:5]}")

    for op in ops:
        count = callbacks.get(op["id"], 0)
        if count == 1:
            result.callbacks_once += 1
        elif count == 0 and backend_succeeded(completion_task_id(op["id"])):
            result.callbacks_once += 1
            result.callbacks_backend_only += 1
        else:
            result.problems.append(f"operation {op['id']} ({op['state']}, completed={op['completed']}, callback "
                                   f"{op['callback_state']}, updated {op['updated_at']}) ran its on_complete "
                                   f"{count} times")
        if op["state"] != "succeeded":
            result.problems.append(f"operation {op['id']} ended {op['state']}")
    strange_callbacks = set(callbacks) - {op["id"] for op in ops}
    if strange_callbacks:
        result.problems.append(f"callbacks of operations the store does not know: {sorted(strange_callbacks)[:5]}")
    return result
