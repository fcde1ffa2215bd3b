"""One cancel: the Python API, the command line and the web all run :meth:`Canceller.cancel`.

Each face cancels a real spawn on a real store (a child held behind a
dependency, one dispatched); the spy on the one implementation shows each
went through it, and the store shows the same outcome whichever face asked.
A face without a broker (the web served without ``-A``) runs the same
cancel, store-only: it leaves the dispatched child to its worker.
"""
from __future__ import annotations

import pytest
from celery.bin.base import CLIContext
from click.testing import CliRunner

from celery_spawn import cancel, depends_on
from celery_spawn.cli import spawn as spawn_cli
from celery_spawn.engine.cancel import Canceller
from celery_spawn.store import schema as s

TOKEN = "a-token-long-enough-for-any-rule"


@pytest.fixture
def calls(monkeypatch):
    """Every run of the one cancel: (target, terminate, store_only)."""
    seen: list[tuple[str, bool, bool]] = []
    real = Canceller.cancel

    def spy(self, target_id, terminate=False, reason="cancelled", store_only=False):
        seen.append((target_id, terminate, store_only or self.revoke is None))
        return real(self, target_id, terminate=terminate, reason=reason, store_only=store_only)

    monkeypatch.setattr(Canceller, "cancel", spy)
    return seen


@pytest.fixture
def tree(broker_rig, monkeypatch):
    """A spawn with one dispatched child and one held behind it; revokes are recorded, not sent."""
    rig = broker_rig
    revoked: list[str] = []
    monkeypatch.setattr(rig.app.control, "revoke", lambda ids, **_: revoked.extend(ids))

    @rig.handler("two")
    def two(context):
        first, second = rig.sig("first"), rig.sig("second")
        context.freeze(first)
        depends_on(second, first.id)
        return [first, second]

    result = rig.spawn({"handler": "two"})
    operation_id = rig.operation(result.id)["id"]
    rig.revoked = revoked
    return rig, operation_id


def states(rig, operation_id) -> list[str]:
    return [job["state"] for job in rig.jobs(operation_id)]


def test_the_python_api_runs_the_one_cancel(tree, calls):
    rig, operation_id = tree
    result = cancel(rig.app, operation_id)
    assert calls == [(operation_id, False, False)]
    assert (result["cancelled"], result["revoked"]) == (1, 1)
    assert states(rig, operation_id) == [s.REVOKED, s.CANCELLED]
    assert len(rig.revoked) == 1
    assert rig.operation(rig.jobs(operation_id)[0]["parent_id"])["completed"]


def test_the_command_line_runs_the_one_cancel(tree, calls):
    rig, operation_id = tree
    obj = CLIContext(app=rig.app, no_color=True, workdir=None, quiet=False)
    outcome = CliRunner().invoke(spawn_cli, ["cancel", operation_id, "--force", "--terminate", "-f", "json"], obj=obj)
    assert outcome.exit_code == 0, outcome.output
    assert calls == [(operation_id, True, False)]
    assert states(rig, operation_id) == [s.REVOKED, s.CANCELLED]
    assert '"cancelled": 1' in outcome.output and '"revoked": 1' in outcome.output


def test_the_web_runs_the_one_cancel_through_celery(tree, calls):
    from celery_spawn.web import create_app

    rig, operation_id = tree
    client = create_app(rig.app, token=TOKEN).test_client()
    response = client.post(f"/api/spawn/operations/{operation_id}/cancel",
                           headers={"Authorization": f"Bearer {TOKEN}"})
    assert response.status_code == 200, response.get_json()
    body = response.get_json()
    assert calls == [(operation_id, False, False)]
    assert (body["mode"], body["cancelled"], body["revoked"], body["still_running"]) == ("celery", 1, 1, 0)
    assert states(rig, operation_id) == [s.REVOKED, s.CANCELLED]


def test_the_web_without_a_broker_runs_the_one_cancel_store_only(tree, calls):
    from celery_spawn.web import create_app

    rig, operation_id = tree
    client = create_app(None, database_url=rig.state.settings.database_url, token=TOKEN).test_client()
    response = client.post(f"/api/spawn/operations/{operation_id}/cancel",
                           headers={"Authorization": f"Bearer {TOKEN}"})
    assert response.status_code == 200, response.get_json()
    body = response.get_json()
    assert calls == [(operation_id, False, True)]
    assert (body["mode"], body["cancelled"], body["revoked"], body["still_running"]) == ("store", 1, 0, 1)
    assert states(rig, operation_id) == [s.DISPATCHED, s.CANCELLED]  # the dispatched child is left to its worker
    assert rig.revoked == []
    # the store-only cancel completes the operation with the same rules once the last child ends
    rig.state.tracker.succeeded(rig.jobs(operation_id)[0]["id"])
    operation = rig.operation(rig.jobs(operation_id)[0]["parent_id"])
    assert operation["completed"] and operation["state"] == s.OP_PARTIALLY_FAILED


def test_the_command_line_without_an_app_runs_the_one_cancel_store_only(tree, calls):
    rig, operation_id = tree
    url = rig.state.settings.database_url
    runner = CliRunner()
    refused = runner.invoke(spawn_cli, ["cancel", operation_id, "--force", "-u", url], obj=None)
    assert refused.exit_code == 2 and "--store-only" in refused.output and calls == []
    outcome = runner.invoke(spawn_cli, ["cancel", operation_id, "--force", "--store-only", "-u", url], obj=None)
    assert outcome.exit_code == 0, outcome.output
    assert calls == [(operation_id, False, True)]
    assert "left to their workers" in outcome.output
    assert states(rig, operation_id) == [s.DISPATCHED, s.CANCELLED]
    assert rig.revoked == []
