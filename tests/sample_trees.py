"""Trees a real worker makes, shared by the CLI and web tests: what they send and how they wait for it."""
from __future__ import annotations

import types

import sqlalchemy as sa
from celery import Celery

from celery_spawn import get_state
from celery_spawn.handlers import child_id, default_operation_id
from celery_spawn.store import queries
from celery_spawn.store import schema as s
from tests.harness import wait_for


def make_sample_trees(client_app: Celery, dataset_id: str, timeout: float,
                      workflow: bool = False) -> types.SimpleNamespace:
    """A fan-out of 11 chunks, a nested tree of 15 jobs (3 levels of spawns), a refused spawn and,
    with ``workflow``, the 3 dependent steps of an ETL workflow; returns once all of them ran."""
    dataset = client_app.signature("tests.process_dataset", kwargs={
        "dataset_id": dataset_id, "size": 5_500, "chunk_size": 500}).delay()
    nested = client_app.signature("tests.nest", kwargs={"levels": 3, "fanout": 2}).delay()
    refused = client_app.signature("tests.safe_parent", kwargs={"items": ["a", "b", "c", "d"]}).delay()
    etl = client_app.signature("tests.run_workflow", kwargs={"workflow_type": "etl_pipeline"}).delay() \
        if workflow else None
    store = get_state(client_app).store

    def finished(job_id: str, size: int) -> bool:
        with store.read() as conn:
            rows = queries.descendants(conn, job_id)
        return len(rows) == size and all(r["state"] == "succeeded" for r in rows)

    wait_for(lambda: finished(dataset.id, 11), timeout, what="11 chunks succeeded")
    wait_for(lambda: finished(nested.id, 14), timeout, what="a nested tree of 15 jobs")
    if etl is not None:
        wait_for(lambda: finished(etl.id, 3), timeout, what="a workflow of 3 steps")
    roots = [dataset.id, nested.id] + ([etl.id] if etl is not None else [])

    def all_complete() -> bool:  # the last finish's operation completes a moment after the job row
        with store.read() as conn:
            return not conn.execute(sa.select(sa.func.count()).select_from(s.operations).where(
                s.operations.c.root_id.in_(roots), s.operations.c.completed.is_(False))).scalar()

    wait_for(all_complete, timeout, what="their operations to complete")
    refused.get(timeout=timeout)
    with store.read() as conn:
        wait_for(lambda: queries.list_operations(conn, state="failed"), timeout, what="the refused operation")
        chain = queries.descendants(conn, nested.id)
    deepest = next(row for row in chain if row["distance"] == 3)
    dataset_op = default_operation_id(dataset.id)
    return types.SimpleNamespace(
        dataset=dataset.id, dataset_op=dataset_op, dataset_children=[child_id(dataset_op, i) for i in range(11)],
        nested=nested.id, nested_op=default_operation_id(nested.id), deepest=deepest["id"],
        middle=deepest["parent_id"], refused=refused.id, refused_op=default_operation_id(refused.id),
        workflow=etl.id if etl is not None else None,
    )
