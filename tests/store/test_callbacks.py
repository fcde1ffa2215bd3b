"""SpawnStore callback runs, on every backend: one claim per callback, its end, its retry, the lost ones."""
from __future__ import annotations

from celery_spawn.store import schema as s
from tests.store.helpers import ago, op_row, operation, seed

W1, W2 = "w1@host/11", "w2@host/22"


def completed(store, op_id="op", **over):
    over = {"callback_state": s.CALLBACK_PENDING, **over}
    seed(store, [op_row(op_id, state=s.OP_SUCCEEDED, created=ago(3600), on_complete='{"task": "t.cb"}', **over)])


def run_of(store, op_id="op"):
    got = operation(store, op_id)
    return got["callback_state"], got["callback_run"], got["callback_worker"], got["callback_sends"]


def test_a_published_callback_waits_for_a_worker_and_counts_its_sends(store):
    completed(store)
    assert run_of(store) == (s.CALLBACK_PENDING, None, None, 0)
    store.callback_published("op")
    assert run_of(store) == (s.CALLBACK_SENT, s.CALLBACK_WAITING, None, 1)
    store.callback_published("op")  # sent again by the sweep
    assert run_of(store) == (s.CALLBACK_SENT, s.CALLBACK_WAITING, None, 2)


def test_one_delivery_claims_the_callback_and_the_others_find_it_claimed(store):
    completed(store)
    store.callback_published("op")
    assert store.claim_callback("op", W1) is True
    assert store.claim_callback("op", W2) is False
    assert store.callback_claim_of("op") == (s.CALLBACK_STARTED, W1)
    assert store.claim_callback("nope", W1) is None and store.callback_claim_of("nope") == (None, None)


def test_a_claim_taken_before_the_publish_was_recorded_stands(store):
    """A worker quicker than the publisher's write (or an eager call) claims a callback still pending."""
    completed(store)
    assert store.claim_callback("op", W1) is True
    store.callback_published("op")
    assert run_of(store) == (s.CALLBACK_SENT, s.CALLBACK_STARTED, W1, 1)
    store.end_callback("op")
    store.callback_published("op")
    assert run_of(store)[1] == s.CALLBACK_ENDED


def test_only_the_named_claimant_is_taken_over(store):
    completed(store)
    store.claim_callback("op", W1)
    assert store.take_over_callback("op", W2, claimed_by="w9@host/99") is False
    assert store.take_over_callback("op", W2, claimed_by=None) is False
    assert store.take_over_callback("op", W2, claimed_by=W1) is True
    assert store.callback_claim_of("op") == (s.CALLBACK_STARTED, W2)
    store.end_callback("op")
    assert store.take_over_callback("op", W1, claimed_by=W2) is False  # ended: nobody runs it again
    assert store.claim_callback("op", W1) is False


def test_a_retry_frees_only_its_own_claim(store):
    completed(store)
    store.callback_published("op")
    store.claim_callback("op", W1)
    store.free_callback("op", W2)
    assert store.callback_claim_of("op") == (s.CALLBACK_STARTED, W1)
    store.free_callback("op", W1)
    assert store.callback_claim_of("op")[0] == s.CALLBACK_WAITING
    assert store.claim_callback("op", W2) is True


def test_the_sweep_leases_callbacks_sent_long_ago_and_never_started(store):
    completed(store, "waiting")
    completed(store, "started")
    completed(store, "recent")
    completed(store, "ended")
    completed(store, "legacy", callback_state=s.CALLBACK_SENT)  # sent by a version before claims: no run
    for op_id in ("waiting", "started", "ended"):
        store.callback_published(op_id)
    store.claim_callback("started", W1)
    store.claim_callback("ended", W1)
    store.end_callback("ended")
    seed_age = ago(600)
    with store.begin() as conn:
        conn.execute(s.operations.update().where(s.operations.c.id != "recent").values(updated_at=seed_age))
    store.callback_published("recent")

    leased = store.lease_waiting_callbacks(ago(60))
    assert [row["id"] for row in leased] == ["waiting"]
    assert leased[0]["callback_sends"] == 1 and leased[0]["on_complete"] == '{"task": "t.cb"}'
    assert store.lease_waiting_callbacks(ago(60)) == []  # leased: its updated_at is fresh again


def test_a_lost_callback_is_given_up_but_a_late_delivery_may_still_run_it(store):
    completed(store)
    store.callback_published("op")
    store.lose_callback("op")
    assert run_of(store)[1] == s.CALLBACK_LOST
    assert store.lease_waiting_callbacks(ago(-60)) == []
    assert store.claim_callback("op", W1) is True
