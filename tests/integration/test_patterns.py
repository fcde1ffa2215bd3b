"""The seed's four patterns, run by a real worker on each broker/store combination."""
from __future__ import annotations

from celery_spawn.handlers import child_id, default_operation_id
from celery_spawn.store import schema as s
from tests.harness import wait_for
from tests.integration.helpers import TIMEOUT, children_of, results_of, store_rows, wait_children


def test_fan_out_in_chunks(worker, client_app):
    parent = client_app.signature("tests.process_dataset",
                                  kwargs={"dataset_id": "ds-123", "size": 10_500, "chunk_size": 1000}).delay()
    assert parent.get(timeout=TIMEOUT) == {"dataset_id": "ds-123", "size": 10_500}
    rows = wait_children(client_app, parent.id, 11)
    results = results_of(client_app, rows)
    assert [r["chunk_id"] for r in results] == list(range(11))
    assert sum(r["rows"] for r in results) == 10_500
    assert {r["dataset_id"] for r in results} == {"ds-123"}
    operation_id = default_operation_id(parent.id)
    assert [row["id"] for row in rows] == [child_id(operation_id, i) for i in range(11)]
    for row in rows:
        assert row["root_id"] == parent.id
        assert row["depth"] == 1
        assert row["operation_id"] == operation_id
        assert row["task_name"] == "tests.process_chunk"
        assert row["queue"] == worker.backend.queue
    [operation] = store_rows(client_app, s.operations, id=operation_id)
    assert operation["parent_id"] == parent.id
    assert operation["total"] == 11
    assert operation["handler"] == "dataset_processor"
    [root] = store_rows(client_app, s.jobs, id=parent.id)
    assert root["depth"] == 0 and root["parent_id"] is None


def test_image_size_variants(worker, client_app):
    parent = client_app.signature("tests.process_images", kwargs={
        "image_ids": ["img-1", "img-2"], "source_bucket": "raw", "output_bucket": "out"}).delay()
    assert parent.get(timeout=TIMEOUT) == 2
    rows = wait_children(client_app, parent.id, 6)
    assert results_of(client_app, rows) == [f"out/{i}-{size}" for i in ("img-1", "img-2")
                                            for size in ("thumbnail", "medium", "large")]


def test_safe_spawner_skips_bad_items(worker, client_app):
    parent = client_app.signature("tests.safe_parent", kwargs={"items": [1, "x", 3, None, 5]}).delay()
    assert parent.get(timeout=TIMEOUT) == "parent-result"
    rows = wait_children(client_app, parent.id, 3)
    assert results_of(client_app, rows) == [1, 9, 25]


def test_safe_spawner_gives_up_and_parent_result_stands(worker, client_app):
    parent = client_app.signature("tests.safe_parent", kwargs={"items": ["a", "b", "c", "d", 1]}).delay()
    assert parent.get(timeout=TIMEOUT) == "parent-result"
    operation = wait_for(lambda: store_rows(client_app, s.operations, parent_id=parent.id), TIMEOUT,
                         what="failed operation")[0]
    assert operation["state"] == "failed"
    assert "too many spawn failures" in operation["error"]
    assert children_of(client_app, parent.id) == []


def test_workflow_steps_run_in_order(worker, client_app):
    parent = client_app.signature("tests.run_workflow", kwargs={"workflow_type": "etl_pipeline"}).delay()
    assert parent.get(timeout=TIMEOUT) == "etl_pipeline"
    rows = wait_children(client_app, parent.id, 3)
    results = results_of(client_app, rows)
    assert [r["step"] for r in results] == ["extract", "transform", "load"]
    assert results[0]["at"] <= results[1]["at"] <= results[2]["at"]
    edges = {(e["job_id"], e["depends_on_id"]) for e in store_rows(client_app, s.dependencies)}
    assert (rows[0]["id"], parent.id) in edges
    assert (rows[1]["id"], rows[0]["id"]) in edges
    assert (rows[2]["id"], rows[1]["id"]) in edges
