"""A label that two parents' spawns share, through every face: the Python API, the command line, the web.

Each face takes the label where it takes an operation id, acts on the newest
operation with that label, and says how many others there are.
"""
from __future__ import annotations

import json

import pytest
from celery.bin.base import CLIContext
from click.testing import CliRunner

from celery_spawn import cancel, completion_task_id, resolve_operation
from celery_spawn.cli import RET_NOT_FOUND, RET_OK
from celery_spawn.cli import spawn as spawn_cli
from celery_spawn.handlers import child_id, labelled_operation_id
from celery_spawn.store import schema as s

TOKEN = "a-token-long-enough-for-any-rule"
NOTE = ("label 'nightly' names 2 operations; {doing} the newest ({newest}), 1 other: "
        "celery spawn list --operation nightly\n")


@pytest.fixture
def labelled(broker_rig, monkeypatch):
    """Two parents' spawns labelled ``nightly``, two dispatched children each; revokes are recorded, not sent."""
    rig = broker_rig
    revoked: list[str] = []
    monkeypatch.setattr(rig.app.control, "revoke", lambda ids, **_: revoked.extend(ids))
    rig.manager.register_handler("two", lambda context: [rig.sig(1), rig.sig(2)])
    rig.spawn({"handler": "two", "operation_id": "nightly"}, task_id="first-parent")
    rig.spawn({"handler": "two", "operation_id": "nightly"}, task_id="second-parent")
    rig.revoked = revoked
    rig.older = rig.operation("first-parent")["id"]
    rig.newest = rig.operation("second-parent")["id"]
    assert (rig.older, rig.newest) == ("nightly", labelled_operation_id("nightly", "second-parent"))
    return rig


def states(rig, operation_id: str) -> list[str]:
    return [job["state"] for job in rig.jobs(operation_id)]


def invoke(rig, *args: str):
    obj = CLIContext(app=rig.app, no_color=True, workdir=None, quiet=False)
    return CliRunner().invoke(spawn_cli, list(args), obj=obj, catch_exceptions=False)


# ---- the Python API -------------------------------------------------------------------------------
def test_resolve_operation_names_the_newest_and_counts_the_others(labelled):
    rig = labelled
    found = resolve_operation(rig.app, "nightly")
    assert (found["id"], found["label"], found["parent_id"], found["others"]) == (
        rig.newest, "nightly", "second-parent", 1)
    by_id = resolve_operation(rig.app, rig.newest)
    assert (by_id["id"], by_id["others"]) == (rig.newest, 0)
    assert resolve_operation(rig.app, "no-such-label") is None


def test_completion_task_id_takes_the_resolved_id(labelled):
    rig = labelled
    newest = resolve_operation(rig.app, "nightly")["id"]
    assert completion_task_id(newest) == child_id(rig.newest, -1)
    assert completion_task_id(newest) != completion_task_id("nightly")
    assert [job["id"] for job in rig.jobs(newest)] == [child_id(rig.newest, 0), child_id(rig.newest, 1)]


def test_cancel_by_label_stops_the_newest_only(labelled):
    rig = labelled
    result = cancel(rig.app, "nightly")
    assert (result["operation_id"], result["label"], result["others"]) == (rig.newest, "nightly", 1)
    assert result["target"] == "nightly" and result["root"] == "second-parent"
    assert result["revoked"] == 2 and sorted(rig.revoked) == sorted(j["id"] for j in rig.jobs(rig.newest))
    assert states(rig, rig.newest) == [s.REVOKED, s.REVOKED]
    assert states(rig, rig.older) == [s.DISPATCHED, s.DISPATCHED]
    older = cancel(rig.app, "first-parent")  # an older one: by its parent job (or its own id)
    assert older["operation_id"] is None and older["others"] == 0 and older["revoked"] == 2
    assert states(rig, rig.older) == [s.REVOKED, s.REVOKED]


# ---- the command line -----------------------------------------------------------------------------
def test_list_shows_and_filters_by_label(labelled):
    rig = labelled
    rig.spawn({"handler": "two"}, task_id="unlabelled-parent")
    listed = json.loads(invoke(rig, "list", "--operation", "nightly", "-f", "json").stdout)
    assert [(op["id"], op["label"]) for op in listed] == [(rig.newest, "nightly"), (rig.older, "nightly")]
    assert [op["id"] for op in json.loads(invoke(rig, "list", "-o", rig.newest, "-f", "json").stdout)] == [rig.newest]
    header, *rows = invoke(rig, "list").stdout.splitlines()
    assert header.split()[:4] == ["CREATED", "(UTC)", "OPERATION", "LABEL"]
    by_id = {row.split()[2]: row.split()[3] for row in rows}
    assert by_id[rig.newest] == by_id[rig.older] == "nightly"
    assert by_id[rig.operation("unlabelled-parent")["id"]] == "-"
    header = invoke(rig, "list", "-o", rig.operation("unlabelled-parent")["id"]).stdout.splitlines()[0]
    assert "LABEL" not in header  # no operation shown has a label
    assert invoke(rig, "list", "--operation", "no-such-label").stdout == "No spawn operations.\n"


def test_tree_of_a_label_shows_the_newest_and_says_how_many_others(labelled):
    rig = labelled
    result = invoke(rig, "tree", "nightly", "-f", "json")
    assert result.exit_code == RET_OK
    tree = json.loads(result.stdout)
    assert tree["id"] == "second-parent" and {c["operation_id"] for c in tree["children"]} == {rig.newest}
    assert result.stderr == NOTE.format(doing="showing", newest=rig.newest)
    text = invoke(rig, "tree", "nightly")
    assert text.stdout.splitlines()[0].split()[2] == "second-parent"
    full = invoke(rig, "tree", "nightly", "--full").stdout
    assert [line for line in full.splitlines() if line.endswith("◀")][0].split()[2] == "second-parent"
    children = json.loads(invoke(rig, "tree", "nightly", "--children-only", "-f", "json").stdout)
    assert [row["operation_id"] for row in children] == [rig.newest, rig.newest]


def test_tree_of_a_label_with_one_operation_says_nothing_more(labelled):
    rig = labelled
    rig.spawn({"handler": "two", "operation_id": "weekly"}, task_id="weekly-parent")
    result = invoke(rig, "tree", "weekly")
    assert result.exit_code == RET_OK and result.stderr == ""
    assert result.stdout.splitlines()[0].split()[2] == "weekly-parent"


def test_tree_still_refuses_a_plain_operation_id(labelled):
    rig = labelled
    result = CliRunner().invoke(spawn_cli, ["tree", rig.newest, "-u", rig.state.settings.database_url])
    assert result.exit_code == RET_NOT_FOUND and "operation id" in result.output
    missing = CliRunner().invoke(spawn_cli, ["tree", "no-such-label", "-u", rig.state.settings.database_url])
    assert missing.exit_code == RET_NOT_FOUND


def test_cancel_by_label_from_the_command_line(labelled):
    rig = labelled
    result = invoke(rig, "cancel", "nightly", "--force", "-f", "json")
    assert result.exit_code == RET_OK
    body = json.loads(result.stdout)
    assert (body["operation_id"], body["label"], body["others"], body["revoked"]) == (rig.newest, "nightly", 1, 2)
    assert result.stderr == NOTE.format(doing="cancelling", newest=rig.newest)
    assert states(rig, rig.older) == [s.DISPATCHED, s.DISPATCHED]
    text = invoke(rig, "cancel", "nightly", "--force").stdout
    assert text == f"cancelled 0 waiting and revoked 0 running jobs below {rig.newest} (label nightly)\n"
    # The older operation's id is the label itself: it is reached through its parent job.
    store_only = CliRunner().invoke(spawn_cli, ["cancel", "first-parent", "--force", "--store-only", "-u",
                                                rig.state.settings.database_url])
    assert store_only.exit_code == RET_OK and store_only.stderr == ""
    assert store_only.stdout.startswith("cancelled 0 waiting and revoked 0 running jobs below first-parent;")
    assert states(rig, rig.older) == [s.DISPATCHED, s.DISPATCHED]  # store-only: left to their workers


# ---- the web --------------------------------------------------------------------------------------
@pytest.fixture
def web(labelled):
    from celery_spawn.web import create_app

    return create_app(labelled.app, token=TOKEN).test_client()


def call(client, path: str, method: str = "GET"):
    response = client.open(path, method=method, headers={"Authorization": f"Bearer {TOKEN}"})
    return response.status_code, response.get_json()


def test_the_web_takes_a_label_for_an_operation(labelled, web):
    rig = labelled
    status, detail = call(web, "/api/spawn/operations/nightly")
    assert status == 200 and (detail["id"], detail["label"], detail["others"]) == (rig.newest, "nightly", 1)
    assert [child["operation_id"] for child in detail["children"]] == [rig.newest, rig.newest]
    status, by_id = call(web, f"/api/spawn/operations/{rig.newest}")
    assert status == 200 and (by_id["id"], by_id["others"]) == (rig.newest, 0)
    status, listed = call(web, "/api/spawn/operations?operation=nightly")
    assert status == 200 and [op["id"] for op in listed["operations"]] == [rig.newest, rig.older]
    assert call(web, "/api/spawn/operations/no-such-label")[0] == 404
    assert call(web, "/api/spawn/operations/second-parent")[0] == 404  # a job id is not an operation


def test_the_web_cancels_the_newest_operation_of_a_label(labelled, web):
    rig = labelled
    status, body = call(web, "/api/spawn/operations/nightly/cancel", method="POST")
    assert status == 200
    assert (body["operation_id"], body["label"], body["others"], body["mode"], body["revoked"]) == (
        rig.newest, "nightly", 1, "celery", 2)
    assert states(rig, rig.newest) == [s.REVOKED, s.REVOKED]
    assert states(rig, rig.older) == [s.DISPATCHED, s.DISPATCHED]
