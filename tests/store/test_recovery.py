"""SpawnStore recovery: stale operations, callbacks and jobs, and dispatched children the broker lost."""
from __future__ import annotations

from datetime import timedelta

from celery_spawn.store import schema as s
from celery_spawn.store import utcnow
from tests.harness import counting
from tests.store.helpers import ago, edge, job, job_row, op_row, operation, seed, set_job, set_operation

HOUR = 3600


def test_claim_stale_operations_takes_running_operations_with_children_to_publish(store):
    old = ago(HOUR)
    seed(store,
         [op_row("pending", total=1, created=old, published_through=0),
          op_row("held", total=1, created=old, published_through=None),
          op_row("unwatermarked", total=3, created=old, published_through=0),
          op_row("published", total=1, created=old, published_through=0),
          op_row("fresh", total=1, published_through=0),
          op_row("done", state=s.OP_SUCCEEDED, total=1, created=old, published_through=0),
          op_row("refused", state=s.OP_FAILED, total=0, created=old)],
         [job_row("p", "pending"), job_row("h", "held", state=s.HELD, pending_deps=1),
          *(job_row(f"u{i}", "unwatermarked", position=i, state=s.DISPATCHED) for i in range(3)),
          job_row("d", "published", state=s.DISPATCHED), job_row("f", "fresh"), job_row("x", "done")],
         [edge("h", "elsewhere")])
    set_operation(store, "pending", updated_at=old - timedelta(seconds=3))  # oldest lease first
    set_operation(store, "unwatermarked", updated_at=old - timedelta(seconds=2))
    set_operation(store, "held", updated_at=old - timedelta(seconds=1))
    assert store.claim_stale_operations(grace_seconds=60, limit=2) == ["pending", "unwatermarked"]
    assert store.claim_stale_operations(grace_seconds=60) == ["held"]
    assert store.claim_stale_operations(grace_seconds=60) == []  # all leased
    assert operation(store, "pending")["updated_at"] > ago(60)
    assert operation(store, "published")["updated_at"] < ago(HOUR - 60)  # not taken, not touched
    assert sorted(store.claim_stale_operations(grace_seconds=0)) == ["fresh", "held", "pending", "unwatermarked"]


def test_claim_stale_operations_leases_for_the_grace_period(store):
    seed(store, [op_row("op", total=1, created=ago(HOUR), published_through=0)], [job_row("p", "op")])
    assert store.claim_stale_operations(grace_seconds=HOUR + 60) == []  # not stale yet
    assert store.claim_stale_operations(grace_seconds=60) == ["op"]
    assert store.claim_stale_operations(grace_seconds=60) == []  # leased by the first call
    set_operation(store, "op", updated_at=ago(120))
    assert store.claim_stale_operations(grace_seconds=60) == ["op"]  # the lease ran out
    store.mark_dispatched(["p"])
    set_operation(store, "op", updated_at=ago(120))
    assert store.claim_stale_operations(grace_seconds=60) == []  # nothing left to publish


def test_claim_stale_callbacks(store):
    old = ago(HOUR)
    seed(store, [op_row("cb", state=s.OP_SUCCEEDED, created=old, callback_state=s.CALLBACK_PENDING,
                        on_complete='{"task": "cb"}'),
                 op_row("cb2", state=s.OP_FAILED, created=old + timedelta(seconds=1),
                        callback_state=s.CALLBACK_PENDING),
                 op_row("sent", state=s.OP_SUCCEEDED, created=old, callback_state=s.CALLBACK_SENT),
                 op_row("none", state=s.OP_SUCCEEDED, created=old),
                 op_row("fresh", state=s.OP_SUCCEEDED, callback_state=s.CALLBACK_PENDING)])
    assert store.claim_stale_callbacks(grace_seconds=HOUR + 60) == []
    first = store.claim_stale_callbacks(grace_seconds=60, limit=1)
    assert [r["id"] for r in first] == ["cb"]
    assert first[0]["on_complete"] == '{"task": "cb"}' and first[0]["state"] == s.OP_SUCCEEDED
    assert set(first[0]) == {c.name for c in s.operations.columns}
    assert [r["id"] for r in store.claim_stale_callbacks(grace_seconds=60)] == ["cb2"]
    assert store.claim_stale_callbacks(grace_seconds=60) == []  # leased
    assert operation(store, "cb")["updated_at"] > ago(60)
    assert operation(store, "cb")["callback_state"] == s.CALLBACK_PENDING


def test_stale_unfinished_jobs(store):
    old = ago(HOUR)
    seed(store, [op_row("op", total=8)],
         [job_row("d", "op", state=s.DISPATCHED, created=old),
          job_row("st", "op", position=1, state=s.STARTED, created=old - timedelta(seconds=5)),
          job_row("r", "op", position=2, state=s.RETRYING, created=old + timedelta(seconds=5)),
          job_row("p", "op", position=3, state=s.PENDING, created=old),
          job_row("h", "op", position=4, state=s.HELD, created=old),
          job_row("ok", "op", position=5, state=s.SUCCEEDED, created=old),
          job_row("new", "op", position=6, state=s.STARTED),
          job_row("root", None, parent=None, state=s.STARTED, created=old)])
    found = store.stale_unfinished_jobs(grace_seconds=60)
    assert found == [{"id": "st", "operation_id": "op", "state": s.STARTED},
                     {"id": "d", "operation_id": "op", "state": s.DISPATCHED},
                     {"id": "r", "operation_id": "op", "state": s.RETRYING}]
    assert [j["id"] for j in store.stale_unfinished_jobs(grace_seconds=60, limit=1)] == ["st"]
    assert store.stale_unfinished_jobs(grace_seconds=HOUR + 60) == []


def lost(job_id, operation_id, position=0, *, dispatched_ago=HOUR, **over):
    """A child dispatched ``dispatched_ago`` seconds ago and never started."""
    return job_row(job_id, operation_id, position=position, state=s.DISPATCHED, created=ago(dispatched_ago + 5),
                   dispatched_at=ago(dispatched_ago), **over)


def test_stalled_operations(store):
    old = ago(HOUR + 10)
    seed(store, [op_row(o, total=2, created=old) for o in ("stalled", "progressing", "fresh", "started", "quiet")],
         [lost("s0", "stalled"),
          job_row("s1", "stalled", position=1, state=s.SUCCEEDED, created=old, started_at=old, finished_at=old),
          lost("p0", "progressing"),
          job_row("p1", "progressing", position=1, state=s.SUCCEEDED, created=old, started_at=old,
                  finished_at=ago(5)),
          lost("f0", "fresh", dispatched_ago=5),
          lost("t0", "started", started_at=ago(HOUR)),
          lost("q0", "quiet"), lost("q1", "quiet", 1, dispatched_ago=40)])
    cutoff = ago(60)
    assert sorted(store.stalled_operations(cutoff, limit=10)) == ["stalled"]
    # q1 was dispatched after that cutoff (activity); before a later one, quiet is stalled too
    assert sorted(store.stalled_operations(ago(20), limit=10)) == ["quiet", "stalled"]
    assert store.stalled_operations(ago(2 * HOUR), limit=10) == []
    assert len(store.stalled_operations(utcnow(), limit=1)) == 1


def test_lease_lost_children(store):
    seed(store, [op_row("op", total=5, created=ago(2 * HOUR)), op_row("other", total=1)],
         [lost("b", "op", 1), lost("a", "op", 0), lost("c", "op", 2),
          lost("started", "op", 3, started_at=ago(HOUR)), lost("fresh", "op", 4, dispatched_ago=5),
          lost("x", "other")])
    cutoff = ago(60)
    first = store.lease_lost_children("op", cutoff, limit=2, idle_queues=["q"])
    assert [r["id"] for r in first] == ["a", "b"]
    assert first[0] == {"id": "a", "parent_id": "root", "root_id": "root", "message": '{"id": "a"}',
                        "operation_id": "op", "task_name": "tests.child", "redeliveries": 1}
    assert job(store, "a")["redeliveries"] == 1 and job(store, "c")["redeliveries"] == 0
    assert job(store, "a")["dispatched_at"] > cutoff and job(store, "c")["dispatched_at"] < cutoff
    assert [r["id"] for r in store.lease_lost_children("op", cutoff, idle_queues=["q"])] == ["c"]
    assert store.lease_lost_children("op", cutoff, idle_queues=["q"]) == []  # leased: a whole cutoff away
    assert job(store, "a")["state"] == s.DISPATCHED and job(store, "x")["dispatched_at"] < cutoff
    set_job(store, "a", dispatched_at=ago(HOUR))
    assert [r["id"] for r in store.lease_lost_children("op", cutoff, idle_queues=["q"])] == ["a"]


def test_a_child_waiting_in_a_busy_queue_is_not_leased_until_the_queue_moves_past_it(store):
    seed(store, [op_row("op", total=2, created=ago(2 * HOUR)), op_row("later", total=1)],
         [lost("a", "op", 0), lost("b", "op", 1), lost("n", "op", 2, queue=None)])
    cutoff = ago(60)
    assert store.waiting_queues("op", cutoff) == {"q", None}
    assert store.lease_lost_children("op", cutoff) == []  # the queue holds messages: a's may be among them
    assert store.lease_lost_children("op", cutoff, idle_queues=["other"]) == []
    # a sibling published after it has started: the queue moved past it
    set_job(store, "b", state=s.STARTED, started_at=ago(HOUR - 1))
    assert [r["id"] for r in store.lease_lost_children("op", cutoff)] == ["a"]
    # a job of another spawn, recorded and sent after the default-queue child, started there
    seed(store, [], [job_row("z", "later", state=s.SUCCEEDED, queue=None, created=ago(HOUR - 10),
                             dispatched_at=ago(HOUR - 10), started_at=ago(HOUR - 20))])
    assert [r["id"] for r in store.lease_lost_children("op", cutoff)] == ["n"]


def running(job_id, operation_id, position=0, *, started_ago=HOUR, worker="w@h/1", **over):
    """A child started ``started_ago`` seconds ago by ``worker`` and not finished."""
    row = {"state": s.STARTED, "dispatched_at": ago(started_ago + 5), "started_at": ago(started_ago),
           "worker": worker, **over}
    return job_row(job_id, operation_id, position=position, created=ago(started_ago + 10), **row)


def test_quiet_starts_are_the_claims_of_old_starts_in_operations_that_stopped_moving(store):
    old = ago(2 * HOUR)
    seed(store, [op_row(o, total=2, created=old) for o in ("quiet", "moving", "fresh", "sent")],
         [running("q0", "quiet", worker="a@h/1"), running("q1", "quiet", 1, worker="a@h/1"),
          running("q2", "quiet", 2, worker="b@h/2"), running("q3", "quiet", 3, worker=None),
          running("q4", "quiet", 4, state=s.SUCCEEDED, finished_at=old, worker="c@h/3"),
          running("m0", "moving"),
          running("m1", "moving", 1, state=s.SUCCEEDED, finished_at=ago(5)),
          running("f0", "fresh", started_ago=5),
          running("s0", "sent", dispatched_at=ago(5)),  # sent again by a sweep lately
          running("d0", "quiet", 5, state=s.DISPATCHED, started_at=None, worker=None)])
    cutoff = ago(60)
    assert store.quiet_starts(cutoff, limit=10) == {"quiet": {"a@h/1", "b@h/2", None}}
    assert store.quiet_starts(ago(3 * HOUR), limit=10) == {}
    assert len(store.quiet_starts(utcnow(), limit=1)) == 1


def test_lease_orphaned_starts_takes_the_children_of_the_claims_given_once_per_cutoff(store):
    seed(store, [op_row("op", total=4, created=ago(2 * HOUR)), op_row("other", total=1, created=ago(2 * HOUR))],
         [running("a", "op", 0, worker="a@h/1"), running("b", "op", 1, worker="b@h/2"),
          running("c", "op", 2, worker="a@h/1"), running("d", "op", 3, worker="a@h/1", started_ago=5),
          running("x", "other", worker="a@h/1")])
    cutoff = ago(60)
    leased = store.lease_orphaned_starts("op", ["a@h/1"], cutoff, limit=1)
    assert leased == [{"id": "a", "parent_id": "root", "root_id": "root", "message": '{"id": "a"}',
                       "operation_id": "op", "task_name": "tests.child", "redeliveries": 1, "worker": "a@h/1"}]
    assert job(store, "a")["state"] == s.STARTED and job(store, "a")["dispatched_at"] > cutoff
    assert [r["id"] for r in store.lease_orphaned_starts("op", ["a@h/1"], cutoff)] == ["c"]  # not d: too young
    assert store.lease_orphaned_starts("op", ["a@h/1"], cutoff) == []  # leased: a whole cutoff away
    assert job(store, "b")["redeliveries"] == 0 and job(store, "x")["dispatched_at"] < cutoff
    assert store.lease_orphaned_starts("op", [], cutoff) == []
    set_job(store, "b", state=s.SUCCEEDED, finished_at=utcnow())
    assert store.lease_orphaned_starts("op", ["b@h/2"], cutoff) == []  # ended meanwhile


def test_the_sweep_judges_its_candidate_operations_in_one_statement(store):
    """Not a query per operation: however many candidates, one statement keeps those that stopped moving."""
    old = ago(2 * HOUR)
    names = [f"op{i}" for i in range(6)]
    seed(store, [op_row(o, total=2, created=old) for o in names],
         [lost(f"{o}-lost", o) for o in names[:3]] + [running(f"{o}-run", o) for o in names[3:]])
    with counting(store) as seen:
        assert sorted(store.stalled_operations(ago(60), limit=10)) == names[:3]
    assert len(seen) == 1
    with counting(store) as seen:
        assert sorted(store.quiet_starts(ago(60), limit=10)) == names[3:]
    assert len(seen) == 2  # the quiet operations, then their claims
