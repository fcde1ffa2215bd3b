"""The fault explorer's own parts, without services: schedules replay from their seed, the checker convicts.

The explorer's verdict is only worth something if a bad tree fails it: each
violation it looks for is fed to :func:`tests.chaos.checker.judge` here.
"""
from __future__ import annotations

import pytest

from tests.chaos import history
from tests.chaos.checker import judge
from tests.chaos.report import BEGIN, END, table, write_docs
from tests.chaos.runner import plan_schedules
from tests.chaos.schedule import CLOCK_SKEW, FAULT_KINDS, LASTING, MAX_CHILDREN, STACKS, Schedule, generate


def test_a_seed_gives_the_same_schedule_every_time():
    assert generate(42, STACKS[0]) == generate(42, STACKS[0])
    assert generate(42, STACKS[0]) != generate(43, STACKS[0])


def test_schedules_stay_within_their_bounds():
    kinds = set()
    for seed in range(300):
        schedule = generate(seed, STACKS[seed % 2])
        assert 8 <= schedule.children <= MAX_CHILDREN
        drawn = [f for f in schedule.faults if f.kind != CLOCK_SKEW]
        assert 1 <= len(drawn) <= 4 and len(schedule.faults) - len(drawn) <= 1
        assert [f.at for f in schedule.faults] == sorted(f.at for f in schedule.faults)
        assert all((f.duration > 0) == (f.kind in LASTING) for f in schedule.faults)
        kinds.update(f.kind for f in schedule.faults)
    assert kinds == set(FAULT_KINDS)


SEED_1605_FAULTS = [("store-cut", 1.27), ("store-hang", 2.76), ("store-hang", 3.26), ("store-cut", 5.46)]
SEED_1605_CHILDREN = 31


def test_the_skewed_clock_left_earlier_seeds_as_they_were():
    """Seed 1605's tree and faults, as the explorer drew them before the skewed-clock worker existed."""
    schedule = generate(1605, STACKS[1])
    assert [(f.kind, f.at) for f in schedule.faults if f.kind != CLOCK_SKEW] == SEED_1605_FAULTS
    assert schedule.children == SEED_1605_CHILDREN


def test_both_stacks_take_turns_and_seeds_follow_each_other():
    schedules = plan_schedules(4, 100, "both")
    assert [(s.seed, s.stack) for s in schedules] == [(100, STACKS[0]), (101, STACKS[1]), (102, STACKS[0]),
                                                      (103, STACKS[1])]
    assert {s.stack for s in plan_schedules(3, 1, STACKS[1])} == {STACKS[1]}


# ---- the checker ------------------------------------------------------------------------------------
PLAN = {"delay_ms": 0, "children": [{"pause": 0, "after": [], "plan": None},
                                    {"pause": 0, "after": [0], "plan": None}]}
SCHEDULE = Schedule(7, STACKS[0], PLAN, ())


def tree(states=("succeeded", "succeeded")):
    children = [{"id": f"c{i}", "state": state, "error": None} for i, state in enumerate(states)]
    ops = [{"id": "op", "parent_id": "root", "state": "succeeded", "completed": True, "callback_state": "sent",
            "updated_at": None}]
    return children, ops


def row(job_id, event, at):
    return {"job_id": job_id, "event": event, "at": at}


def clean_history():
    return [row("c0", history.START, 1), row("c0", history.SUCCEEDED, 2), row("c1", history.START, 3),
            row("c1", history.SUCCEEDED, 4), row("op", history.CALLBACK, 5)]


def verdict(children, ops, rows, backend=lambda job_id: False):
    return judge(SCHEDULE, children, ops, rows, backend)


def test_a_clean_tree_passes():
    result = verdict(*tree(), clean_history())
    assert result.ok, result.problems
    assert (result.children, result.operations, result.callbacks_once) == (2, 1, 1)


def test_a_child_killed_before_it_succeeded_may_run_again():
    rows = [row("c0", history.START, 0.5)] + clean_history()
    result = verdict(*tree(), rows)
    assert result.ok and result.reruns == 1


def test_a_start_after_the_success_is_caught():
    result = verdict(*tree(), clean_history() + [row("c0", history.START, 6)])
    assert not result.ok and result.doubled == ["c0"]


def test_a_second_success_is_caught():
    result = verdict(*tree(), clean_history() + [row("c1", history.SUCCEEDED, 6)])
    assert result.doubled == ["c1"]


@pytest.mark.parametrize("state", ["lost", "failed", "dispatched"])
def test_a_child_that_did_not_succeed_is_lost(state):
    rows = [r for r in clean_history() if r["job_id"] != "c1"]
    result = verdict(*tree(("succeeded", state)), rows)
    assert result.lost == ["c1"] and not result.ok


def test_a_child_the_store_never_recorded_is_lost():
    children, ops = tree()
    result = verdict(children[:1], ops, clean_history())
    assert len(result.lost) == 1 and not result.ok


@pytest.mark.parametrize("callbacks", [0, 2])
def test_a_callback_not_run_exactly_once_is_caught(callbacks):
    rows = [r for r in clean_history() if r["event"] != history.CALLBACK]
    rows += [row("op", history.CALLBACK, 5 + n) for n in range(callbacks)]
    result = verdict(*tree(), rows)
    assert result.callbacks_once == 0 and not result.ok


def test_a_callback_whose_success_only_the_result_backend_holds_ran_once():
    """Its pool process was killed between Celery storing its result and ``task_success`` (no history row)."""
    from celery_spawn.engine.completion import completion_task_id

    rows = [r for r in clean_history() if r["event"] != history.CALLBACK]
    result = verdict(*tree(), rows, backend=lambda task_id: task_id == completion_task_id("op"))
    assert result.ok and result.callbacks_once == 1 and result.callbacks_backend_only == 1
    # A second run alongside it is still caught.
    rows.append(row("op", history.CALLBACK, 6))
    both = verdict(*tree(), rows + [row("op", history.CALLBACK, 7)],
                   backend=lambda task_id: task_id == completion_task_id("op"))
    assert not both.ok


def test_the_store_and_the_history_must_agree():
    # The store says succeeded, but no run of the child ever succeeded, even in the result backend.
    rows = [r for r in clean_history() if not (r["job_id"] == "c1" and r["event"] == history.SUCCEEDED)]
    assert not verdict(*tree(), rows).ok
    # ... unless the result backend holds it: a process killed between storing it and task_success.
    result = verdict(*tree(), rows, backend=lambda job_id: job_id == "c1")
    assert result.ok and result.backend_only == 1
    # The history saw a success the store does not have.
    assert not verdict(*tree(("succeeded", "started")), clean_history()).ok


def test_a_second_operation_for_a_parent_is_caught():
    children, ops = tree()
    ops.append({**ops[0], "id": "op2"})
    assert not verdict(children, ops, clean_history() + [row("op2", history.CALLBACK, 6)]).ok


def test_the_table_goes_between_the_markers(tmp_path):
    result = verdict(*tree(), clean_history())
    result.injected = ["kill-worker", "store-cut"]
    text = table([result], seed=7)
    assert "| Redis + PostgreSQL | 1 | 2 | 2 | 0 | 0 | 1 of 1 |" in text
    doc = tmp_path / "doc.md"
    doc.write_text(f"before\n{BEGIN}\nold\n{END}\nafter\n")
    write_docs(text, doc)
    written = doc.read_text()
    assert written.startswith("before\n") and written.endswith("after\n") and "old" not in written
    assert text in written
    assert "stopped after these, of 3 planned" in table([result], seed=7, planned=3)
    assert "stopped" not in table([result], seed=7, planned=1)
