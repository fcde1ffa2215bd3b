"""The built package, not the checkout: what ``pip install celery-spawn`` would get.

The tests run against an editable install, which reads every file from the
checkout; a file the wheel leaves out (the Alembic revisions are not a Python
package) only shows in a real build. ``python -m build`` makes the sdist from a
copy of the tracked files and the wheel from that sdist, with the build backend
this venv already has; ``twine check`` reads what an index would show.
"""
from __future__ import annotations

import email
import os
import shutil
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

import pytest

import celery_spawn
from tests.harness import ROOT

#: Files the package cannot work without, beside its modules.
DATA_FILES = (
    "LICENSE",
    "celery_spawn/py.typed",
    "celery_spawn/store/migrations/env.py",
    "celery_spawn/store/migrations/script.py.mako",
    "celery_spawn/store/migrations/versions/0001_initial.py",
    "celery_spawn/store/migrations/versions/0002_labels_and_schedules.py",
    "celery_spawn/store/migrations/versions/0004_task_rollups.py",
    "celery_spawn/web/static/index.html",
    # the Django app: its template, migrations and management command
    "celery_spawn/contrib/django/templates/admin/celery_spawn/job/tree.html",
    "celery_spawn/contrib/django/migrations/0001_initial.py",
    "celery_spawn/contrib/django/management/commands/spawn.py",
)


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> dict[str, Path]:
    source = tmp_path_factory.mktemp("source")
    tracked = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, check=True, capture_output=True).stdout
    for name in filter(None, tracked.decode().split("\0")):
        if (ROOT / name).is_file():
            (source / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / name, source / name)
    out = tmp_path_factory.mktemp("dist")
    result = subprocess.run([sys.executable, "-m", "build", "--no-isolation", "--outdir", str(out), str(source)],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    [wheel] = out.glob("*.whl")
    [sdist] = out.glob("*.tar.gz")
    return {"wheel": wheel, "sdist": sdist}


def _in_wheel(name: str) -> str:
    """Where a file of the checkout lands in the wheel (the licence goes with the metadata)."""
    return name if name.startswith("celery_spawn/") else f"celery_spawn-{celery_spawn.__version__}.dist-info/{name}"


def test_the_wheel_carries_the_licence_the_migrations_and_the_dashboard(built):
    names = zipfile.ZipFile(built["wheel"]).namelist()
    missing = [name for name in DATA_FILES
               if _in_wheel(name) not in names and not any(n.endswith(f".dist-info/licenses/{name}") for n in names)]
    assert not missing, f"the wheel lacks {missing}"
    assert not any(name.startswith(("tests/", "benchmarks/")) for name in names)


def test_the_wheel_carries_the_testing_kit(built):
    names = set(zipfile.ZipFile(built["wheel"]).namelist())
    kit = {"celery_spawn/contrib/__init__.py", "celery_spawn/contrib/pytest.py", "celery_spawn/contrib/testing.py"}
    assert kit <= names, f"the wheel lacks {sorted(kit - names)}"


def test_the_sdist_carries_them_too(built):
    with tarfile.open(built["sdist"]) as sdist:
        names = {name.split("/", 1)[1] for name in sdist.getnames() if "/" in name}
    missing = [name for name in DATA_FILES if name not in names]
    assert not missing, f"the sdist lacks {missing}"


def test_twine_finds_the_artifacts_fit_to_upload(built):
    result = subprocess.run([sys.executable, "-m", "twine", "check", "--strict", str(built["wheel"]),
                             str(built["sdist"])], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.count("PASSED") == 2, result.stdout


def test_the_metadata_names_the_licence_the_project_and_its_typing(built):
    with zipfile.ZipFile(built["wheel"]) as wheel:
        [name] = [n for n in wheel.namelist() if n.endswith(".dist-info/METADATA")]
        metadata = email.message_from_bytes(wheel.read(name))
    assert "BSD-3-Clause" in (metadata.get("License-Expression") or metadata.get("License") or "")
    assert metadata["Author"] == "celery-spawn contributors"
    classifiers = metadata.get_all("Classifier")
    assert "Typing :: Typed" in classifiers
    assert "Programming Language :: Python :: 3.13" in classifiers
    urls = dict(url.split(", ", 1) for url in metadata.get_all("Project-URL"))
    assert {"Documentation", "Source", "Issues", "Changelog"} <= set(urls), urls


def test_the_installed_wheel_creates_its_store(built, tmp_path):
    """Installed from the wheel (its dependencies from this venv), a store gets its tables on first use."""
    target = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-index",
                    "--target", str(target), str(built["wheel"])], check=True, capture_output=True, timeout=300)
    check = tmp_path / "check.py"
    check.write_text(
        "import sys\n"
        "sys.path.insert(0, sys.argv[1])  # the wheel's copy first\n"
        "import celery_spawn, sqlalchemy as sa\n"
        "from celery_spawn.store import SpawnStore\n"
        "assert celery_spawn.__file__.startswith(sys.argv[1]), celery_spawn.__file__\n"
        "store = SpawnStore('sqlite:///' + sys.argv[2])\n"
        "store.migrate()\n"
        "print(sorted(sa.inspect(store.engine).get_table_names()))\n"
    )
    # -I: no user site, no PYTHONPATH, no working directory on the path.
    result = subprocess.run([sys.executable, "-I", str(check), str(target), str(tmp_path / "s.sqlite3")],
                            cwd=tmp_path, capture_output=True, text=True, timeout=120,
                            env={k: v for k, v in os.environ.items() if not k.startswith("CELERY_SPAWN_")})
    assert result.returncode == 0, result.stderr
    assert "spawn_jobs" in result.stdout and "spawn_operations" in result.stdout, result.stdout


def test_an_install_without_revisions_says_so(monkeypatch, tmp_path):
    from celery_spawn.store import migrations

    empty = tmp_path / "migrations"
    (empty / "versions").mkdir(parents=True)
    shutil.copy2(Path(migrations.__file__).with_name("env.py"), empty / "env.py")
    shutil.copy2(Path(migrations.__file__).with_name("script.py.mako"), empty / "script.py.mako")
    monkeypatch.setattr(migrations, "HERE", empty)
    with pytest.raises(RuntimeError, match="installed without its migrations"):
        migrations.head_revision()
