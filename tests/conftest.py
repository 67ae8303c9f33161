"""Fixtures shared by every test: the real services, isolated per test.

Where the services come from, in order:

1. environment variables (what CI and a laptop with local servers use):

   DND_TEST_DATABASE_URL  a PostgreSQL server on which the tests may CREATE DATABASE,
                          e.g. postgresql://postgres@127.0.0.1:5432/postgres
   DND_TEST_REDIS_URL     a Redis server, e.g. redis://127.0.0.1:6379/0
   DND_TEST_AMQP_URL      a RabbitMQ server, e.g. amqp://guest:guest@127.0.0.1:5672//

2. otherwise testcontainers starts the server in Docker, if a Docker engine answers;
3. otherwise the test fails, saying which variable to set. A missing service is
   never a silent skip.

Isolation: PostgreSQL is migrated once into a template database, and every
test gets a fresh copy of it (CREATE DATABASE ... TEMPLATE), dropped afterwards.
Redis: every test gets a key prefix of its own, deleted afterwards.
"""

from __future__ import annotations

import contextlib
import os
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import psycopg
import pytest
import redis
from psycopg import sql

from tests.servers import RedisServer
from worker.keys import RedisKeys
from worker.settings import Settings

SERVICE_NAMES = {
    "DND_TEST_DATABASE_URL": "PostgreSQL",
    "DND_TEST_REDIS_URL": "Redis",
    "DND_TEST_AMQP_URL": "RabbitMQ",
}
SERVICE_HELP = {
    "DND_TEST_DATABASE_URL": "a PostgreSQL server where tests may create databases, e.g. "
    "postgresql://postgres@127.0.0.1:5432/postgres",
    "DND_TEST_REDIS_URL": "a Redis server, e.g. redis://127.0.0.1:6379/0",
    "DND_TEST_AMQP_URL": "a RabbitMQ server, e.g. amqp://guest:guest@127.0.0.1:5672//",
}


def _docker_available() -> bool:
    """True when a Docker engine answers (not just a docker client being installed)."""
    host = os.environ.get("DOCKER_HOST", "unix:///var/run/docker.sock")
    if host.startswith("unix://"):
        # Probe the socket ourselves: docker-py leaks a socket when no engine answers.
        import socket

        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
            probe.settimeout(2)
            try:
                probe.connect(host.removeprefix("unix://"))
            except OSError:
                return False
    try:
        import docker

        client = docker.from_env(timeout=3)
    except Exception:
        return False
    try:
        client.ping()
    except Exception:
        return False
    finally:
        client.close()
    return True


def _service(variable: str, start_container: Callable[[], tuple[str, Any]]) -> Iterator[str]:
    url = os.environ.get(variable, "").strip()
    if url:
        yield url
        return
    if not _docker_available():
        pytest.fail(
            f"no {SERVICE_NAMES[variable]} server for the tests: "
            f"set {variable} to {SERVICE_HELP[variable]}, or run them where a Docker engine "
            "answers (testcontainers starts one)",
            pytrace=False,
        )
    url, container = start_container()
    try:
        yield url
    finally:
        container.stop()


def _postgres_container() -> tuple[str, Any]:
    from testcontainers.postgres import PostgresContainer

    container = PostgresContainer("postgres:15-alpine", driver=None).start()
    return container.get_connection_url(), container


def _redis_container() -> tuple[str, Any]:
    from testcontainers.redis import RedisContainer

    container = RedisContainer("redis:7-alpine").start()
    host = container.get_container_host_ip()
    port = container.get_exposed_port(6379)
    return f"redis://{host}:{port}/0", container


def _rabbitmq_container() -> tuple[str, Any]:
    from testcontainers.rabbitmq import RabbitMqContainer

    container = RabbitMqContainer("rabbitmq:3-alpine").start()
    host = container.get_container_host_ip()
    port = container.get_exposed_port(5672)
    return f"amqp://guest:guest@{host}:{port}//", container


@pytest.fixture(scope="session")
def postgres_admin_url() -> Iterator[str]:
    yield from _service("DND_TEST_DATABASE_URL", _postgres_container)


@pytest.fixture(scope="session")
def redis_server_url() -> Iterator[str]:
    yield from _service("DND_TEST_REDIS_URL", _redis_container)


@pytest.fixture(scope="session")
def amqp_url() -> Iterator[str]:
    yield from _service("DND_TEST_AMQP_URL", _rabbitmq_container)


def database_url_for(admin_url: str, dbname: str) -> str:
    parts = urlsplit(admin_url)
    return urlunsplit(parts._replace(path=f"/{dbname}"))


def _admin(admin_url: str) -> psycopg.Connection[Any]:
    return psycopg.connect(admin_url, autocommit=True)


def create_database(admin_url: str, name: str, template: str | None = None) -> str:
    with _admin(admin_url) as conn:
        if template:
            conn.execute(
                sql.SQL("CREATE DATABASE {} TEMPLATE {}").format(
                    sql.Identifier(name), sql.Identifier(template)
                )
            )
        else:
            conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    return database_url_for(admin_url, name)


def drop_database(admin_url: str, name: str) -> None:
    with _admin(admin_url) as conn:
        conn.execute(
            sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name))
        )


@pytest.fixture(scope="session")
def template_database(postgres_admin_url: str) -> Iterator[str]:
    """A database migrated to the latest schema, copied by every test that needs one."""
    from worker import migrate

    name = f"dnd_test_tpl_{uuid.uuid4().hex[:12]}"
    url = create_database(postgres_admin_url, name)
    try:
        migrate.up(Settings.from_env({"DATABASE_URL": url}))
        yield name
    finally:
        drop_database(postgres_admin_url, name)


@pytest.fixture
def database_url(postgres_admin_url: str, template_database: str) -> Iterator[str]:
    """A fresh, migrated database of this test's own."""
    name = f"dnd_test_{uuid.uuid4().hex[:16]}"
    url = create_database(postgres_admin_url, name, template=template_database)
    try:
        yield url
    finally:
        drop_database(postgres_admin_url, name)


@pytest.fixture
def empty_database_url(postgres_admin_url: str) -> Iterator[str]:
    """A fresh database with no schema at all (migration tests)."""
    name = f"dnd_test_empty_{uuid.uuid4().hex[:12]}"
    url = create_database(postgres_admin_url, name)
    try:
        yield url
    finally:
        drop_database(postgres_admin_url, name)


@pytest.fixture
def key_prefix(redis_server_url: str) -> Iterator[str]:
    """A Redis key prefix of this test's own; every key under it is deleted afterwards."""
    prefix = f"dndtest:{uuid.uuid4().hex[:12]}:"
    yield prefix
    delete_prefix(redis_server_url, prefix)


def delete_prefix(redis_url: str, prefix: str) -> None:
    client = redis.Redis.from_url(redis_url)
    try:
        batch = []
        for key in client.scan_iter(match=f"{prefix}*", count=1000):
            batch.append(key)
            if len(batch) >= 1000:
                client.unlink(*batch)
                batch.clear()
        if batch:
            client.unlink(*batch)
    finally:
        client.close()


@pytest.fixture
def redis_client(redis_server_url: str) -> Iterator[redis.Redis]:
    """A raw client (bytes in, bytes out) on the test Redis."""
    client = redis.Redis.from_url(redis_server_url)
    yield client
    client.close()


@pytest.fixture
def keys(key_prefix: str) -> RedisKeys:
    return RedisKeys(key_prefix)


@pytest.fixture
def env(database_url: str, redis_server_url: str, key_prefix: str) -> dict[str, str]:
    """The environment a process of ours needs to work on this test's data."""
    return {
        "DATABASE_URL": database_url,
        "REDIS_URL": redis_server_url,
        "REDIS_KEY_PREFIX": key_prefix,
        # The machine's shared Redis is never reconfigured: a worker's watcher
        # must not CONFIG SET its notify-keyspace-events. Tests of continuous
        # backup with the default (set them) use a Redis of their own
        # (tests/e2e/test_continuous.py).
        "CONTINUOUS_SET_NOTIFICATIONS": "0",
    }


@pytest.fixture
def settings(env: dict[str, str]) -> Settings:
    return Settings.from_env(env)


@pytest.fixture
def services(settings: Settings) -> Iterator[Any]:
    from worker.services import open_services

    with open_services(settings, worker_name="test-worker") as opened:
        yield opened


@pytest.fixture
def pg_conn(database_url: str) -> Iterator[psycopg.Connection[Any]]:
    """A plain connection to this test's database, for assertions."""
    with contextlib.closing(psycopg.connect(database_url, autocommit=True)) as conn:
        yield conn


@pytest.fixture(
    params=[
        "backup read by the comparison",
        "backup staged first",
        "backup staged first, Redis's side not held",
    ]
)
def verify_paths(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Run a verify test down each of verify's paths to the backup's side.

    Small sessions (below verify.STAGE_BACKUP_FROM messages) are compared with
    the backup straight from its table, big ones with the backup staged first
    while Redis is read; the tests' sessions are small, so the other
    parametrizations lower the threshold to 0 to send them down that path too.
    While the backup's side is staged, Redis's rows are held (up to
    VerifyStaging.HOLD_WHILE_STAGING, which a test's session never reaches);
    the last parametrization holds at most one, so that a session's rows are
    sent as a bigger session's are once the hold is full.
    """
    from worker import verify
    from worker.pg_store import VerifyStaging

    if request.param != "backup read by the comparison":
        monkeypatch.setattr(verify, "STAGE_BACKUP_FROM", 0)
    if request.param == "backup staged first, Redis's side not held":
        monkeypatch.setattr(VerifyStaging, "HOLD_WHILE_STAGING", 1)
    return str(request.param)


@pytest.fixture
def own_redis(tmp_path: Path) -> Iterator[RedisServer]:
    """A redis-server of the test's own on a free port (one it may stop, kill or restart)."""
    server = RedisServer(tmp_path)
    yield server
    server.stop()
