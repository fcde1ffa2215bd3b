"""``manage.py spawn <command>`` is ``celery -A proj spawn <command>``."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from django.core.management import CommandError, call_command

from celery_spawn import get_state

PROJECT = Path(__file__).resolve().parent.parent


def test_call_command_spawn_tree_and_stats(order, capsys):
    call_command("spawn", "tree", order)
    out = capsys.readouterr().out
    assert "orders.tasks.fulfil_order  succeeded" in out
    assert out.count("orders.tasks.pack_item  succeeded") == 3
    assert "4 jobs, 2 levels (succeeded 4)" in out
    call_command("spawn", "stats", "--json")
    stats = json.loads(capsys.readouterr().out)
    assert stats["children"] >= 3 and stats["operations"] >= 1


def test_an_unknown_job_is_exit_code_1(transactional_db, capsys):
    with pytest.raises(CommandError) as caught:
        call_command("spawn", "tree", "no-such-job")
    assert caught.value.returncode == 1
    assert "no spawned job has id 'no-such-job'" in capsys.readouterr().err


def manage(*args: str, app) -> subprocess.CompletedProcess:
    # The test database is not the project's: the child process is pointed at it through the environment.
    env = {**os.environ, "CELERY_SPAWN_DATABASE_URL": get_state(app).settings.database_url}
    return subprocess.run([sys.executable, "manage.py", *args], cwd=PROJECT, env=env, capture_output=True,
                          text=True, timeout=120, check=False)


def test_manage_py_spawn_from_the_command_line(order, app):
    done = manage("spawn", "tree", order, "--format", "json", app=app)
    assert done.returncode == 0, done.stderr
    tree = json.loads(done.stdout)
    assert tree["id"] == order and len(tree["children"]) == 3
    done = manage("spawn", "--settings=proj.settings", "tree", "no-such-job", app=app)
    assert done.returncode == 1 and "no spawned job has id 'no-such-job'" in done.stderr
    done = manage("spawn", "tree", "not a job id", app=app)
    assert done.returncode == 2 and "Usage: manage.py spawn tree" in done.stderr
    done = manage("spawn", "--help", app=app)
    assert done.returncode == 0 and "Usage: manage.py spawn [OPTIONS] COMMAND" in done.stdout
    assert "tree" in done.stdout and "stats" in done.stdout and "cancel" in done.stdout
