"""Redis Sentinel settings: the data Redis (REDIS_SENTINELS) and a sentinel:// broker."""

import pytest

from worker.celery_config import build_config
from worker.connections import RedisTarget
from worker.errors import ConfigError
from worker.settings import Settings, redact_url, secrets_of

SENTINELS = {
    "REDIS_SENTINELS": "s1.example:26379, s2.example:26380,[::1]:26381",
    "REDIS_SENTINEL_MASTER": "dnd-data",
}
BROKER = "sentinel://:brokerpw@s1.example:26379/1;sentinel://:brokerpw@s2.example:26380/1"


def config_error(env):
    with pytest.raises(ConfigError) as info:
        Settings.from_env(env)
    return str(info.value)


def test_without_sentinels_the_data_redis_is_redis_url():
    settings = Settings.from_env({})
    assert settings.redis_sentinels == ()
    assert RedisTarget.of(settings).label == "redis://localhost:6379/0"


def test_sentinels_are_parsed_in_order():
    settings = Settings.from_env(SENTINELS)
    assert settings.redis_sentinels == (
        ("s1.example", 26379),
        ("s2.example", 26380),
        ("::1", 26381),
    )
    assert settings.redis_sentinel_master == "dnd-data"
    # The broker's master defaults to the data Redis's.
    assert settings.celery_sentinel_master == "dnd-data"


@pytest.mark.parametrize(
    ("env", "text"),
    [
        ({"REDIS_SENTINELS": "s1:26379"}, "REDIS_SENTINELS needs REDIS_SENTINEL_MASTER"),
        ({"REDIS_SENTINEL_MASTER": "m"}, "REDIS_SENTINEL_MASTER needs REDIS_SENTINELS"),
        ({**SENTINELS, "REDIS_SENTINELS": "s1"}, "REDIS_SENTINELS: each entry must be host:port"),
        ({**SENTINELS, "REDIS_SENTINELS": "s1:0"}, "REDIS_SENTINELS: each entry must be host:port"),
        ({**SENTINELS, "REDIS_SENTINEL_MASTER": "a b"}, "REDIS_SENTINEL_MASTER may hold only"),
        ({**SENTINELS, "REDIS_URL": "unix:///tmp/r.sock"}, "must start with redis:// or rediss://"),
        ({"CELERY_BROKER_URL": BROKER}, "set CELERY_SENTINEL_MASTER"),
        (
            {"CELERY_BROKER_URL": "sentinel://s1:26379;redis://s2:6379", **SENTINELS},
            "CELERY_BROKER_URL: list sentinels as sentinel://host:port;sentinel://host:port",
        ),
    ],
)
def test_bad_sentinel_settings_are_refused_in_one_line(env, text):
    message = config_error(env)
    assert text in message
    assert "\n" not in message
    assert "brokerpw" not in message


def test_a_sentinel_broker_and_backend_get_the_master_name_and_sentinel_password():
    settings = Settings.from_env(
        {
            "CELERY_BROKER_URL": BROKER,
            "CELERY_RESULT_BACKEND": BROKER.replace("/1", "/2"),
            "CELERY_SENTINEL_MASTER": "dnd-celery",
            "REDIS_SENTINEL_PASSWORD": "sentinelpw",
            "CELERY_KEY_PREFIX": "p:",
        }
    )
    config = build_config(settings)
    expected = {"master_name": "dnd-celery", "sentinel_kwargs": {"password": "sentinelpw"}}
    assert config["broker_transport_options"].items() >= expected.items()
    assert config["result_backend_transport_options"] == {"global_keyprefix": "p:", **expected}
    # The other options stay (visibility timeout: the tasks of a dead worker).
    assert config["broker_transport_options"]["visibility_timeout"] == 1800


def test_a_redis_broker_gets_no_sentinel_options():
    config = build_config(Settings.from_env(SENTINELS))
    assert "master_name" not in config["broker_transport_options"]
    assert config["result_backend_transport_options"] == {}


def test_passwords_of_sentinel_settings_never_show():
    settings = Settings.from_env(
        {
            **SENTINELS,
            "REDIS_URL": "redis://:datapw@ignored:6379/3",
            "REDIS_SENTINEL_PASSWORD": "sentinelpw",
            "CELERY_BROKER_URL": BROKER,
        }
    )
    assert redact_url(BROKER) == (
        "sentinel://:***@s1.example:26379/1;sentinel://:***@s2.example:26380/1"
    )
    assert {"datapw", "sentinelpw", "brokerpw"} <= set(secrets_of(settings))
    shown = repr(settings) + RedisTarget.of(settings).label
    for secret in ("datapw", "sentinelpw", "brokerpw"):
        assert secret not in shown
    assert "s1.example:26379,s2.example:26380,::1:26381" in RedisTarget.of(settings).label


def test_cluster_and_sentinels_are_refused_together():
    with pytest.raises(ConfigError, match="REDIS_CLUSTER and REDIS_SENTINELS"):
        Settings.from_env(
            {
                "REDIS_CLUSTER": "1",
                "REDIS_SENTINELS": "127.0.0.1:26379",
                "REDIS_SENTINEL_MASTER": "dnd-data",
            }
        )
