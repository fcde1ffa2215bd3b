"""The seed's fan-out example as a Celery app: a dataset split into chunks processed in parallel.

Runs on the embedded defaults: a folder as the broker (``spawnfs://``, kombu's filesystem
transport with atomic writes) and SQLite as the lineage store, both under ``.demo/`` - no
server needed.
"""
from __future__ import annotations

import os
from pathlib import Path

from celery import Celery

from celery_spawn import SpawnConfig, SpawnHandler, SpawnManager, SpawnTask, install
from celery_spawn.transport.spawnfs import folder_options

DEMO = Path(os.environ.get("SPAWN_DEMO_DIR", Path(__file__).resolve().parents[2] / ".demo"))
(DEMO / "results").mkdir(parents=True, exist_ok=True)

app = Celery("fanout", broker="spawnfs://", backend=f"file://{DEMO / 'results'}")
app.conf.broker_transport_options = folder_options(DEMO / "broker")

manager = SpawnManager()
install(app, manager, database_url=f"sqlite:///{DEMO / 'spawn.sqlite3'}")


@manager.handler("data_processor")
class DatasetProcessor(SpawnHandler):
    """Split the parent's dataset into chunks of 1,000 records, one child task each."""

    def validate_spawn(self, parent, config):
        if "dataset_id" not in parent.kwargs:
            raise ValueError("parent job missing required dataset_id")

    def spawn_jobs(self, context):
        size = context.parent.kwargs["records_count"]
        chunk = 1000
        for index, start in enumerate(range(0, size, chunk)):
            yield process_chunk.s(chunk_id=index, start_index=start, end_index=min(start + chunk, size),
                                  dataset_id=context.parent.kwargs["dataset_id"])


@app.task(base=SpawnTask, spawn_handler="data_processor", spawn_config=SpawnConfig(max_spawn_count=20))
def large_dataset(dataset_id: str, records_count: int) -> dict:
    return {"dataset_id": dataset_id, "records": records_count}


@app.task
def process_chunk(chunk_id: int, start_index: int, end_index: int, dataset_id: str) -> int:
    return end_index - start_index


@app.task
def report(summary: dict) -> str:
    """Applied once every chunk is done (the spawn's on_complete callback)."""
    return f"{summary['counts'].get('succeeded', 0)}/{summary['total']} chunks done"
