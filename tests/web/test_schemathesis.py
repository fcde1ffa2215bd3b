"""Schemathesis against ``/api/openapi.json`` of a live ``celery spawn serve``, over trees a real worker made.

Every check schemathesis has (no server error, status codes, content types,
response schemas, negative data rejected, positive data accepted, auth not
ignored, ...) on every operation, in its coverage, fuzzing and stateful
phases. Half of the generated job and operation ids are real ones from the
store, so the 200 answers are checked against the schema too, not only 404s.
"""
from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

from celery_spawn import get_state
from celery_spawn.store import queries
from tests.harness import service_missing
from tests.web.helpers import served

TOKEN = "fuzz-token"
#: Test cases per API operation and phase: enough to find a bad branch, small enough for ~15 s a store.
MAX_EXAMPLES = 25


def schemathesis_command() -> list[str]:
    found = shutil.which("schemathesis", path=str(Path(sys.executable).parent)) or shutil.which("schemathesis")
    if not found:
        service_missing("schemathesis", FileNotFoundError("pip install 'celery-spawn[test]'"))
    return [found]


def config(path: Path, jobs: list[str], operations: list[str]) -> Path:
    """A schemathesis.toml drawing half the path ids from the store's real ones."""
    path.write_text(
        "[dictionaries]\n"
        f"jobs = {{ values = {json.dumps(jobs)} }}\n"
        f"operations = {{ values = {json.dumps(operations)} }}\n\n"
        "[parameters]\n"
        '"path.job_id" = { dictionary = "jobs", probability = 0.5 }\n'
        '"path.operation_id" = { dictionary = "operations", probability = 0.5 }\n'
    )
    return path


def test_the_api_keeps_its_openapi_document(backend, trees, client_app, tmp_path, artifacts):
    command = schemathesis_command()
    with get_state(client_app).store.read() as conn:
        operations = [op["id"] for op in queries.list_operations(conn, limit=100)]
        jobs = [trees.nested, trees.dataset, trees.deepest, trees.middle, *trees.dataset_children[:3]]
    toml = config(tmp_path / "schemathesis.toml", jobs, operations)
    report = artifacts / f"schemathesis-{backend.name}"
    with served(backend.env(), "--port", "0", "--token", TOKEN,
                log=artifacts / f"serve-schemathesis-{backend.name}.log") as server:
        result = subprocess.run(
            [*command, "--config-file", str(toml), "run", f"{server.url}/api/openapi.json",
             "--checks", "all", "--max-examples", str(MAX_EXAMPLES), "--workers", "2",
             "--header", f"Authorization: Bearer {TOKEN}", "--request-timeout", "30",
             "--report", "junit", "--report-dir", str(report), "--no-color"],
            capture_output=True, text=True, timeout=300, check=False, cwd=tmp_path)
        server_log = server.log()
    (artifacts / f"schemathesis-{backend.name}.txt").write_text(result.stdout + result.stderr)
    assert result.returncode == 0, result.stdout[-6000:] + result.stderr[-2000:]
    assert "8 selected / 8 total" in result.stdout
    assert " failed" not in result.stdout.split("SUMMARY")[-1]
    assert "Traceback" not in server_log and not re.search(r'" 5\d\d ', server_log)
