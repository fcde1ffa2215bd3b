"""Workers killed with SIGKILL at random moments while a parent spawns 1,000 children.

Setup: a Redis broker of our own with a 5 s visibility timeout (so that the
messages a dead worker held come back quickly), ``acks_late`` with
``reject_on_worker_lost``, a PostgreSQL store, and ``rel.unit`` children that
are SpawnTasks and append a line to a runs file each time their body starts.

After each kill a new worker starts (or the pool replaces its child) and
``celery_spawn.recover(app, grace_seconds=0)`` runs, then every child must
have run to success, the store must hold exactly 1,000 child rows, and no
child body may have started after the store recorded that child's success.
"""
from __future__ import annotations

import os
import random
import signal
import time

import pytest
import sqlalchemy as sa

from celery_spawn import recover
from celery_spawn.store import schema as s
from tests.harness import wait_for
from tests.reliability.app import REDELIVER_AFTER
from tests.reliability.helpers import (
    body_runs,
    children,
    drop_message,
    drop_unacked,
    log_counts,
    operation,
    operations_of,
    redis_crash_rig,
    rows,
    runs_after_success,
    state_counts,
    wait_completed,
)

CHILDREN = 1000
#: Seconds the handler spends generating the 1,000 children (a window to kill the worker mid-spawn).
GENERATION_PAUSE = 0.001
SEED = int(os.environ.get("SPAWN_TEST_SEED", "7"))
#: Short variant (always on): a kill in each phase.
SHORT_TRIALS = [("spawn", "worker"), ("children", "worker")]


@pytest.fixture(scope="module")
def crash_rig(tmp_path_factory, postgres_url):
    with redis_crash_rig(tmp_path_factory, postgres_url) as rig:
        yield rig


def succeeded_children(app, parent_id: str) -> int:
    return state_counts(app, parent_id).get(s.SUCCEEDED, 0)


def stuck_children(app, parent_id: str, workers) -> str:
    """What the unfinished children of a spawn look like, and what the worker logs say about them."""
    rows_ = [r for r in children(app, parent_id) if r["state"] != s.SUCCEEDED]
    lines = [f"states: {state_counts(app, parent_id)}"]
    for row in rows_[:5]:
        said = [ln for w in workers for ln in w.log().splitlines() if row["id"] in ln]
        lines.append(f"  {row['id']} {row['state']} started_at={row['started_at']}: {said[-6:]}")
    return "\n".join(lines)


def lost_in_broker(app, parent_id: str, workers) -> list[dict]:
    """Unfinished children no worker ever received (dispatched, in no log), when they are all that is left."""
    rows_ = [r for r in children(app, parent_id) if r["state"] != s.SUCCEEDED]
    text = "\n".join(w.log() for w in workers)
    if rows_ and all(r["state"] == s.DISPATCHED and f"[{r['id']}]" not in text for r in rows_):
        return rows_
    return []


def kill_at_random_moment(app, worker, parent_id: str, phase: str, kind: str, rng: random.Random) -> str:
    """Wait for a random moment of ``phase``, then SIGKILL the worker (or one pool process); says what."""
    if phase == "any":
        phase = rng.choice(["spawn", "children"])
    if phase == "spawn":
        wait_for(lambda: f"rel.fanout[{parent_id}] received" in worker.log(), 60, interval=0.01,
                 what="the parent to be received")
        delay = rng.uniform(0.0, CHILDREN * GENERATION_PAUSE * 1.5)
        time.sleep(delay)
        moment = f"{delay:.3f}s after the parent was received"
    else:
        target = rng.randint(1, CHILDREN - 1)
        wait_for(lambda: succeeded_children(app, parent_id) >= target, 120, interval=0.02,
                 what=f"{target} children to succeed")
        moment = f"after {succeeded_children(app, parent_id)} children succeeded (aimed at {target})"
    if kind == "worker":
        worker.kill()
    else:
        pool = worker.pool_children()
        assert pool, "the worker has no pool processes"
        os.kill(rng.choice(pool), signal.SIGKILL)
    return f"{kind} killed {moment}"


def run_trials(crash_rig, start_worker, trials: list[tuple[str, str]]) -> None:
    backend, app, runs = crash_rig
    rng = random.Random(SEED)
    worker = start_worker(backend, "w0")
    logs, parents, report = [worker], [], []
    for number, (phase, kind) in enumerate(trials):
        parent = app.signature("rel.fanout", kwargs={"count": CHILDREN, "pause": GENERATION_PAUSE}).delay()
        parents.append(parent.id)
        what = kill_at_random_moment(app, worker, parent.id, phase, kind, rng)
        report.append(f"trial {number}: parent {parent.id}: {what}")
        if kind == "worker":
            worker = start_worker(backend, f"w{number + 1}")
            logs.append(worker)
        recovered = recover(app, grace_seconds=0)
        report[-1] += f"; recover() published {recovered}"

        def finished():
            op = operation(app, parent.id)
            if op and op["completed"]:
                return op
            # As the workers' sweep would, without its grace period; children the broker lost are
            # published again after REDELIVER_AFTER seconds without progress.
            recover(app, grace_seconds=0)
            return None

        try:
            op = wait_for(finished, 180, interval=1, what=f"{report[-1]}: operation to complete")
        except AssertionError as exc:
            lost = lost_in_broker(app, parent.id, logs)
            raise AssertionError(f"{exc}\n{stuck_children(app, parent.id, logs)}"
                                 f"\nnever received by any worker: {len(lost)}") from None
        assert op["state"] == s.OP_SUCCEEDED, (report[-1], op)
        assert op["total"] == CHILDREN, report[-1]
        assert len(operations_of(app, parent.id)) == 1, report[-1]

    time.sleep(5)  # let any duplicate still in the broker (visibility timeout 5 s) be delivered and skipped
    text = [w.log() for w in logs]
    runs = body_runs(crash_rig[2])
    for parent_id, line in zip(parents, report):
        rows_ = children(app, parent_id)
        assert len(rows_) == CHILDREN, line
        assert {r["state"] for r in rows_} == {s.SUCCEEDED}, (line, state_counts(app, parent_id))
        assert [r["position"] for r in rows_] == list(range(CHILDREN)), line
        ids = [r["id"] for r in rows_]
        missing = [i for i in ids if i not in runs]
        assert not missing, f"{line}: {len(missing)} children never ran"
        late = runs_after_success(app, parent_id, crash_rig[2])
        assert not late, (f"{line}: children ran again after succeeding (id, run start, recorded success): "
                          f"{late[:5]}; all their runs: {[(i, runs.get(i)) for i, _, _ in late[:5]]}")
        # Celery's own record: a child's success is logged at most once across every worker.
        twice = {i: n for i, n in log_counts(text, "rel.unit", ids).items() if n > 1}
        assert not twice, f"{line}: succeeded twice: {list(twice.items())[:5]}"
    # Nothing outside the trees: no stray child rows, no second operation.
    total = rows(app, sa.select(sa.func.count().label("n")).select_from(s.jobs)
                 .where(s.jobs.c.parent_id.in_(parents)))[0]["n"]
    assert total == CHILDREN * len(parents)
    print("\n".join(report))


def test_sigkill_while_spawning_1000_children(crash_rig, start_worker):
    """Short variant: one kill while the parent records its children, one while children run."""
    run_trials(crash_rig, start_worker, SHORT_TRIALS)


@pytest.mark.slow
def test_sigkill_while_spawning_1000_children_20_trials(crash_rig, start_worker):
    rng = random.Random(SEED + 1)
    trials = [(rng.choice(["spawn", "children"]), "worker") for _ in range(20)]
    run_trials(crash_rig, start_worker, trials)


def test_pool_process_killed_after_the_result_was_stored(crash_rig, start_worker):
    """SIGKILL of one pool process between Celery storing a child's result and celery-spawn recording it.

    Celery 5.7 acks such a message ("succeeded before the worker was lost") and
    fires no signal: the recovery sweep learns the outcome from the result backend.
    """
    from tests.reliability.app import STALLED

    backend, app, runs = crash_rig
    worker = start_worker(backend, "stall")
    parent = app.signature("rel.fanout", kwargs={"count": 20, "stall_at": 5}).delay()
    line = wait_for(lambda: next((ln for ln in worker.log().splitlines() if STALLED in ln), None), 60,
                    what="the stalled child")
    task_id, pid = line.split(STALLED, 1)[1].split()
    os.kill(int(pid.removeprefix("pid=")), signal.SIGKILL)
    # The child did succeed (its result is stored): the operation must complete, the child must not run again.
    wait_for(lambda: "succeeded before the worker was lost" in worker.log(), 30, what="Celery to notice the loss")
    deadline = time.monotonic() + 30  # 15 recovery sweeps (every 2 s, grace 5 s)
    while time.monotonic() < deadline and not (operation(app, parent.id) or {}).get("completed"):
        recover(app, grace_seconds=0)
        time.sleep(1)
    assert app.AsyncResult(task_id).state == "SUCCESS"
    op = operation(app, parent.id)
    assert op["completed"] and op["state"] == s.OP_SUCCEEDED, state_counts(app, parent.id)
    assert len(body_runs(runs)[task_id]) == 1


def test_a_copy_delivered_while_the_first_still_runs_does_not_run(crash_rig, start_worker):
    """What a recovery sweep racing a slow publish produces: the same child message twice, at once."""
    import json

    backend, app, runs = crash_rig
    start_worker(backend, "dup")
    parent = app.signature("rel.fanout", kwargs={"count": 1, "child_pause": 3}).delay()
    assert parent.get(timeout=60) == 1
    [row] = wait_for(lambda: [r for r in children(app, parent.id) if r["state"] == s.STARTED], 30,
                     interval=0.05, what="the child to start")
    message = json.loads(row["message"])
    app.send_task(message["task"], args=message["args"], kwargs=message["kwargs"], task_id=row["id"],
                  headers=message["options"]["headers"])
    wait_completed(app, parent.id)
    time.sleep(4)  # the copy has run (or been skipped) by now
    assert len(body_runs(runs)[row["id"]]) == 1


@pytest.mark.parametrize("plain", [False, True], ids=["spawntask", "plain"])
def test_a_child_message_lost_by_the_broker_is_published_again(crash_rig, start_worker, plain):
    backend, app, runs = crash_rig
    parent = app.tasks["rel.fanout"].apply(kwargs={"count": 5, "plain": plain})  # five messages wait in Redis
    assert parent.get() == 5
    lost = children(app, parent.id)[2]
    assert lost["state"] == s.DISPATCHED
    assert drop_message(backend.broker, backend.queue, lost["id"])
    worker = start_worker(backend, "lost")
    # Sweeps every 2 s; the lost child is published again REDELIVER_AFTER s after its siblings last moved.
    deadline = time.monotonic() + REDELIVER_AFTER + 30
    while time.monotonic() < deadline and not (operation(app, parent.id) or {}).get("completed"):
        time.sleep(1)
    assert (operation(app, parent.id) or {}).get("completed"), stuck_children(app, parent.id, [worker])
    assert len(body_runs(runs)[lost["id"]]) == 1
    assert "published again 1 children" in worker.log()


@pytest.mark.parametrize("plain", [False, True], ids=["spawntask", "plain"])
def test_a_started_child_lost_with_its_worker_and_its_message_runs_again(crash_rig, start_worker, plain):
    """The whole worker is SIGKILLed while a child runs, and the broker loses that child's message (taken out
    of kombu's unacknowledged hash here): the store says ``started`` by a process that is gone. The worker
    restarted under the same name lists other processes, so its recovery sweep sends the child again and
    the copy takes the run over; nothing runs twice after a success."""
    backend, app, runs = crash_rig
    worker = start_worker(backend, "orphan")
    parent = app.signature("rel.fanout", kwargs={"count": 2, "child_pause": 6, "plain": plain}).delay()
    assert parent.get(timeout=60) == 2
    started = wait_for(lambda: [r for r in children(app, parent.id) if r["state"] == s.STARTED], 30,
                       interval=0.05, what="a child to start")
    worker.kill()
    orphan = started[0]
    assert drop_unacked(backend.broker, orphan["id"]), "the child's message was not in the unacknowledged hash"
    again = start_worker(backend, "orphan-again", hostname=worker.hostname)
    deadline = time.monotonic() + REDELIVER_AFTER + 40
    while time.monotonic() < deadline and not (operation(app, parent.id) or {}).get("completed"):
        time.sleep(1)
    assert (operation(app, parent.id) or {}).get("completed"), stuck_children(app, parent.id, [worker, again])
    assert {r["state"] for r in children(app, parent.id)} == {s.SUCCEEDED}
    assert len(body_runs(runs)[orphan["id"]]) == 2  # the run killed with its worker, and the copy's
    assert f"published again child {orphan['id']}" in again.log()
    assert not runs_after_success(app, parent.id, runs)


@pytest.mark.parametrize("plain", [False, True], ids=["spawntask", "plain"])
def test_a_copy_of_a_running_child_never_runs_beside_it(crash_rig, start_worker, plain):
    """Children run longer than the broker's visibility timeout (5 s): Redis hands each message out again
    while the first delivery runs. The copy finds the claim of a live process and is sent again for a later
    look, until the first has finished."""
    backend, app, runs = crash_rig
    worker = start_worker(backend, "copies", concurrency=4)
    parent = app.signature("rel.fanout", kwargs={"count": 3, "child_pause": 9, "plain": plain}).delay()
    assert parent.get(timeout=60) == 3
    deadline = time.monotonic() + 90
    while time.monotonic() < deadline and not (operation(app, parent.id) or {}).get("completed"):
        time.sleep(1)
    assert (operation(app, parent.id) or {}).get("completed"), stuck_children(app, parent.id, [worker])
    time.sleep(7)  # any copy still in the broker is delivered and dropped meanwhile
    ran = body_runs(runs)
    ids = [child["id"] for child in children(app, parent.id)]
    assert {job: len(ran[job]) for job in ids} == {job: 1 for job in ids}
    assert all(child["state"] == s.SUCCEEDED for child in children(app, parent.id))
    assert "which still runs" in worker.log()  # the copies came, and were sent for a later look
