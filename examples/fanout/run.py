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

from celery_spawn import SpawnConfig, completion_task_id, resolve_operation, with_spawn_config  # noqa: E402
from celery_spawn.transport.spawnfs import folder_options  # noqa: E402


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
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:  # until every chunk is done and recorded
            # "op-dataset-123" is a label: it names the newest operation of the parents that gave it
            operation = resolve_operation(app, "op-dataset-123")
            if operation is not None and operation["parent_id"] == result.id and operation["completed"]:
                break
            time.sleep(0.3)
        if operation is None:
            print("the spawn was not recorded: see", DEMO / "worker.log")
            return 1
        subprocess.run([sys.executable, "-m", "celery", "-A", "app", "spawn", "tree", result.id], cwd=HERE, check=False)
        # the callback's task id derives from the operation's id, which the label resolved to
        print("on_complete:", app.AsyncResult(completion_task_id(operation["id"])).get(timeout=30))
        return 0
    finally:
        worker.terminate()
        worker.wait(30)


if __name__ == "__main__":
    raise SystemExit(main())
