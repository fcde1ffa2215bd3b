"""The layout of the test suite: no module imports a ``conftest`` or a ``test_*`` module.

Fixtures live in ``conftest.py`` files, where pytest finds them without an import;
shared classes, functions and constants live in plain helper modules
(``tests/harness.py``, ``tests/*/helpers.py``, ...). Importing a test module runs
its module-level code twice under two names and drags its fixtures and tests
along; importing a ``conftest`` does the same to fixtures pytest already loaded.
"""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

TESTS = Path(__file__).resolve().parent.parent


def _forbidden(name: str) -> bool:
    """A dotted module name (or an imported name) that is a conftest or a test module."""
    last = name.rsplit(".", 1)[-1]
    return last == "conftest" or last.startswith("test_")


def forbidden_imports(source: str, filename: str = "<test>") -> list[str]:
    """The ``import`` statements of ``source`` that bring in a conftest or a test module, as written."""
    found = []
    for node in ast.walk(ast.parse(source, filename)):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            # ``from tests.unit.test_x import y``, ``from .conftest import y``, ``from tests.unit import test_x``
            names = [node.module or ""] + [alias.name for alias in node.names]
        else:
            continue
        if any(_forbidden(name) for name in names if name):
            found.append(f"{filename}:{node.lineno}: {ast.unparse(node)}")
    return found


def test_the_suite_has_modules_to_check():
    modules = list(TESTS.rglob("*.py"))
    assert TESTS / "conftest.py" in modules
    assert Path(__file__).resolve() in modules


def test_no_module_imports_a_conftest_or_a_test_module():
    offending = []
    for path in sorted(TESTS.rglob("*.py")):
        offending += forbidden_imports(path.read_text(encoding="utf-8"), str(path.relative_to(TESTS.parent)))
    assert not offending, ("move what these import into a helper module (fixtures into a conftest.py):\n"
                           + "\n".join(offending))


@pytest.mark.parametrize("source", [
    "from tests.conftest import COMBINATIONS",
    "from tests.web.conftest import served",
    "import tests.reliability.conftest",
    "import tests.unit.test_spawner as spawner_tests",
    "from tests.unit.test_spawner import Rig",
    "from tests.unit import test_spawner",
    "from . import conftest",
    "from .conftest import TIMEOUT",
    "from .test_patterns import TIMEOUT",
    "def f(): from tests.integration.test_cli import ok",
])
def test_the_check_catches(source):
    assert forbidden_imports(source)


@pytest.mark.parametrize("source", [
    "from tests.harness import wait_for",
    "from tests.web.helpers import served",
    "from tests.unit.helpers import Rig",
    "import pytest",
    "from celery_spawn.store import schema as s",
    "from . import helpers",
])
def test_the_check_lets_helpers_through(source):
    assert forbidden_imports(source) == []
