"""worker.settings: Settings.from_env, redact_url, secrets_of."""

import dataclasses
from urllib.parse import urlsplit

import pytest
from psycopg.conninfo import conninfo_to_dict

from worker.errors import ConfigError
from worker.settings import Settings, redact_url, secrets_of

DEFAULT_DATABASE_URL = "postgresql://dnd:password@localhost:5432/dnd_client?sslmode=disable"
POSTGRES_SETTING = "POSTGRES_HOST/POSTGRES_USER/POSTGRES_PASSWORD/POSTGRES_DBNAME"


def config_error(env):
    with pytest.raises(ConfigError) as info:
        Settings.from_env(env)
    return str(info.value)


# -- defaults ---------------------------------------------------------------------


def test_contract_defaults_with_an_empty_environment():
    settings = Settings.from_env({})
    assert settings.redis_url == "redis://localhost:6379/0"
    assert settings.redis_key_prefix == "dnd:"
    assert settings.database_url == DEFAULT_DATABASE_URL
    assert settings.database_url_setting == POSTGRES_SETTING
    assert settings.backup_schedule == "0 * * * *"


def test_from_env_defaults_are_the_dataclass_defaults():
    from_env = Settings.from_env({})
    built = dataclasses.replace(
        Settings(), database_url=DEFAULT_DATABASE_URL, database_url_setting=POSTGRES_SETTING
    )
    assert from_env == built


def test_celery_defaults_keep_away_from_the_application_data():
    settings = Settings.from_env({})
    data_db = urlsplit(settings.redis_url).path
    assert urlsplit(settings.broker_url).path != data_db
    assert urlsplit(settings.result_backend).path != data_db


def test_empty_variables_mean_the_default():
    env = {
        "REDIS_URL": "",
        "CELERY_BROKER_URL": "  ",
        "BACKUP_SHARDS": "",
        "BACKUP_BATCH_SESSIONS": " ",
        "DATABASE_URL": "   ",
    }
    settings = Settings.from_env(env)
    defaults = Settings.from_env({})
    assert settings == defaults


def test_from_env_without_a_mapping_reads_os_environ(monkeypatch):
    monkeypatch.setenv("REDIS_KEY_PREFIX", "from-os-environ:")
    monkeypatch.setenv("BACKUP_SHARDS", "3")
    monkeypatch.setenv("DATABASE_URL", "postgresql://u@h/db")
    settings = Settings.from_env()
    assert settings.redis_key_prefix == "from-os-environ:"
    assert settings.backup_shards == 3


def test_settings_are_frozen():
    settings = Settings.from_env({})
    with pytest.raises(dataclasses.FrozenInstanceError):
        settings.backup_shards = 2  # type: ignore[misc]


# -- values read from the environment -------------------------------------------------


@pytest.mark.parametrize(
    ("variable", "value", "attribute", "expected"),
    [
        ("REDIS_URL", "redis://cache:6380/3", "redis_url", "redis://cache:6380/3"),
        ("REDIS_URL", "rediss://u:p@cache:6380/0", "redis_url", "rediss://u:p@cache:6380/0"),
        ("REDIS_URL", " redis://cache/0 ", "redis_url", "redis://cache/0"),
        ("REDIS_KEY_PREFIX", "chat:", "redis_key_prefix", "chat:"),
        ("REDIS_KEY_PREFIX", "", "redis_key_prefix", ""),
        (
            "CELERY_BROKER_URL",
            "amqp://guest:guest@mq:5672//",
            "broker_url",
            "amqp://guest:guest@mq:5672//",
        ),
        ("CELERY_RESULT_BACKEND", "rpc://", "result_backend", "rpc://"),
        ("BACKUP_SHARDS", "16", "backup_shards", 16),
        ("BACKUP_SHARDS", " 1 ", "backup_shards", 1),
        ("BACKUP_SHARDS", "1024", "backup_shards", 1024),
        ("BACKUP_SCHEDULE", " 30 ", "backup_schedule", "30"),
        ("BACKUP_SCHEDULE", "*/5 * * * *", "backup_schedule", "*/5 * * * *"),
        ("BACKUP_BATCH_SESSIONS", "50", "batch_sessions", 50),
        ("DATABASE_POOL_SIZE", "10", "pool_size", 10),
    ],
)
def test_from_env_reads_each_variable(variable, value, attribute, expected):
    assert getattr(Settings.from_env({variable: value}), attribute) == expected


@pytest.mark.parametrize(
    ("env", "variable"),
    [
        ({"BACKUP_SHARDS": "abc"}, "BACKUP_SHARDS"),
        ({"BACKUP_SHARDS": "0"}, "BACKUP_SHARDS"),
        ({"BACKUP_SHARDS": "-1"}, "BACKUP_SHARDS"),
        ({"BACKUP_SHARDS": "1.5"}, "BACKUP_SHARDS"),
        ({"BACKUP_SHARDS": "1025"}, "BACKUP_SHARDS"),
        ({"BACKUP_BATCH_SESSIONS": "0"}, "BACKUP_BATCH_SESSIONS"),
        ({"DATABASE_POOL_SIZE": "many"}, "DATABASE_POOL_SIZE"),
        ({"REDIS_URL": "http://x"}, "REDIS_URL"),
        ({"REDIS_URL": "localhost:6379"}, "REDIS_URL"),
        ({"REDIS_URL": "redis://[bad"}, "REDIS_URL"),
        ({"CELERY_BROKER_URL": "kafka://k:9092"}, "CELERY_BROKER_URL"),
        ({"CELERY_RESULT_BACKEND": "http://x"}, "CELERY_RESULT_BACKEND"),
        ({"DATABASE_URL": "mysql://u:p@h/db"}, "DATABASE_URL"),
        ({"DATABASE_URL": "localhost:5432"}, "DATABASE_URL"),
        ({"DATABASE_URL": "postgresql://[bad"}, "DATABASE_URL"),
        ({"REDIS_KEY_PREFIX": "dnd*"}, "REDIS_KEY_PREFIX"),
        ({"REDIS_KEY_PREFIX": "dnd :"}, "REDIS_KEY_PREFIX"),
        ({"REDIS_KEY_PREFIX": "dnd:\n"}, "REDIS_KEY_PREFIX"),
        ({"REDIS_KEY_PREFIX": "d?d:"}, "REDIS_KEY_PREFIX"),
        ({"REDIS_KEY_PREFIX": "[dnd]:"}, "REDIS_KEY_PREFIX"),
        ({"REDIS_KEY_PREFIX": "{dnd}:"}, "REDIS_KEY_PREFIX"),
        ({"POSTGRES_SSLMODE": "bogus"}, "POSTGRES_SSLMODE"),
        ({"POSTGRES_SSLMODE": ""}, "POSTGRES_SSLMODE"),
        ({"POSTGRES_HOST": "db host"}, "POSTGRES_HOST"),
        ({"POSTGRES_HOST": "db:port"}, "POSTGRES_HOST"),
        ({"POSTGRES_HOST": "db/x"}, "POSTGRES_HOST"),
        ({"POSTGRES_HOST": "u:p@db"}, "POSTGRES_HOST"),
        ({"TASK_SOFT_TIME_LIMIT": "100", "TASK_TIME_LIMIT": "100"}, "TASK_TIME_LIMIT"),
        ({"TASK_SOFT_TIME_LIMIT": "200", "TASK_TIME_LIMIT": "100"}, "TASK_TIME_LIMIT"),
    ],
)
def test_bad_values_raise_config_error_naming_the_variable(env, variable):
    assert variable in config_error(env)


def test_time_limit_error_names_both_limits():
    message = config_error({"TASK_SOFT_TIME_LIMIT": "200", "TASK_TIME_LIMIT": "100"})
    assert "TASK_SOFT_TIME_LIMIT" in message
    assert "200" in message
    assert "100" in message


def test_a_hard_limit_above_the_soft_limit_is_accepted():
    settings = Settings.from_env({"TASK_SOFT_TIME_LIMIT": "100", "TASK_TIME_LIMIT": "101"})
    assert (settings.task_soft_time_limit_s, settings.task_time_limit_s) == (100, 101)


@pytest.mark.parametrize(
    "env",
    [
        {"REDIS_URL": "http://user:hunter2@x/0"},
        {"CELERY_BROKER_URL": "kafka://user:hunter2@k:9092"},
        {"DATABASE_URL": "mysql://user:hunter2@h/db"},
    ],
)
def test_a_rejected_url_error_never_shows_its_password(env):
    assert "hunter2" not in config_error(env)


# -- CELERY_PRODUCER_QUEUES ----------------------------------------------------------------


def test_producer_queues_default_to_celerys_default_queue():
    assert Settings.from_env({}).producer_queues == ("celery",)


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("", ()),  # empty: none (not the default)
        (" , ", ()),
        ("celery", ("celery",)),
        (" go-app , celery,", ("go-app", "celery")),
        ("celery,celery", ("celery",)),
        ("t1.celery:x_y-z", ("t1.celery:x_y-z",)),
    ],
)
def test_producer_queues_are_a_comma_separated_list(value, expected):
    assert Settings.from_env({"CELERY_PRODUCER_QUEUES": value}).producer_queues == expected


@pytest.mark.parametrize("value", ["cel ery", "celery,go*", "queue/1", "amq.celery", "é"])
def test_a_bad_producer_queue_name_is_refused_naming_the_variable(value):
    message = config_error({"CELERY_PRODUCER_QUEUES": value})
    assert "CELERY_PRODUCER_QUEUES" in message


# -- DATABASE_URL and the POSTGRES_* variables -------------------------------------------


def test_database_url_wins_over_postgres_variables():
    env = {
        "DATABASE_URL": "postgresql://app:secret@db.internal:6543/chat",
        "POSTGRES_HOST": "elsewhere:5432",
        "POSTGRES_PASSWORD": "other",
    }
    settings = Settings.from_env(env)
    assert settings.database_url == "postgresql://app:secret@db.internal:6543/chat"
    assert settings.database_url_setting == "DATABASE_URL"


def test_database_url_accepts_the_postgres_scheme():
    assert Settings.from_env({"DATABASE_URL": "postgres://u@h/db"}).database_url == (
        "postgres://u@h/db"
    )


def test_database_url_is_built_from_postgres_variables():
    env = {
        "POSTGRES_HOST": "db.example:6543",
        "POSTGRES_USER": "app",
        "POSTGRES_PASSWORD": "s3cret",
        "POSTGRES_DBNAME": "chat",
        "POSTGRES_SSLMODE": "verify-full",
    }
    settings = Settings.from_env(env)
    assert (
        settings.database_url == "postgresql://app:s3cret@db.example:6543/chat?sslmode=verify-full"
    )
    assert settings.database_url_setting == POSTGRES_SETTING


@pytest.mark.parametrize("host", ["db", "db.example", "10.0.0.5:5433", "[::1]:5432", "[::1]"])
def test_postgres_host_may_be_a_name_an_address_or_ipv6(host):
    settings = Settings.from_env({"POSTGRES_HOST": host})
    assert settings.database_url.startswith(f"postgresql://dnd:password@{host}/dnd_client")


@pytest.mark.parametrize(
    "password",
    ["p@ss:w/rd", "a b", "100%", "#frag?q=1&x", "ü🐉", "back\\slash", "'quote\""],
)
def test_postgres_password_is_url_quoted(password):
    settings = Settings.from_env({"POSTGRES_PASSWORD": password, "POSTGRES_USER": "us@r"})
    # What libpq reads back is exactly what was set.
    params = conninfo_to_dict(settings.database_url)
    assert params["password"] == password
    assert params["user"] == "us@r"
    assert params["host"] == "localhost"
    assert params["port"] == "5432"
    assert params["dbname"] == "dnd_client"
    assert params["sslmode"] == "disable"


def test_postgres_special_dbname_is_quoted():
    settings = Settings.from_env({"POSTGRES_DBNAME": "my db/1"})
    assert conninfo_to_dict(settings.database_url)["dbname"] == "my db/1"


def test_empty_postgres_password_means_no_password():
    settings = Settings.from_env({"POSTGRES_PASSWORD": ""})
    assert settings.database_url == "postgresql://dnd@localhost:5432/dnd_client?sslmode=disable"
    assert "password" not in conninfo_to_dict(settings.database_url)


@pytest.mark.parametrize(
    "sslmode", ["disable", "allow", "prefer", "require", "verify-ca", "verify-full"]
)
def test_every_libpq_sslmode_is_accepted(sslmode):
    settings = Settings.from_env({"POSTGRES_SSLMODE": sslmode})
    assert conninfo_to_dict(settings.database_url)["sslmode"] == sslmode


# -- redact_url ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        (
            "postgresql://dnd:password@localhost:5432/dnd_client?sslmode=disable",
            "postgresql://dnd:***@localhost:5432/dnd_client?sslmode=disable",
        ),
        ("redis://:secret@cache:6379/0", "redis://:***@cache:6379/0"),
        ("redis://user:@cache/0", "redis://user:***@cache/0"),
        ("redis://u:secret@[::1]:6379/0", "redis://u:***@[::1]:6379/0"),
        ("redis://u:secret@[2001:db8::1]/0", "redis://u:***@[2001:db8::1]/0"),
        ("amqp://guest:guest@mq:5672//", "amqp://guest:***@mq:5672//"),
        ("postgresql://u:p%40ss%3Aw%2Frd@h/db", "postgresql://u:***@h/db"),
        ("postgresql://u:p@ss@h/db", "postgresql://u:***@h/db"),
        ("postgresql://u@h/db?password=secret", "postgresql://u@h/db?password=***"),
        (
            "postgresql://h/db?sslmode=require&password=secret&x=1",
            "postgresql://h/db?sslmode=require&password=***&x=1",
        ),
    ],
)
def test_redact_url_hides_the_password(url, expected):
    assert redact_url(url) == expected


@pytest.mark.parametrize(
    "url",
    [
        "redis://localhost:6379/0",
        "postgresql://dnd@localhost:5432/dnd_client?sslmode=disable",
        "rpc://",
        "memory://",
        "postgresql:///dnd_client?host=/var/run/postgresql",
    ],
)
def test_redact_url_leaves_a_url_without_password_alone(url):
    assert redact_url(url) == url


@pytest.mark.parametrize(
    "url",
    [
        "redis://u:hunter2@[::1",  # unclosed IPv6 bracket
        "redis://u:hunter2@host:notaport/0",
        "redis://u:hunter2@host:99999/0",
    ],
)
def test_redact_url_of_an_unparseable_url_shows_nothing_of_it(url):
    redacted = redact_url(url)
    assert "hunter2" not in redacted
    assert redacted == "<unparseable URL>"


# -- secrets_of / repr ----------------------------------------------------------------


def test_secrets_of_finds_every_configured_password():
    settings = Settings.from_env(
        {
            "REDIS_URL": "redis://:redis-pw@cache/0",
            "DATABASE_URL": "postgresql://u:db-pw@h/db",
            "CELERY_BROKER_URL": "amqp://guest:broker-pw@mq//",
            "CELERY_RESULT_BACKEND": "redis://:backend-pw@cache/2",
        }
    )
    assert set(secrets_of(settings)) >= {"redis-pw", "db-pw", "broker-pw", "backend-pw"}


def test_secrets_of_is_empty_without_passwords():
    settings = Settings.from_env({"DATABASE_URL": "postgresql://u@h/db"})
    assert secrets_of(settings) == []


def test_secrets_of_has_a_quoted_password_as_written_and_as_typed():
    settings = Settings.from_env({"POSTGRES_PASSWORD": "p@ss:w/rd"})
    found = secrets_of(settings)
    assert "p@ss:w/rd" in found  # what a server or driver may echo
    assert "p%40ss%3Aw%2Frd" in found  # what the URL itself contains


def test_secrets_of_finds_a_password_given_as_a_query_parameter():
    settings = Settings.from_env({"DATABASE_URL": "postgresql://u@h/db?password=q-pw"})
    assert "q-pw" in secrets_of(settings)


def test_the_repr_of_settings_never_shows_a_password():
    settings = Settings.from_env(
        {"POSTGRES_PASSWORD": "pg-pw", "REDIS_URL": "redis://:redis-pw@cache/0"}
    )
    text = repr(settings)
    assert "pg-pw" not in text
    assert "redis-pw" not in text
    assert "cache" in text


def test_continuous_and_metrics_defaults():
    s = Settings.from_env({})
    assert (s.continuous_backup, s.continuous_max_lag_s) == (True, 5.0)
    assert (s.metrics_port, s.metrics_address) == (9808, "0.0.0.0")  # noqa: S104


@pytest.mark.parametrize(
    ("raw", "value"), [("0", False), ("off", False), ("No", False), ("1", True), ("true", True)]
)
def test_continuous_backup_reads_a_boolean(raw, value):
    assert Settings.from_env({"CONTINUOUS_BACKUP": raw}).continuous_backup is value


def test_continuous_settings_refuse_bad_values():
    assert "CONTINUOUS_BACKUP must be 1 or 0" in config_error({"CONTINUOUS_BACKUP": "maybe"})
    assert "CONTINUOUS_MAX_LAG must be a number" in config_error({"CONTINUOUS_MAX_LAG": "5s"})
    assert "CONTINUOUS_MAX_LAG must be between" in config_error({"CONTINUOUS_MAX_LAG": "nan"})
    assert "CONTINUOUS_MAX_LAG must be between" in config_error({"CONTINUOUS_MAX_LAG": "0"})
    assert "METRICS_PORT must be between 0 and 65535" in config_error({"METRICS_PORT": "70000"})
    assert Settings.from_env({"CONTINUOUS_MAX_LAG": "2.5"}).continuous_max_lag_s == 2.5
    assert Settings.from_env({"METRICS_PORT": "0"}).metrics_port == 0


# -- signed task messages --------------------------------------------------------


@pytest.fixture
def signing_files(tmp_path):
    key, cert = tmp_path / "w.key", tmp_path / "w.pem"
    key.write_text("key")
    cert.write_text("cert")
    return {
        "CELERY_SECURITY_KEY": str(key),
        "CELERY_SECURITY_CERTIFICATE": str(cert),
        "CELERY_SECURITY_CERT_STORE": str(tmp_path / "*.pem"),
    }


def test_signing_is_off_by_default():
    settings = Settings.from_env({})
    assert (settings.security_key, settings.security_certificate) == ("", "")
    assert settings.security_cert_store == ""


def test_signing_needs_all_three_settings(signing_files):
    assert Settings.from_env(signing_files).security_key == signing_files["CELERY_SECURITY_KEY"]
    for name in signing_files:
        partial = {k: v for k, v in signing_files.items() if k != name}
        message = config_error(partial)
        assert name in message.split(" not")[0].split("set, ")[-1], message


def test_signing_files_must_exist(signing_files, tmp_path):
    message = config_error({**signing_files, "CELERY_SECURITY_KEY": str(tmp_path / "nope")})
    assert message.startswith("CELERY_SECURITY_KEY: cannot read the file")
    message = config_error({**signing_files, "CELERY_SECURITY_CERT_STORE": str(tmp_path / "x*")})
    assert message.startswith("CELERY_SECURITY_CERT_STORE: no certificate file matches")


def test_signing_turns_on_the_auth_serializer_for_tasks_only(signing_files):
    from worker.celery_config import build_config

    plain = build_config(Settings.from_env({}))
    assert (plain["task_serializer"], plain["accept_content"]) == ("json", ["json"])
    assert "security_key" not in plain
    signed = build_config(Settings.from_env(signing_files))
    assert (signed["task_serializer"], signed["accept_content"]) == ("auth", ["auth"])
    assert (signed["result_serializer"], signed["result_accept_content"]) == ("json", ["json"])
    assert signed["security_cert_store"] == signing_files["CELERY_SECURITY_CERT_STORE"]
