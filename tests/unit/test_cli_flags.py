"""The command line's shared flags: ``-j/--json`` on every listing, ``--state`` as a choice of the real
states, shell completion through Celery's root command, and the spinner of the long commands (on a
terminal only)."""
from __future__ import annotations

import json
import os
import pty
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from celery_spawn.cli import RET_OK, RET_USAGE
from celery_spawn.cli import progress as progress_module
from celery_spawn.cli import spawn as spawn_cli
from celery_spawn.protocol import OPERATION_STATES
from celery_spawn.store import SpawnStore
from tests.harness import ROOT, StoreBuilder

#: (command and its arguments): every command that takes --format.
LISTINGS = [["list"], ["list", "--detailed"], ["stats"], ["pending"], ["tree", "root-a"], ["lineage", "root-a.0"],
            ["cancel", "op-a", "--store-only", "--force"]]


@pytest.fixture
def store_url(sqlite_url) -> str:
    store = SpawnStore(sqlite_url)
    store.migrate()
    builder = StoreBuilder(store)
    builder.job("root-a", task="tests.parent", queue="q")
    builder.spawn("root-a", 2, operation="op-a", states=["pending", "succeeded"], task="tests.child", queue="q")
    builder.flush()
    store.dispose()
    return sqlite_url


def invoke(*args: str) -> tuple[int, str, str]:
    result = CliRunner().invoke(spawn_cli, list(args), obj=None, catch_exceptions=False)
    return result.exit_code, result.stdout, result.stderr


def plain_env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items()
            if not k.startswith(("CELERY_SPAWN_", "_CELERY")) and k not in ("APP", "CELERY_APP")}


@pytest.mark.parametrize("args", LISTINGS, ids=lambda args: " ".join(args[:2]))
def test_json_flag_is_format_json(store_url, args):
    outputs = []
    for flags in (["--format", "json"], ["-j"], ["--json"]):
        code, out, _ = invoke(*args, *flags, "-u", store_url)
        assert code == RET_OK, out
        parsed = json.loads(out)
        if isinstance(parsed, dict):
            parsed.pop("window", None)  # stats: the time it ran
        outputs.append(parsed)
    if args[0] == "cancel":  # the first one cancelled: the same answer's keys, nothing left to cancel
        assert outputs[0]["cancelled"] == 1 and outputs[1]["cancelled"] == outputs[2]["cancelled"] == 0
        assert outputs[0].keys() == outputs[1].keys() == outputs[2].keys()
    else:
        assert outputs[0] == outputs[1] == outputs[2]


def test_json_flag_refuses_another_format(store_url):
    code, _, err = invoke("tree", "root-a", "-j", "--format", "mermaid", "-u", store_url)
    assert code == RET_USAGE and "--json is --format json" in err
    code, out, _ = invoke("tree", "root-a", "-j", "--format", "json", "-u", store_url)
    assert code == RET_OK and json.loads(out)["id"] == "root-a"


def test_state_is_a_choice_of_the_operation_states(store_url):
    [state] = [p for p in spawn_cli.commands["list"].params if p.name == "state"]
    assert tuple(state.type.choices) == OPERATION_STATES
    code, _, err = invoke("list", "--state", "runing", "-u", store_url)
    assert code == RET_USAGE and "'runing' is not one of" in err
    code, out, _ = invoke("list", "--state", "running", "-j", "-u", store_url)
    assert code == RET_OK and [op["id"] for op in json.loads(out)] == ["op-a"]


def complete(words: str) -> list[str]:
    """What bash completion offers after ``words`` (click's completion protocol, as Celery exposes it)."""
    env = {**plain_env(), "_CELERY_COMPLETE": "bash_complete", "COMP_WORDS": words,
           "COMP_CWORD": str(len(words.split(" ")) - 1)}
    celery = Path(sys.executable).with_name("celery")  # the console script: `python -m celery` is another prog
    done = subprocess.run([str(celery)], env=env, cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    return [line.split(",", 1)[1] for line in done.stdout.splitlines()]


def test_completion_offers_the_spawn_commands():
    offered = complete("celery spawn ")
    assert {"list", "tree", "stats", "monitor", "lineage", "pending", "cancel", "recover", "migrate"} <= set(offered)


def test_completion_offers_the_states_and_the_formats():
    assert complete("celery spawn list --state ") == list(OPERATION_STATES)
    assert complete("celery spawn tree root --format ") == ["text", "json", "mermaid", "dot"]


# ---- the spinner ------------------------------------------------------------------------------------
@pytest.mark.parametrize("command", [["migrate"], ["cancel", "op-a", "--store-only", "--force"]])
def test_no_spinner_when_piped(store_url, command):
    done = subprocess.run([sys.executable, "-m", "celery", "spawn", *command, "-u", store_url], cwd=ROOT,
                          env=plain_env(), capture_output=True, text=True, timeout=60)
    assert done.returncode == RET_OK, done.stderr
    assert done.stderr == "" and "\r" not in done.stdout


@pytest.mark.parametrize("command, label", [(["migrate"], "migrating"),
                                             (["cancel", "op-a", "--store-only", "--force"], "cancelling below op-a")])
def test_a_spinner_on_a_terminal(store_url, command, label):
    """stderr on a pseudo-terminal: the label spins there, and its line is cleared before the result."""
    leader, follower = pty.openpty()
    try:
        done = subprocess.run([sys.executable, "-m", "celery", "spawn", *command, "-u", store_url], cwd=ROOT,
                              env=plain_env(), stdout=subprocess.PIPE, stderr=follower, text=True, timeout=60)
        os.close(follower)
        follower = -1
        shown = b""
        while True:
            try:
                chunk = os.read(leader, 4096)
            except OSError:
                break
            if not chunk:
                break
            shown += chunk
    finally:
        if follower != -1:
            os.close(follower)
        os.close(leader)
    assert done.returncode == RET_OK
    text = shown.decode()
    assert f"\r{label}" in text and text.endswith("\r"), text
    assert label not in done.stdout


def test_the_spinner_draws_only_on_a_terminal(monkeypatch, capsys):
    with progress_module.working("counting"):
        pass
    assert capsys.readouterr().err == ""
    monkeypatch.setattr(progress_module, "on_terminal", lambda: True)
    with progress_module.working("counting"):
        pass
    err = capsys.readouterr().err
    assert err.startswith("\rcounting ") and err.endswith("\r")


def test_a_command_freezes_the_heap_at_exit_once(monkeypatch, tmp_path):
    """The process ends with the command: the collector is spared teardown's passes, registered once only."""
    import gc

    from celery_spawn.cli import group

    registered = []
    monkeypatch.setattr(group, "_freezing", False)
    monkeypatch.setattr(group.atexit, "register", registered.append)
    url = f"sqlite:///{tmp_path / 'store.sqlite3'}"
    invoke("--database-url", url, "migrate")
    invoke("--database-url", url, "stats")
    assert registered == [gc.freeze]
