"""``scripts/system-deps.sh``: it installs system packages only as root or through sudo, and otherwise
says what to run. Run with a PATH of stand-ins: ``dpkg`` finds nothing installed, ``apt-get`` and
``sudo`` record how they were called."""
from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

from tests.harness import ROOT

SCRIPT = ROOT / "scripts" / "system-deps.sh"
BASH = shutil.which("bash") or "/bin/bash"


def _stub(folder: Path, name: str, body: str) -> None:
    path = folder / name
    path.write_text(f"#!{BASH}\n{body}\n")
    path.chmod(0o755)


@pytest.fixture
def stubs(tmp_path: Path) -> Path:
    folder = tmp_path / "bin"
    folder.mkdir()
    (folder / "env").symlink_to(shutil.which("env") or "/usr/bin/env")
    _stub(folder, "dpkg", "exit 1")
    _stub(folder, "apt-get", f'echo "apt-get $*" >> {tmp_path}/calls')
    return folder


def _run(stubs: Path, uid: int) -> subprocess.CompletedProcess[str]:
    _stub(stubs, "id", f"echo {uid}")
    env = {k: v for k, v in os.environ.items() if k != "PATH"}
    return subprocess.run([BASH, str(SCRIPT)], env={**env, "PATH": str(stubs)}, capture_output=True, text=True,
                          timeout=60)


def _calls(stubs: Path) -> list[str]:
    calls = stubs.parent / "calls"
    return calls.read_text().splitlines() if calls.exists() else []


def test_as_root_it_installs_without_recommends(stubs):
    result = _run(stubs, uid=0)
    assert result.returncode == 0, result.stderr
    update, install = _calls(stubs)
    assert update == "apt-get update -qq"
    assert install.startswith("apt-get install -y -qq --no-install-recommends ")
    assert {"libpq-dev", "libmariadb-dev", "pkg-config", "build-essential", "nodejs"} <= set(install.split())


def test_with_sudo_it_installs_through_sudo(stubs):
    _stub(stubs, "sudo", f'[ "$1" = -n ] && [ "$2" = true ] && exit 0; echo "sudo $*" >> {stubs.parent}/calls')
    result = _run(stubs, uid=1000)
    assert result.returncode == 0, result.stderr
    update, install = _calls(stubs)
    assert update == "sudo apt-get update -qq"
    assert install.startswith("sudo env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends")


def test_without_root_or_sudo_it_prints_the_line_and_installs_nothing(stubs):
    result = _run(stubs, uid=1000)
    assert result.returncode == 1
    assert _calls(stubs) == []
    [line] = [line for line in result.stderr.splitlines() if "apt-get" in line]
    assert line.startswith("sudo apt-get install -y --no-install-recommends libpq-dev libmariadb-dev pkg-config")


def test_a_sudo_that_asks_for_a_password_is_not_used(stubs):
    _stub(stubs, "sudo", f'[ "$1" = -n ] && exit 1; echo "sudo $*" >> {stubs.parent}/calls')
    result = _run(stubs, uid=1000)
    assert result.returncode == 1
    assert _calls(stubs) == []
    assert "--no-install-recommends" in result.stderr
