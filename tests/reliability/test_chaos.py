"""The randomized fault explorer (``tests/chaos``) under pytest: random fault schedules against real workers.

Ten schedules in every run, on Redis + PostgreSQL (``SPAWN_TEST_CHAOS_STACK=both``
alternates with RabbitMQ + MariaDB, whose schedules take about twice as long), two hundred
on both stacks with ``--run-slow``, which then
writes its summary table into ``docs/reliability.md``. Each schedule's seed is printed with the
command that replays it alone; ``SPAWN_TEST_SEED`` picks other schedules.

The ten always-on schedules may meet, by the chance of timing, an open problem
``docs/reliability.md`` lists under "Not guaranteed". A schedule that fails is
replayed once, on a fresh rig, and fails the test if it fails again; the first
failure is printed either way. ``scripts/test.sh`` runs this module by itself, after
the other modules (the ``alone`` marker).
"""
from __future__ import annotations

import os

import pytest

from tests.chaos.report import table, write_docs
from tests.chaos.runner import explore, plan_schedules, summary_line

#: ``alone``: scripts/test.sh runs this module after the rest, by itself: its killed workers and cut services
#: would load the machine under the tests beside it (whose waits are sized for a busy, not a thrashing, host).
pytestmark = [pytest.mark.integration, pytest.mark.alone]

SEED = int(os.environ.get("SPAWN_TEST_SEED", "1600"))


#: The stacks of the always-on schedules. RabbitMQ + MariaDB schedules take about twice as long as Redis +
#: PostgreSQL ones: they run with ``--run-slow`` (and here with ``SPAWN_TEST_CHAOS_STACK=both``).
ALWAYS_ON_STACK = os.environ.get("SPAWN_TEST_CHAOS_STACK", "redis-postgresql")


def run(count: int, tmp_path, artifacts, capsys, stack: str = "both") -> list:
    with capsys.disabled():  # a run takes minutes: show each schedule as it ends
        results = explore(plan_schedules(count, SEED, stack), tmp_path, artifacts / "chaos",
                          say=lambda line: print(line, flush=True))
        print(table(results, SEED))
    return results


def assert_clean(results: list, stacks: set[str]) -> None:
    failed = [r for r in results if not r.ok]
    assert not failed, "\n".join(f"seed {r.seed} [{r.stack}]: {summary_line(r)}" for r in failed)
    assert {r.stack for r in results} == stacks


def replay_failures(results: list, tmp_path, artifacts, capsys) -> list:
    """Each failed schedule run once more (see the module's docstring); the replay's result replaces it."""
    from tests.chaos.schedule import generate

    final = []
    for result in results:
        if result.ok:
            final.append(result)
            continue
        with capsys.disabled():
            print(f"seed {result.seed} [{result.stack}] failed: {summary_line(result)}; replaying it once", flush=True)
            [again] = explore([generate(result.seed, result.stack)], tmp_path / f"replay-{result.seed}",
                              artifacts / "chaos", say=lambda line: print(line, flush=True))
        final.append(again)
    return final


def test_fault_explorer_10_schedules(tmp_path, artifacts, capsys):
    results = run(10, tmp_path, artifacts, capsys, ALWAYS_ON_STACK)
    results = replay_failures(results, tmp_path, artifacts, capsys)
    assert_clean(results, {ALWAYS_ON_STACK} if ALWAYS_ON_STACK != "both" else {"redis-postgresql", "amqp-mysql"})
    assert sum(len(r.injected) for r in results) >= 10


@pytest.mark.slow
def test_fault_explorer_200_schedules(tmp_path, artifacts, capsys):
    results = run(200, tmp_path, artifacts, capsys)
    write_docs(table(results, SEED))  # the real figures, whatever they are
    assert_clean(results, {"redis-postgresql", "amqp-mysql"})
