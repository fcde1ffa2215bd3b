"""Run the fan-out example end to end: a real worker, one parent, eleven children, the tree."""
from __future__ import annotations

import shutil
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from app import DEMO, app, report  # noqa: E402

from celery_spawn import SpawnConfig, completion_task_id, get_state, with_spawn_config  # noqa: E402
from celery_spawn.transport.spawnfs import folder_options  # noqa: E402
from celery_spawn.store import queries  # noqa: E402


def main() -> int:
    shutil.rmtree(DEMO, ignore_errors=True)
    folder_options(DEMO / "broker")  # creates the (now empty) broker folders again
    (DEMO / "results").mkdir(parents=True)
    worker = subprocess.Popen(
        [sys.executable, "-m", "celery", "-A", "app", "worker", "-P", "prefork", "-c", "2", "--loglevel", "WARNING",
         "--without-gossip", "--without-mingle", "--without-heartbeat"],
        cwd=HERE, stdout=open(DEMO / "worker.log", "wb"), stderr=subprocess.STDOUT)
    try:
        parent = app.signature("app.large_dataset", kwargs={"dataset_id": "ds-123", "records_count": 10_500})
        with_spawn_config(parent, SpawnConfig().with_operation_id("op-dataset-123").with_on_complete(report.s()))
        result = parent.apply_async()
        print("parent result:", result.get(timeout=60))
        store = get_state(app).store
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:  # until every chunk is done and recorded
            with store.read() as conn:
                operation = queries.get_operation(conn, "op-dataset-123")
            if operation is not None and operation["completed"]:
                break
            time.sleep(0.3)
        subprocess.run([sys.executable, "-m", "celery", "-A", "app", "spawn", "tree", result.id], cwd=HERE, check=False)
        print("on_complete:", app.AsyncResult(completion_task_id("op-dataset-123")).get(timeout=30))
        return 0
    finally:
        worker.terminate()
        worker.wait(30)


if __name__ == "__main__":
    raise SystemExit(main())
