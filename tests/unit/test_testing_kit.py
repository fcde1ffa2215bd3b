"""The testing kit (``celery_spawn.contrib.pytest`` and ``.testing``), seen from a user's test project.

Each test writes a small project that enables the plugin with ``pytest_plugins``
and uses only its public fixtures and helpers, then runs pytest on it in a
subprocess (``pytester``).
"""
from __future__ import annotations

import pytest

CONFTEST = '''
pytest_plugins = ["celery.contrib.pytest", "celery_spawn.contrib.pytest"]
'''

TASKS = '''
import pytest

from celery_spawn import SpawnTask, get_state


@pytest.fixture
def tasks(spawn_app):
    @spawn_app.task(name="shop.resize")
    def resize(size):
        if size < 0:
            raise ValueError("no negative sizes")
        return size

    @spawn_app.task(name="shop.album", base=SpawnTask)
    def album(sizes):
        return sizes

    @get_state(spawn_app).manager.handler("sizes")
    def sizes(context):
        return [resize.s(size) for size in context.parent.result]

    return album, resize
'''


@pytest.fixture
def project(pytester, monkeypatch):
    """A test project with the plugin enabled and a spawning task; on a SQLite file per test unless told."""
    monkeypatch.delenv("CELERY_SPAWN_TEST_DATABASE_URL", raising=False)
    pytester.makeconftest(CONFTEST + TASKS)
    return pytester


def test_an_eager_spawn_and_its_tree(project):
    project.makepyfile('''
        from celery_spawn.contrib.testing import assert_tree, run_spawn_eagerly

        def test_album(tasks, spawn_app):
            album, _ = tasks
            result = run_spawn_eagerly(album, [1, 2], _spawn_config={"handler": "sizes"})
            assert result.get() == [1, 2]
            assert_tree(spawn_app, result.id, {"task": "shop.album", "state": "succeeded", "children": [
                {"task": "shop.resize", "state": "succeeded"}, "shop.resize"]})

        def test_a_failed_child(tasks, spawn_store):
            album, _ = tasks
            result = run_spawn_eagerly(album, [-1], _spawn_config={"handler": "sizes"})
            assert_tree(spawn_store, result.id, {"task": "shop.album", "children": [
                {"task": "shop.resize", "state": "failed"}]})
    ''')
    project.runpytest_subprocess("-p", "no:cacheprovider").assert_outcomes(passed=2)


def test_a_spawn_on_a_real_worker(project):
    project.makepyfile('''
        from celery_spawn.contrib.testing import assert_tree, spawn_and_wait

        def test_album(spawn_app, tasks, celery_worker):
            album, _ = tasks
            celery_worker.reload()
            result = spawn_and_wait(album, [1, 2, 3], _spawn_config={"handler": "sizes"}, timeout=30)
            assert_tree(spawn_app, result.id, {"task": "shop.album", "state": "succeeded",
                                               "children": [{"task": "shop.resize", "state": "succeeded"}] * 3})
    ''')
    project.runpytest_subprocess("-p", "no:cacheprovider").assert_outcomes(passed=1)


def test_a_wrong_tree_fails_with_a_diff(project):
    project.makepyfile('''
        from celery_spawn.contrib.testing import assert_tree, run_spawn_eagerly

        def test_album(tasks, spawn_app):
            album, _ = tasks
            result = run_spawn_eagerly(album, [1, 2], _spawn_config={"handler": "sizes"})
            assert_tree(spawn_app, result.id, {"task": "shop.album", "children": [
                {"task": "shop.resize", "state": "failed"}]})
    ''')
    outcome = project.runpytest_subprocess("-p", "no:cacheprovider")
    outcome.assert_outcomes(failed=1)
    outcome.stdout.fnmatch_lines(["*differs from the expected one*", "*-   shop.resize failed",
                                  "*+   shop.resize succeeded", "*+   shop.resize succeeded"])


def test_every_test_gets_a_fresh_store(project):
    project.makepyfile('''
        import pytest
        from celery_spawn.contrib.testing import run_spawn_eagerly, spawn_tree

        SEEN = []

        @pytest.mark.parametrize("run", [1, 2])
        def test_album(tasks, spawn_store, spawn_store_url, run):
            assert spawn_store_url.endswith("spawn.sqlite3") and spawn_store_url not in SEEN
            SEEN.append(spawn_store_url)
            album, _ = tasks
            result = run_spawn_eagerly(album, [run], _spawn_config={"handler": "sizes"})
            assert len(spawn_tree(spawn_store, result.id)["children"]) == 1
    ''')
    project.runpytest_subprocess("-p", "no:cacheprovider").assert_outcomes(passed=2)


def test_a_handler_alone_with_a_fake_context(project):
    project.makepyfile('''
        from celery import Celery
        from celery_spawn.contrib.testing import fake_context

        app = Celery("shop", set_as_current=False)

        @app.task(name="shop.resize")
        def resize(size):
            return size

        @app.task(name="shop.album")
        def album(album_id, sizes=(1, 2)):
            return list(sizes)

        def per_size(context):
            return [resize.s(size, album=context.parent.arguments["album_id"]) for size in context.parent.result]

        def test_per_size():
            context = fake_context([1, 2], args=("a7",), task=album)
            children = per_size(context)
            assert [child.kwargs for child in children] == [{"album": "a7"}, {"album": "a7"}]
            assert context.parent.arguments == {"album_id": "a7", "sizes": (1, 2)}
    ''')
    project.runpytest_subprocess("-p", "no:cacheprovider").assert_outcomes(passed=1)


@pytest.mark.parametrize("url", ["sqlite://", "sqlite:///:memory:"])
def test_in_memory_sqlite_is_refused(project, url):
    project.makepyfile("def test_nothing(spawn_store):\n    pass\n")
    outcome = project.runpytest_subprocess("-p", "no:cacheprovider", f"--spawn-store-url={url}")
    assert outcome.ret == pytest.ExitCode.USAGE_ERROR
    outcome.stderr.fnmatch_lines(["*cannot be in-memory SQLite*"])


def test_the_environment_names_the_store(project, monkeypatch, tmp_path):
    url = f"sqlite:///{tmp_path / 'shared.sqlite3'}"
    monkeypatch.setenv("CELERY_SPAWN_TEST_DATABASE_URL", url)
    project.makepyfile(f'''
        from celery_spawn.contrib.testing import run_spawn_eagerly

        def test_first(tasks, spawn_store_url):
            assert spawn_store_url == {url!r}
            run_spawn_eagerly(tasks[0], [1], _spawn_config={{"handler": "sizes"}})

        def test_second_starts_empty(spawn_store):
            with spawn_store.read() as conn:
                from celery_spawn.store import queries
                assert queries.list_operations(conn) == []
    ''')
    project.runpytest_subprocess("-p", "no:cacheprovider").assert_outcomes(passed=2)


def test_a_project_s_own_handlers_and_shared_tasks(pytester, monkeypatch):
    monkeypatch.delenv("CELERY_SPAWN_TEST_DATABASE_URL", raising=False)
    pytester.makepyfile(shop='''
        from celery import shared_task
        from celery_spawn import SpawnManager, SpawnTask

        handlers = SpawnManager()

        @shared_task(name="shop.copy")
        def copy(n):
            return n

        @shared_task(name="shop.batch", base=SpawnTask)
        def batch(n):
            return n

        @handlers.handler("copies")
        def copies(context):
            return [copy.s(i) for i in range(context.parent.result)]
    ''')
    pytester.makeconftest('''
        import pytest
        import shop

        pytest_plugins = ["celery.contrib.pytest", "celery_spawn.contrib.pytest"]

        @pytest.fixture
        def spawn_manager():
            return shop.handlers
    ''')
    pytester.makepyfile(test_shop='''
        import shop
        from celery_spawn.contrib.testing import assert_tree, run_spawn_eagerly

        def test_batch(spawn_app):
            result = run_spawn_eagerly(shop.batch, 2, _spawn_config={"handler": "copies"})
            assert_tree(spawn_app, result.id, {"task": "shop.batch", "children": ["shop.copy", "shop.copy"]})
    ''')
    pytester.syspathinsert()
    pytester.runpytest_subprocess("-p", "no:cacheprovider").assert_outcomes(passed=1)


def test_the_option_names_the_store_and_wins_over_the_environment(project, monkeypatch, tmp_path):
    monkeypatch.setenv("CELERY_SPAWN_TEST_DATABASE_URL", f"sqlite:///{tmp_path / 'from-env.sqlite3'}")
    url = f"sqlite:///{tmp_path / 'from-option.sqlite3'}"
    project.makepyfile(f'''
        from celery_spawn.contrib.pytest import assert_tree, run_spawn_eagerly

        def test_album(tasks, spawn_app, spawn_store_url):
            assert spawn_store_url == {url!r}
            result = run_spawn_eagerly(tasks[0], [3], _spawn_config={{"handler": "sizes"}})
            assert_tree(spawn_app, result.id, {{"task": "shop.album", "children": ["shop.resize"]}})
    ''')
    project.runpytest_subprocess("-p", "no:cacheprovider", f"--spawn-store-url={url}").assert_outcomes(passed=1)
    assert (tmp_path / "from-option.sqlite3").exists() and not (tmp_path / "from-env.sqlite3").exists()


def test_a_database_named_for_the_tests_is_emptied_before_each_one(project, store_url):
    """On every SQL backend: the store a URL names starts each test with no spawn recorded."""
    project.makepyfile('''
        from celery_spawn.contrib.testing import assert_tree, run_spawn_eagerly
        from celery_spawn.store import queries

        def test_first(tasks, spawn_app):
            result = run_spawn_eagerly(tasks[0], [1, 2], _spawn_config={"handler": "sizes"})
            assert_tree(spawn_app, result.id, {"task": "shop.album", "state": "succeeded",
                                               "children": [{"task": "shop.resize", "state": "succeeded"}] * 2})

        def test_second_starts_empty(spawn_store):
            with spawn_store.read() as conn:
                assert queries.list_operations(conn) == []
    ''')
    project.runpytest_subprocess("-p", "no:cacheprovider", f"--spawn-store-url={store_url}").assert_outcomes(passed=2)


def test_an_eager_run_after_a_worker_test_is_recorded_at_once(project):
    """A ``celery_worker`` makes its process batch tracking events; the tests after it write synchronously again."""
    project.makepyfile('''
        from celery_spawn.contrib.testing import spawn_and_wait, spawn_tree

        def test_on_a_worker(spawn_app, tasks, celery_worker):
            celery_worker.reload()
            spawn_and_wait(tasks[0], [1], _spawn_config={"handler": "sizes"})

        def test_then_a_plain_eager_apply(tasks, spawn_app):
            spawn_app.conf.task_always_eager = True
            result = tasks[0].apply(args=([1, 2],), kwargs={"_spawn_config": {"handler": "sizes"}})
            tree = spawn_tree(spawn_app, result.id)
            assert [child["state"] for child in tree["children"]] == ["succeeded", "succeeded"]
    ''')
    project.runpytest_subprocess("-p", "no:cacheprovider").assert_outcomes(passed=2)
