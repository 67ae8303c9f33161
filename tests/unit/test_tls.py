"""worker.tls: certificate checks on by default; which settings turn one off."""

from __future__ import annotations

import pytest

from worker.celery_config import build_config
from worker.settings import Settings
from worker.tls import postgres_unchecked, redis_unchecked, tls_warning, with_cert_check


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        ("rediss://r:6379/1", "rediss://r:6379/1?ssl_cert_reqs=required"),
        (
            "rediss://:pw@r:6379/1?ssl_ca_certs=/ca.pem",
            "rediss://:pw@r:6379/1?ssl_ca_certs=/ca.pem&ssl_cert_reqs=required",
        ),
        ("rediss://r/1?ssl_cert_reqs=none", "rediss://r/1?ssl_cert_reqs=none"),  # as asked
        ("redis://r:6379/1", "redis://r:6379/1"),
        ("amqps://u:p@mq//", "amqps://u:p@mq//"),
    ],
)
def test_with_cert_check(url, expected):
    assert with_cert_check(url) == expected


def test_celery_gets_the_checked_urls():
    settings = Settings.from_env(
        {"CELERY_BROKER_URL": "rediss://r/1", "CELERY_RESULT_BACKEND": "rediss://r/2"}
    )
    config = build_config(settings)
    assert config["broker_url"] == "rediss://r/1?ssl_cert_reqs=required"
    assert config["result_backend"] == "rediss://r/2?ssl_cert_reqs=required"


@pytest.mark.parametrize(
    ("url", "off"),
    [
        ("rediss://r/0?ssl_cert_reqs=none", "ssl_cert_reqs=none"),
        ("rediss://r/0?ssl_cert_reqs=CERT_NONE", "ssl_cert_reqs=none"),
        ("rediss://r/0?ssl_check_hostname=false", "ssl_check_hostname=false"),
        ("rediss://r/0?ssl_cert_reqs=required", None),
        ("rediss://r/0", None),
        ("redis://r/0?ssl_cert_reqs=none", None),  # no TLS at all: nothing to turn off
    ],
)
def test_redis_unchecked(url, off):
    found = redis_unchecked(url)
    assert (found.split(":")[0] if found else None) == off


@pytest.mark.parametrize(
    ("url", "warns"),
    [
        ("postgresql://u@db.example/d?sslmode=require", True),
        ("postgresql://u@db.example/d?sslmode=prefer", True),
        ("postgresql://u@db.example/d?sslmode=disable", True),
        ("postgresql://u@db.example/d", True),  # libpq's default: prefer
        ("postgresql://u@db.example/d?sslmode=verify-ca&sslrootcert=/ca.pem", False),
        ("postgresql://u@db.example/d?sslmode=verify-full", False),
        ("postgresql://u@localhost/d?sslmode=disable", False),
        ("postgresql://u@127.0.0.1:5432/d", False),
        ("postgresql://u@[::1]:5432/d?sslmode=require", False),
        ("postgresql:///d?host=/var/run/postgresql", False),
    ],
)
def test_postgres_unchecked(url, warns):
    assert (postgres_unchecked(url) is not None) == warns


def test_one_warning_naming_every_setting_that_turns_a_check_off():
    settings = Settings.from_env(
        {
            "REDIS_URL": "rediss://:pw@r/0?ssl_cert_reqs=none",
            "CELERY_RESULT_BACKEND": "rediss://r/2?ssl_check_hostname=false",
            "POSTGRES_HOST": "db.example:5432",
            "POSTGRES_SSLMODE": "require",
        }
    )
    warning = tls_warning(settings)
    assert warning is not None
    assert "\n" not in warning
    assert warning.startswith("TLS check off: REDIS_URL: ssl_cert_reqs=none")
    assert "CELERY_RESULT_BACKEND: ssl_check_hostname=false" in warning
    assert (
        "POSTGRES_HOST/POSTGRES_USER/POSTGRES_PASSWORD/POSTGRES_DBNAME: sslmode=require" in warning
    )
    assert "pw" not in warning.replace("password", "")


def test_no_warning_with_the_defaults():
    assert tls_warning(Settings.from_env({})) is None
