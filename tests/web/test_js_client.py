"""The seed's JavaScript client (``SpawnManager``), verbatim, under Node against ``celery spawn serve``."""
from __future__ import annotations

import json
import subprocess

import pytest

from tests.web.helpers import require_program, served

#: The class from the seed's "Web API Integration" section, character for character.
SEED_CLIENT = """\
class SpawnManager {
    constructor(baseUrl) {
        this.baseUrl = baseUrl;
    }
    
    async getSpawnTree(jobId, format = 'json', maxDepth = 10) {
        const response = await fetch(
            `${this.baseUrl}/api/jobs/${jobId}/spawn-tree?format=${format}&max_depth=${maxDepth}`
        );
        return response.json();
    }
    
    async getSpawnStats(queue = null, hours = 24) {
        const params = new URLSearchParams();
        if (queue) params.append('queue', queue);
        params.append('hours', hours);
        
        const response = await fetch(`${this.baseUrl}/api/spawn/stats?${params}`);
        return response.json();
    }
    
    async getSpawnOperations(limit = 50) {
        const response = await fetch(`${this.baseUrl}/api/spawn/operations?limit=${limit}`);
        return response.json();
    }
}
"""

#: Drives the client the way the seed's usage example does, and prints what came back as JSON.
DRIVER = """
const [baseUrl, jobId, queue] = process.argv.slice(2);
const spawnManager = new SpawnManager(baseUrl);
const spawnTree = await spawnManager.getSpawnTree(jobId);
const results = {
    spawnTree,
    mermaid: await spawnManager.getSpawnTree(jobId, 'mermaid', 1),
    statsAll: await spawnManager.getSpawnStats(),
    statsQueue: await spawnManager.getSpawnStats(queue, 2),
    operations: await spawnManager.getSpawnOperations(),
    fewOperations: await spawnManager.getSpawnOperations(3),
    unknown: await spawnManager.getSpawnTree('no-such-job'),
};
console.log(JSON.stringify(results));
"""


@pytest.fixture(scope="module")
def node() -> str:
    return require_program("node", "nodejs")


def test_seed_client_gets_real_data(node, backend, trees, tmp_path, artifacts):
    script = tmp_path / "spawn_manager.mjs"  # an ES module: the seed's usage awaits at top level
    script.write_text(SEED_CLIENT + DRIVER)
    with served(backend.env(), "--port", "0", log=artifacts / f"serve-js-{backend.name}.log") as server:
        result = subprocess.run([node, str(script), server.url, trees.nested, trees.queue], capture_output=True,
                                text=True, timeout=60, check=False)
    assert result.returncode == 0, result.stderr
    data = json.loads(result.stdout)

    tree = data["spawnTree"]
    assert tree["job_id"] == trees.nested and tree["format"] == "json" and tree["max_depth"] == 10
    assert tree["summary"]["jobs"] == 15 and tree["summary"]["states"] == {"succeeded": 15}
    assert tree["tree"]["id"] == trees.nested and tree["tree"]["task_name"] == "tests.nest"
    assert len(tree["tree"]["children"]) == 2 and tree["tree"]["children"][0]["children"][0]["depth"] == 2

    assert data["mermaid"]["mermaid"].startswith("graph TD") and data["mermaid"]["summary"]["hidden"] == 4

    assert data["statsAll"]["window"]["hours"] == 24 and data["statsAll"]["operations"] == 10
    assert data["statsAll"]["children"] == 11 + 14 + 3
    assert data["statsQueue"]["queue"] == trees.queue and data["statsQueue"]["window"]["hours"] == 2
    assert {group["handler"] for group in data["statsQueue"]["by_handler"]} == {
        "dataset_processor", "nested", "workflow", "safe_spawner"}

    operations = data["operations"]["operations"]
    assert data["operations"]["limit"] == 50 and len(operations) == 10
    dataset = next(op for op in operations if op["id"] == trees.dataset_op)
    assert dataset["progress"] == {"done": 11, "total": 11, "percent": 100.0}
    assert len(data["fewOperations"]["operations"]) == 3

    assert data["unknown"] == {"error": "no spawned job has id 'no-such-job'"}
