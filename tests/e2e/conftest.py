"""Fixtures for end-to-end tests: Celery environments, workers, beat."""

from __future__ import annotations

import contextlib
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest

from tests.conftest import delete_prefix
from tests.processes import CeleryProcess, start_beat, start_worker


@pytest.fixture(params=["redis", "amqp"])
def broker(request: pytest.FixtureRequest) -> str:
    """Run the test on each broker we support: Redis (the default) and RabbitMQ."""
    return str(request.param)


@pytest.fixture
def celery_env(
    env: dict[str, str],
    redis_server_url: str,
    request: pytest.FixtureRequest,
) -> Iterator[dict[str, str]]:
    """The environment of workers, beat, the CLI and app code for this test.

    Queue names and Celery's Redis keys get prefixes of this test's own, so
    tests running at once (or left-overs of a crashed run) never mix.
    """
    broker_name = "redis"
    if "broker" in request.fixturenames:
        broker_name = request.getfixturevalue("broker")
    tag = uuid.uuid4().hex[:10]
    broker_url = redis_server_url
    if broker_name == "amqp":
        broker_url = request.getfixturevalue("amqp_url")
    celery = {
        **env,
        "CELERY_BROKER_URL": broker_url,
        "CELERY_RESULT_BACKEND": redis_server_url,
        "CELERY_QUEUE_PREFIX": f"t{tag}.",
        "CELERY_KEY_PREFIX": f"t{tag}:",
        # Not Celery's default `celery`: on RabbitMQ that queue is shared by
        # everything on the virtual host (tests/e2e/test_other_languages.py).
        "CELERY_PRODUCER_QUEUES": f"t{tag}.celery",
        "BACKUP_SHARDS": "4",
        "BACKUP_BATCH_SESSIONS": "5",
        "BACKUP_SCHEDULE": "off",
    }
    yield celery
    delete_prefix(redis_server_url, f"t{tag}:")
    if broker_name == "amqp":
        shards = [f"t{tag}.shard.{n}" for n in range(int(celery["BACKUP_SHARDS"]))]
        delete_amqp_queues(broker_url, [f"t{tag}.default", f"t{tag}.celery", *shards])


def delete_amqp_queues(url: str, names: list[str]) -> None:
    """Delete these queues, and the exchanges of the same names, on RabbitMQ."""
    from kombu.connection import Connection

    with Connection(url) as conn:
        channel = conn.default_channel
        for name in names:
            with contextlib.suppress(Exception):
                channel.queue_delete(name)
            with contextlib.suppress(Exception):
                channel.exchange_delete(name)


@pytest.fixture
def workers(tmp_path: Path) -> Iterator[Callable[..., CeleryProcess]]:
    """Start workers (`celery -A worker worker`); all are stopped after the test."""
    started: list[CeleryProcess] = []

    def start(env: dict[str, str], **kwargs: Any) -> CeleryProcess:
        worker = start_worker(env, tmp_path, **kwargs)
        started.append(worker)
        return worker

    yield start
    for worker in started:
        worker.stop()


@pytest.fixture
def beats(tmp_path: Path) -> Iterator[Callable[..., CeleryProcess]]:
    started: list[CeleryProcess] = []

    def start(env: dict[str, str], name: str = "beat") -> CeleryProcess:
        beat = start_beat(env, tmp_path, name)
        started.append(beat)
        return beat

    yield start
    for beat in started:
        beat.stop()


def wait_for(
    predicate: Callable[[], Any],
    timeout: float = 60,
    interval: float = 0.2,
    message: str = "condition",
) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {message}")
        time.sleep(interval)


def runs(conn: psycopg.Connection[Any], kind: str = "backup") -> list[dict[str, Any]]:
    with conn.cursor() as cur:
        cur.execute(
            "SELECT id::text, scope, status, session_count, message_count, kept_count, "
            "failed_count, created_at, finished_at, error, details "
            "FROM persistence_snapshots WHERE kind = %s ORDER BY created_at",
            (kind,),
        )
        columns = [c.name for c in cur.description or ()]
        return [dict(zip(columns, row, strict=True)) for row in cur.fetchall()]


def wait_for_run(
    conn: psycopg.Connection[Any],
    run_id: str | None = None,
    *,
    kind: str = "backup",
    timeout: float = 90,
) -> dict[str, Any]:
    """The run (or the latest full run of ``kind``) once it is no longer running."""

    def finished() -> dict[str, Any] | None:
        for run in reversed(runs(conn, kind)):
            if (run_id is None and run["scope"] == "all") or run["id"] == run_id:
                return run if run["status"] != "running" else None
        return None

    return wait_for(finished, timeout, message=f"run {run_id or kind} to finish")
