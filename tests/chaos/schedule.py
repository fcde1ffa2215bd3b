"""Fault schedules: a workload tree and faults at random moments, drawn from one seed.

Pure: ``generate(seed, stack)`` always returns the same schedule, so a failing
schedule is replayed alone with ``python -m tests.chaos --seed <seed>
--schedules 1 --stack <stack>``.
"""
from __future__ import annotations

import dataclasses
import random
from typing import Any

STACKS = ("redis-postgresql", "amqp-mysql")

#: Faults the runner injects. Kills are instants; outages last ``duration`` seconds through a TcpProxy.
KILL_WORKER = "kill-worker"      # SIGKILL of the whole worker (main process and pool); a new one starts at once
KILL_CHILD = "kill-child"        # SIGKILL of one process the worker forked (a pool process or its background process)
BROKER_CUT = "broker-cut"        # every broker connection reset, new ones refused
BROKER_HANG = "broker-hang"      # broker connections accepted and never answered, reset when the hang ends
STORE_CUT = "store-cut"
STORE_HANG = "store-hang"
CLOCK_SKEW = "clock-skew"        # a second worker whose wall clock runs SKEW ahead joins for ``duration`` seconds
#: The kinds drawn one by one (1 to 4 per schedule).
DRAWN_KINDS = (KILL_WORKER, KILL_CHILD, BROKER_CUT, BROKER_HANG, STORE_CUT, STORE_HANG)
FAULT_KINDS = (*DRAWN_KINDS, CLOCK_SKEW)
OUTAGES = frozenset({BROKER_CUT, BROKER_HANG, STORE_CUT, STORE_HANG})
#: Faults that last ``duration`` seconds (the others are instants).
LASTING = OUTAGES | {CLOCK_SKEW}
#: Share of schedules with a skewed-clock worker, drawn from a generator of its own so that adding this
#: fault left every earlier seed's tree and faults as they were.
SKEW_SHARE = 0.3
#: Stacks that get a skewed-clock worker. Not Redis: kombu's Redis transport hands unacknowledged messages out
#: again by the clock of the worker that looks (``restore_visible``: older than ``visibility_timeout`` by its
#: ``time()``), so a worker 10 minutes ahead redelivers every message the other worker holds. Children skip such
#: copies; an ``on_complete`` runs again (docs/reliability.md, "Not guaranteed").
SKEW_STACKS = ("amqp-mysql",)
#: Shortest and longest stay of the skewed-clock worker, in seconds (its recovery sweep runs every 2 s).
SKEW_SECONDS = (4.0, 12.0)

#: Seconds after the root is sent within which faults start.
FAULT_WINDOW = 6.0
#: Shortest and longest outage, in seconds.
OUTAGE_SECONDS = (0.5, 4.0)
#: Children of the whole tree at most (every level).
MAX_CHILDREN = 40


@dataclasses.dataclass(frozen=True)
class Fault:
    """One fault: what, when (seconds after the root was sent) and for how long (0 for a kill)."""

    at: float
    kind: str
    duration: float = 0.0

    def describe(self) -> str:
        span = f" for {self.duration:.1f}s" if self.duration else ""
        return f"{self.kind} at {self.at:.2f}s{span}"


@dataclasses.dataclass(frozen=True)
class Schedule:
    """A workload tree (``plan``, see :func:`make_plan`) and the faults injected while it runs."""

    seed: int
    stack: str
    plan: dict[str, Any]
    faults: tuple[Fault, ...]

    @property
    def children(self) -> int:
        return count_children(self.plan)

    @property
    def operations(self) -> int:
        return count_operations(self.plan)

    def describe(self) -> str:
        faults = ", ".join(f.describe() for f in self.faults) or "no fault"
        return (f"seed {self.seed} [{self.stack}]: {self.children} children in {self.operations} operations; "
                f"{faults}")

    def replay(self) -> str:
        return f"python -m tests.chaos --seed {self.seed} --schedules 1 --stack {self.stack}"


def generate(seed: int, stack: str) -> Schedule:
    """The schedule of ``seed`` on ``stack``."""
    if stack not in STACKS:
        raise ValueError(f"unknown stack {stack!r}; known: {', '.join(STACKS)}")
    rng = random.Random(seed)
    plan = make_plan(rng, depth=0, budget=[MAX_CHILDREN])
    faults = [make_fault(rng) for _ in range(rng.randint(1, 4))]
    skew = random.Random(f"clock-skew {seed}")
    if skew.random() < SKEW_SHARE and stack in SKEW_STACKS:
        faults.append(Fault(round(skew.uniform(0, FAULT_WINDOW), 2), CLOCK_SKEW, round(skew.uniform(*SKEW_SECONDS), 2)))
    return Schedule(seed, stack, plan, tuple(sorted(faults, key=lambda f: f.at)))


def make_fault(rng: random.Random) -> Fault:
    kind = rng.choice(DRAWN_KINDS)
    duration = round(rng.uniform(*OUTAGE_SECONDS), 2) if kind in OUTAGES else 0.0
    return Fault(round(rng.uniform(0, FAULT_WINDOW), 2), kind, duration)


def make_plan(rng: random.Random, depth: int, budget: list[int]) -> dict[str, Any]:
    """One spawn: its children (a pause, earlier siblings it waits for, maybe a spawn of its own) and its delay.

    ``{"delay_ms": int, "children": [{"pause": float, "after": [sibling index, ...], "plan": plan | None}]}``;
    ``budget`` (one item, shared by every level) caps the children of the whole tree.
    """
    count = min(budget[0], rng.randint(8, 16) if depth == 0 else rng.randint(2, 5))
    budget[0] -= count
    children: list[dict[str, Any]] = []
    for index in range(count):
        after = sorted(rng.sample(range(index), min(index, rng.randint(1, 2)))) if index and rng.random() < 0.3 else []
        nested = None
        if depth < 2 and budget[0] >= 2 and rng.random() < (0.3 if depth == 0 else 0.2):
            nested = make_plan(rng, depth + 1, budget)
        children.append({"pause": rng.choice((0.0, 0.05, 0.2, 0.5)), "after": after, "plan": nested})
    return {"delay_ms": rng.choice((0, 0, 50, 200)), "children": children}


def count_children(plan: dict[str, Any]) -> int:
    return sum(1 + (count_children(c["plan"]) if c["plan"] else 0) for c in plan["children"])


def count_operations(plan: dict[str, Any]) -> int:
    return 1 + sum(count_operations(c["plan"]) for c in plan["children"] if c["plan"])
