"""Per-app settings: named defaults, then ``app.conf`` (``spawn_*``), then ``CELERY_SPAWN_*``, then install() args."""
from __future__ import annotations

import dataclasses
import math
from datetime import timedelta

import pytest
from celery import Celery
from celery.exceptions import ImproperlyConfigured

from celery_spawn import get_state, install
from celery_spawn.config import (DEFAULT_MAX_PAYLOAD_BYTES, DEFAULT_MAX_PAYLOAD_DEPTH, DEFAULT_MAX_SPAWN_COUNT,
                                 HARD_MAX_PAYLOAD_BYTES, HARD_MAX_PAYLOAD_DEPTH, HARD_MAX_SPAWN_COUNT)
from celery_spawn.settings import DEFAULT_DATABASE_URL, SpawnSettings, parse_duration

SETTING_NAMES = {"database_url", "max_spawn_count_ceiling", "default_max_spawn_count", "max_payload_depth",
                 "max_payload_bytes", "recovery_interval", "schedule_interval", "recovery_grace",
                 "redeliver_after", "redeliver_limit", "connect_timeout", "statement_timeout", "lock_timeout",
                 "auto_migrate", "track_states", "track_started", "batch_tracking", "synchronous_commit",
                 "prepared_statements", "expires", "add_to_parent", "api_token", "engine_options",
                 "database_alias", "django_migrate", "metrics_port"}


def make_app(**conf) -> Celery:
    app = Celery("settings_test", broker="memory://", set_as_current=False)
    app.conf.update(conf)
    return app


def test_defaults():
    settings = SpawnSettings.load({}, environ={})
    assert settings == SpawnSettings()
    assert {f.name for f in dataclasses.fields(settings)} == SETTING_NAMES
    assert settings.database_url == DEFAULT_DATABASE_URL
    assert settings.database_url.startswith("sqlite:///")
    assert settings.max_spawn_count_ceiling == HARD_MAX_SPAWN_COUNT
    assert settings.default_max_spawn_count == DEFAULT_MAX_SPAWN_COUNT
    assert settings.recovery_interval > 0 and settings.recovery_grace > 0
    assert settings.auto_migrate is True and settings.track_states is True
    assert settings.api_token is None and settings.engine_options is None
    assert settings.prepared_statements is True


def test_installed_app_without_settings_gets_the_defaults():
    app = make_app()
    assert install(app).settings == SpawnSettings()


def test_app_conf_spawn_keys_are_read(sqlite_url):
    app = make_app(spawn_database_url=sqlite_url, spawn_max_spawn_count_ceiling=50,
                   spawn_default_max_spawn_count=20, spawn_recovery_interval=0, spawn_recovery_grace=2.5,
                   spawn_auto_migrate=False, spawn_track_states=False, spawn_api_token="t0k",
                   spawn_engine_options={"pool_pre_ping": False})
    settings = install(app).settings
    assert settings == SpawnSettings(database_url=sqlite_url, max_spawn_count_ceiling=50,
                                     default_max_spawn_count=20, recovery_interval=0.0, recovery_grace=2.5,
                                     auto_migrate=False, track_states=False, api_token="t0k",
                                     engine_options={"pool_pre_ping": False})


def test_environment_overrides_app_conf(monkeypatch, tmp_path):
    env_url = f"sqlite:///{tmp_path / 'env.sqlite3'}"
    monkeypatch.setenv("CELERY_SPAWN_DATABASE_URL", env_url)
    monkeypatch.setenv("CELERY_SPAWN_DEFAULT_MAX_SPAWN_COUNT", "7")
    monkeypatch.setenv("CELERY_SPAWN_RECOVERY_GRACE", "1.5")
    monkeypatch.setenv("CELERY_SPAWN_AUTO_MIGRATE", "no")
    monkeypatch.setenv("CELERY_SPAWN_TRACK_STATES", "off")
    app = make_app(spawn_database_url="sqlite:///conf.sqlite3", spawn_default_max_spawn_count=70,
                   spawn_recovery_grace=9, spawn_auto_migrate=True, spawn_recovery_interval=4)
    settings = install(app).settings
    assert settings.database_url == env_url
    assert settings.default_max_spawn_count == 7
    assert settings.recovery_grace == 1.5
    assert settings.auto_migrate is False
    assert settings.track_states is False
    assert settings.recovery_interval == 4.0  # not in the environment: app.conf stands


def test_explicit_install_arguments_override_conf_and_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("CELERY_SPAWN_DATABASE_URL", "sqlite:///env.sqlite3")
    monkeypatch.setenv("CELERY_SPAWN_RECOVERY_GRACE", "1.5")
    explicit_url = f"sqlite:///{tmp_path / 'explicit.sqlite3'}"
    app = make_app(spawn_database_url="sqlite:///conf.sqlite3", spawn_recovery_grace=9)
    settings = install(app, database_url=explicit_url, recovery_grace=3).settings
    assert settings.database_url == explicit_url
    assert settings.recovery_grace == 3.0


def test_an_empty_environment_variable_does_not_override(monkeypatch):
    monkeypatch.setenv("CELERY_SPAWN_RECOVERY_GRACE", "")
    assert SpawnSettings.load({"spawn_recovery_grace": 4}).recovery_grace == 4.0


def test_explicit_none_means_not_given():
    app = make_app(spawn_recovery_grace=4)
    assert install(app, recovery_grace=None).settings.recovery_grace == 4.0


@pytest.mark.parametrize("text, expected", [
    ("1", True), ("true", True), ("TRUE", True), ("yes", True), (" on ", True),
    ("0", False), ("false", False), ("No", False), ("off", False),
])
def test_boolean_environment_values(text, expected):
    assert SpawnSettings.load({}, environ={"CELERY_SPAWN_AUTO_MIGRATE": text}).auto_migrate is expected


def test_settings_belong_to_each_app(tmp_path):
    first = make_app(spawn_database_url=f"sqlite:///{tmp_path / 'a.sqlite3'}", spawn_recovery_grace=1)
    second = make_app(spawn_database_url=f"sqlite:///{tmp_path / 'b.sqlite3'}", spawn_recovery_grace=2)
    install(first)
    install(second)
    assert get_state(first).settings.recovery_grace == 1.0
    assert get_state(second).settings.recovery_grace == 2.0
    assert get_state(first).settings.database_url != get_state(second).settings.database_url


def test_reinstall_reloads_settings_and_keeps_earlier_explicit_ones(tmp_path):
    app = make_app(spawn_recovery_grace=9)
    url = f"sqlite:///{tmp_path / 'x.sqlite3'}"
    install(app, database_url=url)
    app.conf.spawn_recovery_grace = 5
    state = install(app, recovery_interval=2)
    assert state.settings.database_url == url
    assert state.settings.recovery_interval == 2.0
    assert state.settings.recovery_grace == 5.0


def test_changing_the_database_url_on_reinstall_switches_the_store(tmp_path):
    app = make_app()
    first = install(app, database_url=f"sqlite:///{tmp_path / 'one.sqlite3'}")
    store = first.store
    second = install(app, database_url=f"sqlite:///{tmp_path / 'two.sqlite3'}")
    assert second.store is not store
    assert "two.sqlite3" in second.store.safe_url


# ---- invalid values -----------------------------------------------------------------------------
INVALID_CONF = [
    ("max_spawn_count_ceiling", -1), ("max_spawn_count_ceiling", "many"), ("max_spawn_count_ceiling", "1.5"),
    ("default_max_spawn_count", -3), ("default_max_spawn_count", "x"), ("default_max_spawn_count", [1]),
    ("recovery_interval", -1), ("recovery_interval", "soon"), ("recovery_interval", {}),
    ("recovery_grace", -0.5), ("recovery_grace", "later"),
    ("auto_migrate", "maybe"), ("track_states", "2"),
    ("engine_options", "pool_size=3"), ("engine_options", [("pool_size", 3)]),
    ("api_token", 123), ("recovery_interval", 10 ** 9), ("max_spawn_count_ceiling", HARD_MAX_SPAWN_COUNT + 1),
    ("metrics_port", -1), ("metrics_port", 65536), ("metrics_port", "http"), ("metrics_port", True),
]


@pytest.mark.parametrize("name, value", INVALID_CONF)
def test_invalid_app_conf_values_raise_improperly_configured(name, value):
    with pytest.raises(ImproperlyConfigured) as raised:
        install(make_app(**{f"spawn_{name}": value}))
    assert f"spawn_{name}" in str(raised.value)


@pytest.mark.parametrize("name, text", [
    ("max_spawn_count_ceiling", "-1"), ("max_spawn_count_ceiling", "ten"), ("default_max_spawn_count", "1e3"),
    ("recovery_interval", "-2"), ("recovery_grace", "abc"), ("auto_migrate", "maybe"), ("track_states", "yes please"),
    ("recovery_grace", "nan"), ("engine_options", "{not json"), ("engine_options", "[1, 2]"),
    ("database_url", "not a url"), ("metrics_port", "9808x"), ("metrics_port", "70000"),
])
def test_invalid_environment_values_raise_improperly_configured(monkeypatch, name, text):
    monkeypatch.setenv(f"CELERY_SPAWN_{name.upper()}", text)
    with pytest.raises(ImproperlyConfigured) as raised:
        install(make_app())
    assert f"CELERY_SPAWN_{name.upper()}" in str(raised.value)


@pytest.mark.parametrize("name, value", [("recovery_grace", -1), ("default_max_spawn_count", "lots"),
                                         ("auto_migrate", "perhaps")])
def test_invalid_explicit_values_raise_improperly_configured(name, value):
    with pytest.raises(ImproperlyConfigured, match=name):
        install(make_app(), **{name: value})


def test_unknown_explicit_setting_is_refused():
    with pytest.raises(ImproperlyConfigured, match="databse_url"):
        install(make_app(), databse_url="sqlite://")


@pytest.mark.parametrize("name, value", [
    ("recovery_interval", True), ("recovery_grace", False), ("default_max_spawn_count", 2.7),
    ("max_spawn_count_ceiling", True), ("recovery_grace", math.nan), ("recovery_grace", math.inf),
    ("recovery_interval", math.nan), ("default_max_spawn_count", 10 ** 12), ("auto_migrate", []),
    ("track_states", 5),
])
def test_mistyped_and_absurd_conf_values_raise_improperly_configured(name, value):
    with pytest.raises(ImproperlyConfigured, match=f"spawn_{name}"):
        install(make_app(**{f"spawn_{name}": value}))


@pytest.mark.parametrize("value", ["", 12, "not a url"])
def test_invalid_database_url_raises_improperly_configured(value):
    with pytest.raises(ImproperlyConfigured, match="spawn_database_url"):
        install(make_app(spawn_database_url=value))


def test_engine_options_can_come_from_the_environment():
    settings = SpawnSettings.load({}, environ={"CELERY_SPAWN_ENGINE_OPTIONS": '{"pool_pre_ping": false}'})
    assert settings.engine_options == {"pool_pre_ping": False}


def test_speed_settings_reach_the_engine(store_url):
    """spawn_synchronous_commit=False turns off PostgreSQL's commit flush for the store's sessions only."""
    import sqlalchemy as sa

    app = make_app(spawn_database_url=store_url, spawn_synchronous_commit=False, spawn_track_started="off")
    state = install(app)
    assert state.settings.synchronous_commit is False and state.settings.track_started is False
    if state.store.backend == "postgresql":
        with state.store.read() as conn:
            assert conn.execute(sa.text("SHOW synchronous_commit")).scalar() == "off"
    state.store.dispose()


def test_prepared_statements_can_be_turned_off_from_the_environment():
    settings = SpawnSettings.load({}, environ={"CELERY_SPAWN_PREPARED_STATEMENTS": "off"})
    assert settings.prepared_statements is False


def test_payload_limits_default_well_below_where_celery_breaks():
    settings = SpawnSettings()
    assert settings.max_payload_depth == DEFAULT_MAX_PAYLOAD_DEPTH == 64
    assert settings.max_payload_bytes == DEFAULT_MAX_PAYLOAD_BYTES == 1 << 20
    assert DEFAULT_MAX_PAYLOAD_DEPTH < HARD_MAX_PAYLOAD_DEPTH < 480  # the prefork pool fails to pickle ~480


def test_payload_limits_are_read_from_conf_and_environment(monkeypatch):
    settings = install(make_app(spawn_max_payload_depth=20, spawn_max_payload_bytes=4096)).settings
    assert (settings.max_payload_depth, settings.max_payload_bytes) == (20, 4096)
    monkeypatch.setenv("CELERY_SPAWN_MAX_PAYLOAD_DEPTH", "32")
    monkeypatch.setenv("CELERY_SPAWN_MAX_PAYLOAD_BYTES", "65536")
    settings = install(make_app(spawn_max_payload_depth=20)).settings
    assert (settings.max_payload_depth, settings.max_payload_bytes) == (32, 65536)


@pytest.mark.parametrize("name, value", [
    ("max_payload_depth", 0), ("max_payload_depth", -1),
    ("max_payload_depth", HARD_MAX_PAYLOAD_DEPTH + 1), ("max_payload_depth", 480), ("max_payload_depth", 5000),
    ("max_payload_depth", True), ("max_payload_depth", 64.5), ("max_payload_depth", "deep"),
    ("max_payload_bytes", 0), ("max_payload_bytes", -1),
    ("max_payload_bytes", HARD_MAX_PAYLOAD_BYTES + 1), ("max_payload_bytes", False), ("max_payload_bytes", "1MB"),
])
def test_payload_limits_out_of_range_raise_improperly_configured(name, value):
    with pytest.raises(ImproperlyConfigured, match=f"spawn_{name}"):
        install(make_app(**{f"spawn_{name}": value}))


@pytest.mark.parametrize("name, text", [("max_payload_depth", "1000"), ("max_payload_bytes", "lots")])
def test_payload_limits_out_of_range_in_the_environment(monkeypatch, name, text):
    monkeypatch.setenv(f"CELERY_SPAWN_{name.upper()}", text)
    with pytest.raises(ImproperlyConfigured, match=f"CELERY_SPAWN_{name.upper()}"):
        install(make_app())


# ---- spawn_expires and durations ----------------------------------------------------------------
@pytest.mark.parametrize("text, seconds", [("30d", 30 * 86_400.0), ("12h", 43_200.0), ("90m", 5_400.0),
                                           ("45s", 45.0), ("600", 600.0), ("1.5h", 5_400.0), (" 2W ", 14 * 86_400.0)])
def test_durations_are_read(text, seconds):
    assert parse_duration(text) == seconds


@pytest.mark.parametrize("bad", ["soon", "-1d", "1y", "nan", "", "1 d 2h", True, None, float("inf")])
def test_bad_durations_are_refused_by_name(bad):
    with pytest.raises(ValueError, match="not a duration"):
        parse_duration(bad)


def test_spawn_expires_defaults_to_30_days_and_takes_every_form():
    assert SpawnSettings.load({}, environ={}).expires == 30 * 86_400
    assert SpawnSettings.load({"spawn_expires": timedelta(hours=6)}, environ={}).expires == 6 * 3600
    assert SpawnSettings.load({"spawn_expires": 0}, environ={}).expires == 0
    assert SpawnSettings.load({"spawn_expires": None}, environ={}).expires == 0  # as result_expires = None
    assert SpawnSettings.load({}, environ={"CELERY_SPAWN_EXPIRES": "7d"}).expires == 7 * 86_400
    assert SpawnSettings.load({}, environ={"CELERY_SPAWN_EXPIRES": "never"}).expires == 0
    with pytest.raises(ImproperlyConfigured, match="spawn_expires"):
        SpawnSettings.load({"spawn_expires": "a month"}, environ={})


def test_metrics_port_is_off_by_default_and_read_from_the_environment(monkeypatch):
    assert SpawnSettings.load({}, environ={}).metrics_port == 0
    assert SpawnSettings.load({"spawn_metrics_port": 9808}, environ={}).metrics_port == 9808
    assert SpawnSettings.load({}, environ={"CELERY_SPAWN_METRICS_PORT": " 9809 "}).metrics_port == 9809
