"""Secrets from files: <NAME>_FILE for every setting that can hold a password."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from worker import flower_guard
from worker.errors import ConfigError
from worker.exit_codes import CONFIG
from worker.secret_files import SECRET_VARIABLES, with_secret_files
from worker.settings import SETTINGS_SECRETS, Settings, secrets_of

REPO = Path(__file__).resolve().parents[2]

URLS = {
    "DATABASE_URL": ("database_url", "postgresql://dnd:pg-s3cret@db.example:5432/dnd"),
    "REDIS_URL": ("redis_url", "redis://:redis-s3cret@redis.example:6379/0"),
    "CELERY_BROKER_URL": ("broker_url", "amqp://dnd:mq-s3cret@mq.example:5672//"),
    "CELERY_RESULT_BACKEND": ("result_backend", "redis://:rb-s3cret@redis.example:6379/2"),
}


def secret(tmp_path: Path, name: str, content: str) -> str:
    path = tmp_path / name.lower()
    path.write_text(content)
    return str(path)


@pytest.mark.parametrize("name", sorted(URLS))
def test_each_url_setting_reads_its_file(tmp_path, name):
    field, url = URLS[name]
    settings = Settings.from_env({f"{name}_FILE": secret(tmp_path, name, url + "\n")})
    assert getattr(settings, field) == url  # the trailing newline is stripped
    assert url.split("@")[0].rsplit(":", 1)[1] in secrets_of(settings)


def test_postgres_password_file(tmp_path):
    path = secret(tmp_path, "pw", "p@ss word\r\n")
    settings = Settings.from_env({"POSTGRES_HOST": "db:5432", "POSTGRES_PASSWORD_FILE": path})
    assert (
        settings.database_url == "postgresql://dnd:p%40ss%20word@db:5432/dnd_client?sslmode=disable"
    )


def test_every_secret_has_a_file_form_in_the_settings_or_the_flower_guard():
    assert set(SECRET_VARIABLES) == {*SETTINGS_SECRETS, "FLOWER_BASIC_AUTH"}


def test_only_trailing_newlines_are_stripped(tmp_path):
    path = secret(tmp_path, "pw", " spaced \n\n")
    assert with_secret_files({"POSTGRES_PASSWORD_FILE": path})["POSTGRES_PASSWORD"] == " spaced "


@pytest.mark.parametrize("name", SETTINGS_SECRETS)
def test_both_forms_set_is_an_error_naming_both(tmp_path, name):
    path = secret(tmp_path, name, "x")
    with pytest.raises(ConfigError) as info:
        Settings.from_env({name: "something", f"{name}_FILE": path})
    message = str(info.value)
    assert f"{name} and {name}_FILE are both set" in message
    assert "something" not in message


@pytest.mark.parametrize(
    ("content", "expected"),
    [(None, "cannot read"), ("", "is empty"), ("\n", "is empty"), (b"\xff\xfe", "not UTF-8")],
)
def test_unusable_file_is_an_error_naming_the_variable_and_path(tmp_path, content, expected):
    path = tmp_path / "redis_url"
    if isinstance(content, bytes):
        path.write_bytes(content)
    elif content is not None:
        path.write_text(content)
    with pytest.raises(ConfigError) as info:
        Settings.from_env({"REDIS_URL_FILE": str(path)})
    message = str(info.value)
    assert message.startswith("REDIS_URL_FILE: ")
    assert str(path) in message
    assert expected in message


def test_a_file_that_holds_a_bad_url_is_refused_without_echoing_the_password(tmp_path):
    path = secret(tmp_path, "redis", "http://:hunter22@redis.example/0")
    with pytest.raises(ConfigError) as info:
        Settings.from_env({"REDIS_URL_FILE": path})
    assert "REDIS_URL must be a URL" in str(info.value)
    assert "hunter22" not in str(info.value)


def test_an_empty_variable_beside_its_file_is_not_both(tmp_path):
    path = secret(tmp_path, "redis", "redis://r.example/0")
    assert Settings.from_env({"REDIS_URL": "", "REDIS_URL_FILE": path}).redis_url.endswith("/0")


# -- Flower: the guard hands FLOWER_BASIC_AUTH_FILE to Flower ---------------------


def test_guard_accepts_basic_auth_from_a_file(tmp_path, monkeypatch):
    path = secret(tmp_path, "flower", "admin:fl0wer-pw\n")
    monkeypatch.delenv("FLOWER_BASIC_AUTH", raising=False)
    monkeypatch.setenv("FLOWER_BASIC_AUTH_FILE", path)
    flower_guard.check(["celery", "-A", "worker", "flower"])
    # Flower reads its options from the environment after this check.
    assert os.environ["FLOWER_BASIC_AUTH"] == "admin:fl0wer-pw"


def test_guard_refuses_a_malformed_login_file_without_echoing_it(tmp_path, capsys):
    path = secret(tmp_path, "flower", "admin-fl0wer-pw\n")
    with pytest.raises(SystemExit) as exit_:
        flower_guard.check(["celery", "-A", "worker", "flower"], {"FLOWER_BASIC_AUTH_FILE": path})
    assert exit_.value.code == CONFIG
    err = capsys.readouterr().err
    assert "FLOWER_BASIC_AUTH must be user:password" in err
    assert "fl0wer" not in err


def test_guard_refuses_both_forms(tmp_path, capsys):
    path = secret(tmp_path, "flower", "admin:pw")
    env = {"FLOWER_BASIC_AUTH": "admin:pw", "FLOWER_BASIC_AUTH_FILE": path}
    with pytest.raises(SystemExit) as exit_:
        flower_guard.check(["celery", "-A", "worker", "flower"], env)
    assert exit_.value.code == CONFIG
    [line] = capsys.readouterr().err.strip().splitlines()
    assert "FLOWER_BASIC_AUTH and FLOWER_BASIC_AUTH_FILE are both set" in line


def test_not_flower_the_flower_file_is_left_alone(tmp_path):
    env = {"FLOWER_BASIC_AUTH_FILE": str(tmp_path / "missing")}
    flower_guard.check(["celery", "-A", "worker", "worker"], env)  # no error: not Flower


# -- the CLI: one line, exit 7 ------------------------------------------------------


def test_cli_both_forms_exit_7_with_one_line(tmp_path):
    path = secret(tmp_path, "db", "postgresql://dnd:pg-s3cret@127.0.0.1:1/dnd")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("DATABASE_", "POSTGRES_"))}
    env.update(DATABASE_URL="postgresql://dnd:other-s3cret@127.0.0.1:1/dnd", DATABASE_URL_FILE=path)
    done = subprocess.run(
        [sys.executable, str(REPO / "bin" / "dnd-client"), "backup", "list"],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert done.returncode == CONFIG, done.stderr
    [line] = done.stderr.strip().splitlines()
    assert "DATABASE_URL and DATABASE_URL_FILE are both set" in line
    assert "s3cret" not in done.stdout + done.stderr
