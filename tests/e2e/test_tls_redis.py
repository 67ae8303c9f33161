"""Redis over TLS, certificates checked: the data Redis, the Celery broker and the result backend.

Each test makes its own CA (tests/tls.py) and starts a redis-server that
speaks only TLS and requires a client certificate of that CA. The URLs carry
ssl_ca_certs, ssl_certfile and ssl_keyfile (the forms redis-py and Celery
understand), and no ssl_cert_reqs: the check must be on by default.
"""

from __future__ import annotations

import json
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

    # A server whose certificate does not match: another CA, or another name.
    wrong_ca = TestCA(tls_redis.dir / "wrong-ca", name="someone else's CA")
    for setting, db, local in (
        ("REDIS_URL", 0, True),
        ("CELERY_BROKER_URL", 1, False),
        ("CELERY_RESULT_BACKEND", 2, False),
    ):
        for bad in (tls_redis.url(db, ca=wrong_ca.path), tls_redis.url(db, host="localhost")):
            # The data Redis is reached by the worker's tasks: --local shows the CLI's own check.
            args = ["backup", "--all", *(["--local"] if local else [])]
            done = cli({**tls_env, setting: bad}, *args)
            assert done.returncode == UNAVAILABLE, describe(done)
            line = assert_one_error_line(done, f"check {setting}")
            assert "CERTIFICATE_VERIFY_FAILED" in line, line
    assert worker.alive()


def test_a_check_turned_off_warns_once_at_start(tls_env, tls_redis, tmp_path):
    env = {**tls_env, "CELERY_BROKER_URL": tls_redis.url(1, ca=tmp_path, extra="ssl_cert_reqs=none")}
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
