"""Every Python example of the README and docs/ runs as written, on the embedded stack, and its children run.

How the Markdown marks, joins and skips examples: :mod:`tests.doc_examples`.
Each example runs in a fresh folder: its modules are written there, the worker
it names is started there as a real prefork ``celery worker`` (``spawnfs://``
folder broker and SQLite store, as the examples configure themselves), and
its script runs with ``python``. Then every lineage store in the folder (its
SQLite files) must show at least one child, every operation completed and
succeeded, and every child succeeded; as many children as the markers say,
where they say it.
"""
from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from celery_spawn.store import SpawnStore, queries
from tests.doc_examples import ROOT, collect

pytestmark = pytest.mark.integration

EXAMPLES, MARKER_ERRORS = collect()
#: Seconds for a worker to come up, a script or setup script to finish, and the children to finish.
WORKER_READY = 60
SCRIPT_TIMEOUT = 120
CHILDREN_TIMEOUT = 60


def test_the_markers_are_well_formed():
    assert not MARKER_ERRORS, "\n".join(MARKER_ERRORS)


def test_the_documentation_has_examples_that_run():
    assert any(example.skip_reason is None for example in EXAMPLES)
    assert any(example.blocks[0].document == "README.md" for example in EXAMPLES)


def _environment() -> dict[str, str]:
    """The test's environment minus any broker, backend or store setting: an example configures its own."""
    drop = ("CELERY_SPAWN_", "CELERY_BROKER", "CELERY_RESULT", "CELERY_APP", "SPAWN_DEMO_DIR")
    env = {key: value for key, value in os.environ.items() if not key.startswith(drop)}
    env["PYTHONUNBUFFERED"] = "1"
    return env


class _Worker:
    """``celery -A APP worker`` in the example's folder, as its reader starts it."""

    def __init__(self, app: str, folder: Path) -> None:
        self.log_path = folder / "worker.log"
        self._log = open(self.log_path, "wb")  # noqa: SIM115 - closed by stop()
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "celery", "-A", app, "worker", "-P", "prefork", "-c", "2", "--loglevel", "INFO",
             "--without-gossip", "--without-mingle", "--without-heartbeat"],
            cwd=folder, env=_environment(), stdout=self._log, stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + WORKER_READY
        while " ready." not in self.log():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                pytest.fail(f"worker -A {app} did not start:\n{self.log()}", pytrace=False)
            time.sleep(0.2)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def stop(self) -> None:
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(10)
        self._log.close()


def _run(args: list[str], folder: Path, what: str, worker: _Worker | None) -> None:
    try:
        done = subprocess.run(args, cwd=folder, env=_environment(), capture_output=True, text=True,
                              timeout=SCRIPT_TIMEOUT)
    except subprocess.TimeoutExpired as exc:
        pytest.fail(f"{what} did not finish in {SCRIPT_TIMEOUT}s:\n{exc.stdout}\n{exc.stderr}"
                    + (f"\nworker log:\n{worker.log()}" if worker else ""), pytrace=False)
    if done.returncode != 0:
        pytest.fail(f"{what} exited with {done.returncode}:\n{done.stdout}\n{done.stderr}"
                    + (f"\nworker log:\n{worker.log()}" if worker else ""), pytrace=False)


def _operations(folder: Path) -> list[dict]:
    """Every spawn operation recorded in the lineage stores (SQLite files) under ``folder``."""
    operations: list[dict] = []
    for path in sorted(folder.rglob("*.sqlite3")):
        store = SpawnStore(f"sqlite:///{path}", {}, auto_migrate=False)
        try:
            if store.has_tables():
                with store.read() as conn:
                    operations += queries.list_operations(conn, limit=queries.MAX_LIMIT)
        finally:
            store.dispose()
    return operations


def _settled(folder: Path) -> list[dict]:
    """The operations once every one of them has completed (at most :data:`CHILDREN_TIMEOUT` seconds)."""
    deadline = time.monotonic() + CHILDREN_TIMEOUT
    while True:
        operations = _operations(folder)
        if operations and all(op["completed"] for op in operations):
            return operations
        if time.monotonic() > deadline:
            return operations
        time.sleep(0.3)


@pytest.mark.parametrize("example", [
    pytest.param(example, id=example.name,
                 marks=[pytest.mark.skip(reason=example.skip_reason)] if example.skip_reason else [])
    for example in EXAMPLES
])
def test_example_runs_and_its_children_run(example, tmp_path):
    folder = tmp_path
    if example.after:
        # The script's folder is copied to the same place under tmp_path, so paths it derives from its
        # own location stay inside tmp_path.
        script = Path(example.after)
        folder = tmp_path / script.parent
        shutil.copytree(ROOT / script.parent, folder,
                        ignore=shutil.ignore_patterns("__pycache__", ".demo", "*.sqlite3*"))
        _run([sys.executable, script.name], folder, example.after, None)
    for name, source in example.modules().items():
        (folder / f"{name}.py").write_text(source, encoding="utf-8")
    script_code = example.script()
    (folder / "example_script.py").write_text(script_code, encoding="utf-8")

    worker = _Worker(example.worker(), folder) if example.worker() else None
    try:
        if script_code.strip():
            _run([sys.executable, "example_script.py"], folder, f"the script of {example.name}", worker)
        operations = _settled(tmp_path)
    finally:
        if worker is not None:
            worker.stop()

    log = f"\nworker log:\n{worker.log()}" if worker else ""
    assert operations, f"{example.name} spawned nothing: no operation in any store under {tmp_path}{log}"
    summary = [(op["id"], op["state"], op["completed"], op["total"], op["counts"]) for op in operations]
    assert all(op["completed"] and op["state"] == "succeeded" for op in operations), f"{summary}{log}"
    children = sum(op["total"] for op in operations)
    succeeded = sum(op["counts"].get("succeeded", 0) for op in operations)
    assert children > 0 and succeeded == children, f"{summary}{log}"
    expected = example.expected_children()
    if expected is not None:
        assert children == expected, f"the markers say {expected} children, the stores hold {children}: {summary}{log}"
