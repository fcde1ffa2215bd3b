"""A user's type checker sees celery-spawn's public names, typed (``py.typed``).

``tests/typing/user_code.py`` is checked with ``mypy --strict`` the way a user's
project would check it: the package is found in a site-packages folder (its
tracked files copied into a throwaway virtual environment, which also sees this
venv's libraries and Celery's stubs), not through the checkout. Without
``py.typed`` mypy must refuse it; an untyped public function fails the strict check.
"""
from __future__ import annotations

import shutil
import subprocess
import sys
import sysconfig
import venv
from pathlib import Path

import pytest

from tests.harness import ROOT

USER_CODE = ROOT / "tests" / "typing" / "user_code.py"

pytest.importorskip("mypy", reason="mypy is in the dev and typecheck installs")


@pytest.fixture(scope="module")
def environment(tmp_path_factory) -> Path:
    """A virtual environment whose site-packages holds a copy of the package and sees this venv's libraries."""
    home = tmp_path_factory.mktemp("typed")
    venv.EnvBuilder(with_pip=False).create(home / "venv")
    [site] = (home / "venv").glob("lib/python*/site-packages")
    tracked = subprocess.run(["git", "ls-files", "-z", "celery_spawn"], cwd=ROOT, check=True,
                             capture_output=True).stdout
    for name in filter(None, tracked.decode().split("\0")):
        if (ROOT / name).is_file():
            (site / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / name, site / name)
    (site / "libraries.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    (home / "none.ini").write_text("[mypy]\n")
    return home


def _mypy(environment: Path, *files: Path) -> subprocess.CompletedProcess[str]:
    """``mypy --strict`` over copies of ``files`` beside the environment (nothing of the checkout in reach)."""
    copies = []
    for file in files:
        copies.append(str(environment / file.name))
        shutil.copy2(file, copies[-1])
    return subprocess.run(
        [sys.executable, "-m", "mypy", "--strict", "--no-incremental", "--python-executable",
         str(environment / "venv" / "bin" / "python"), "--config-file", str(environment / "none.ini"), *copies],
        cwd=environment, capture_output=True, text=True, timeout=300,
    )


@pytest.fixture(scope="module")
def checked(environment: Path) -> subprocess.CompletedProcess[str]:
    return _mypy(environment, USER_CODE)


def test_the_user_code_passes_strict_checking(checked):
    assert checked.returncode == 0, checked.stdout + checked.stderr


def test_it_is_the_installed_copy_that_was_checked(environment):
    [site] = (environment / "venv").glob("lib/python*/site-packages")
    assert (site / "celery_spawn" / "py.typed").exists()
    assert not (environment / "celery_spawn").exists()
    assert "celery_spawn" not in {path.name for path in Path(USER_CODE).parents}


def test_without_py_typed_the_package_is_refused(environment):
    [site] = (environment / "venv").glob("lib/python*/site-packages")
    marker = site / "celery_spawn" / "py.typed"
    marker.rename(marker.with_suffix(".off"))
    try:
        result = _mypy(environment, USER_CODE)
    finally:
        marker.with_suffix(".off").rename(marker)
    assert result.returncode != 0
    assert "missing library stubs or py.typed marker" in result.stdout, result.stdout


def test_an_untyped_public_function_fails_the_check(environment, tmp_path):
    probe = tmp_path / "probe.py"
    probe.write_text("from celery_spawn.handlers import child_id\n"
                     "from celery_spawn.store.rows import seconds_value\n"
                     "x: str = child_id('op', 1)\n")
    untyped = tmp_path / "untyped.py"
    untyped.write_text("from celery_spawn.options import FiniteFloatRange\n"
                       "FiniteFloatRange(0, 1).convert(1.0, None, None)\n")
    typed = _mypy(environment, probe)
    assert typed.returncode == 0, typed.stdout
    result = _mypy(environment, untyped)
    assert result.returncode != 0 and "untyped" in result.stdout, result.stdout
