"""Without OpenTelemetry, prometheus-client and Sentry's SDK, spawning works and nothing tries to import them;
with them installed, a process that does not use them does not get them imported by celery-spawn."""
from __future__ import annotations

import subprocess
import sys

from tests.harness import ROOT

SCRIPT = r"""
import sys
if "--blocked" in sys.argv:
    from tests import without_optional
    without_optional.block()
from tests.without_optional import loaded_optional
from tests.unit.helpers import Rig
from celery_spawn import metrics, tracing

rig = Rig(sys.argv[1])

@rig.handler("fan")
def fan(context):
    return [rig.sig(i) for i in range(3)]

callback = dict(rig.app.signature("unit.child"))
result = rig.spawn({"handler": "fan", "on_complete": callback})
assert result.get() == "parent-result"
assert len(rig.runs) == 4, rig.runs  # three children, then the callback
assert all(job["state"] == "succeeded" for job in rig.children_of(result.id))
assert metrics.active() is None and not tracing.in_use()
loaded = loaded_optional()
if "--blocked" in sys.argv:  # a scrape of serve names the missing extra
    from celery_spawn.web import create_app
    response = create_app(database_url=sys.argv[1]).test_client().get("/metrics")
    assert response.status_code == 501, response.status_code
rig.close()
print("loaded:", ",".join(loaded))
"""


def run(tmp_path, *args: str) -> str:
    url = f"sqlite:///{tmp_path / 'spawn.sqlite3'}"
    done = subprocess.run([sys.executable, "-c", SCRIPT, url, *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr
    return done.stdout.strip().splitlines()[-1]


def test_spawning_works_without_the_optional_libraries(tmp_path):
    assert run(tmp_path, "--blocked") == "loaded:"


def test_an_app_that_does_not_use_them_does_not_import_them(tmp_path):
    assert run(tmp_path) == "loaded:"
