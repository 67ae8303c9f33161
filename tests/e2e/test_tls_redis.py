"""Redis over TLS, certificates checked: the data Redis, the Celery broker and the result backend.

Each test makes its own CA (tests/tls.py) and starts a redis-server that
speaks only TLS and requires a client certificate of that CA. The URLs carry
ssl_ca_certs, ssl_certfile and ssl_keyfile (the forms redis-py and Celery
understand), and no ssl_cert_reqs: the check must be on by default.
"""

from __future__ import annotations

import json
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis

from tests.e2e.cli_helpers import UNAVAILABLE, assert_one_error_line, cli, describe
from tests.factories import make_sessions
from tests.processes import CeleryProcess, start_beat
from tests.tls import TestCA, TlsRedis
from worker.keys import RedisKeys


@pytest.fixture
def ca(tmp_path: Path) -> TestCA:
    return TestCA(tmp_path / "ca")


@pytest.fixture
def tls_redis(tmp_path: Path, ca: TestCA) -> Iterator[TlsRedis]:
    # Issued for 127.0.0.1 only: a URL naming `localhost` is the wrong hostname.
    server = TlsRedis(tmp_path, ca, ca.issue("redis", names=("127.0.0.1",)))
    yield server
    server.stop()


@pytest.fixture
def tls_env(celery_env: dict[str, str], tls_redis: TlsRedis) -> dict[str, str]:
    """The test's environment with all three Redis connections on the TLS server."""
    return {
        **celery_env,
        "REDIS_URL": tls_redis.url(0),
        "CELERY_BROKER_URL": tls_redis.url(1),
        "CELERY_RESULT_BACKEND": tls_redis.url(2),
    }


def test_the_server_refuses_a_client_without_its_certificate(tls_redis):
    # What makes the client certificate in the URLs below necessary.
    client = redis.Redis.from_url(tls_redis.url(0, client_cert=False))
    with pytest.raises(redis.exceptions.ConnectionError):
        client.ping()
    client.close()


def test_backup_over_tls_with_a_real_worker_then_refusals(tls_env, tls_redis, workers, pg_conn):
    data = redis.Redis.from_url(tls_env["REDIS_URL"])
    ids = make_sessions(data, RedisKeys(tls_env["REDIS_KEY_PREFIX"]), 3, 20)
    data.close()
    worker = workers(tls_env)
    assert "TLS check off" not in worker.log()

    done = cli(tls_env, "backup", "--all", "-o", "json")
    assert done.returncode == 0, describe(done)
    run = json.loads(done.stdout)
    assert run["status"] == "completed", run
    stored = pg_conn.execute("SELECT count(*) FROM client_messages").fetchone()
    assert stored == (60,)
    assert sorted(r[0] for r in pg_conn.execute("SELECT id::text FROM client_sessions")) == sorted(
        ids
    )
    assert "warning" not in done.stderr

    # The result backend is reached only once a worker took the queues: the
    # CLI checks it before sending (Celery alone retries ~30 s, then exit 1).
    for bad in _mismatched(tls_redis, 2):
        done = cli({**tls_env, "CELERY_RESULT_BACKEND": bad}, "backup", "--all")
        _refused(done, "CELERY_RESULT_BACKEND")
    assert worker.alive()


def _mismatched(tls_redis: TlsRedis, db: int) -> list[str]:
    """URLs to the server checking it against another CA, or under another name."""
    wrong_ca = TestCA(tls_redis.dir / f"wrong-ca-{db}", name="someone else's CA")
    return [tls_redis.url(db, ca=wrong_ca.path), tls_redis.url(db, host="localhost")]


def _refused(done: subprocess.CompletedProcess[str], setting: str) -> None:
    assert done.returncode == UNAVAILABLE, describe(done)
    line = assert_one_error_line(done, f"check {setting}")
    assert "CERTIFICATE_VERIFY_FAILED" in line, line


@pytest.mark.parametrize("wrong", ["ca", "hostname"])
@pytest.mark.parametrize(
    ("setting", "db", "args"),
    [
        # The data Redis is read by the workers' tasks: --local shows the CLI's own check.
        ("REDIS_URL", 0, ("backup", "--all", "--local")),
        ("CELERY_BROKER_URL", 1, ("backup", "--all")),
    ],
)
def test_a_certificate_that_does_not_match_is_refused(tls_env, tls_redis, setting, db, args, wrong):
    bad = _mismatched(tls_redis, db)[0 if wrong == "ca" else 1]
    _refused(cli({**tls_env, setting: bad}, *args), setting)


def test_a_check_turned_off_warns_once_at_start(tls_env, tls_redis, tmp_path):
    env = {
        **tls_env,
        "CELERY_BROKER_URL": tls_redis.url(1, ca=tmp_path, extra="ssl_cert_reqs=none"),
    }
    beat: CeleryProcess = start_beat(env, tmp_path)
    try:
        beat.wait_for_log("TLS check off")
    finally:
        beat.stop()
    lines = [line for line in beat.log().splitlines() if "TLS check off" in line]
    assert len(lines) == 1, beat.log()
    assert "CELERY_BROKER_URL: ssl_cert_reqs=none" in lines[0]
    done = cli(env, "backup", "list")
    assert done.returncode == 0, describe(done)
    warnings = [line for line in done.stderr.splitlines() if "warning" in line]
    assert warnings == [
        "dnd-client: warning: TLS check off: CELERY_BROKER_URL: ssl_cert_reqs=none: "
        "the server's certificate is not checked"
    ]
