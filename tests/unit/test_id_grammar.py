"""One id grammar: what a spawn records is what every tool accepts."""
from __future__ import annotations

import pytest
from click.testing import CliRunner

from celery_spawn import InvalidJobId, SpawnConfig, SpawnConfigError
from celery_spawn.options import JOB_ID_PATTERN
from celery_spawn.protocol import ID_PATTERN, is_valid_id
from celery_spawn.web.params import ID_PATTERN as WEB_ID_PATTERN

UNREACHABLE = ["tenant/42 report", "a b", "x" * 65, "", "tab\there", "é", "50%", "a?b", "#1"]
REACHABLE = ["nightly", "op-dataset-123", "custom-op-123", "a.b:c_d~e", "x" * 64,
             "3f2b8a6e-2d1c-4a9e-8f61-0d9c7c1b5e42"]


def test_the_faces_use_the_one_grammar():
    assert JOB_ID_PATTERN is ID_PATTERN and WEB_ID_PATTERN is ID_PATTERN


@pytest.mark.parametrize("label", UNREACHABLE)
def test_an_operation_id_no_tool_could_take_is_refused_at_spawn_time(label):
    assert not is_valid_id(label)
    with pytest.raises(SpawnConfigError, match="operation_id"):
        SpawnConfig(operation_id=label)


@pytest.mark.parametrize("label", REACHABLE)
def test_every_accepted_operation_id_is_taken_by_the_cli(label):
    assert SpawnConfig(operation_id=label).operation_id == label
    from celery_spawn.options import JobIdType

    assert JobIdType().convert(label, None, None) == label


def test_a_child_task_id_outside_the_grammar_refuses_the_spawn(broker_rig):
    rig = broker_rig
    rig.manager.register_handler("odd", lambda context: [rig.sig(0).set(task_id="tenant/42 report")])
    parent = rig.spawn({"handler": "odd"}, value=1)
    assert parent.state == "SUCCESS" and parent.get() == 1
    assert "child #0" in str(rig.failures[-1][1]) and "A-Z a-z 0-9" in str(rig.failures[-1][1])
    assert rig.drain() == []


def test_a_parent_id_outside_the_grammar_refuses_the_spawn(broker_rig):
    rig = broker_rig
    rig.manager.register_handler("two", lambda context: [rig.sig(0), rig.sig(1)])
    parent = rig.spawn({"handler": "two"}, value=1, task_id="tenant/42 report")
    assert parent.state == "SUCCESS" and parent.get() == 1
    assert isinstance(rig.failures[-1][1], InvalidJobId)
    assert rig.drain() == []
    [operation] = rig.operations("tenant/42 report")
    assert operation["state"] == "failed" and "InvalidJobId" in operation["error"]
    assert is_valid_id(operation["id"])  # the refusal itself is reachable: celery spawn list shows it


def test_the_cli_names_the_grammar_when_it_refuses_an_id():
    from celery_spawn.cli import spawn

    result = CliRunner().invoke(spawn, ["tree", "tenant/42 report", "-u", "sqlite://"])
    assert result.exit_code == 2 and "A-Z a-z 0-9" in result.output
