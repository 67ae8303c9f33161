"""Producers in other languages: celery-node, from npm, with its default settings.

A Node or Go application sends `worker.tasks.backup_session` with a session ID to
Celery's default queue, `celery`, and reads the result in the result backend; a
real `celery -A worker worker` consumes that queue besides its own
(CELERY_PRODUCER_QUEUES). The Node side is tests/node/send_backup.js; its
packages come from `npm ci --prefix tests/node` (.ci/run), never installed here.

celery-node knows nothing of CELERY_KEY_PREFIX, by which the other e2e tests keep
Celery's keys apart on the shared Redis: here the broker and the results live in
a redis-server of the test's own, with no prefix. On RabbitMQ the test gets a
virtual host of its own (rabbitmqctl), so that the `celery` queue of the shared
one is never touched; where rabbitmqctl cannot make one (a remote or
containerised server), the producer queue gets a name of the test's own instead,
given to the worker (CELERY_PRODUCER_QUEUES) and to celery-node (its queue);
celery-node's own unused exchange, `default`, is left there (gocelery declares
it too; deleting it under another run could only surprise that run).
"""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlsplit, urlunsplit

import psycopg
import pytest
import redis

from tests.e2e.cli_helpers import NO_WORKERS, cli_json, describe
from tests.e2e.conftest import delete_amqp_queues, runs
from tests.factories import add_messages, message, session_fields, write_session
from tests.processes import REPO, run_cli
from worker.celery_config import shard_queue
from worker.settings import Settings
from worker.sharding import shard_of

NODE_DIR = REPO / "tests" / "node"
NPM_CI = "npm ci --prefix tests/node"
SHARDS = 4
LOCAL_HOSTS = ("127.0.0.1", "localhost", "::1")


# -- the Node side ------------------------------------------------------------------


@pytest.fixture(scope="module")
def node() -> str:
    """The node executable, once celery-node is installed (else fail, never skip)."""
    executable = shutil.which("node")
    if executable is None:
        pytest.fail(
            f"node is not on PATH: install Node.js (18 or later), then run `{NPM_CI}`",
            pytrace=False,
        )
    if not (NODE_DIR / "node_modules" / "celery-node").is_dir():
        pytest.fail(
            f"tests/node/node_modules is missing: run `{NPM_CI}` (.ci/run does)", pytrace=False
        )
    return executable


def send_backup(node: str, broker: str, backend: str, session_id: str, *options: str) -> Any:
    """What tests/node/send_backup.js printed: {"task_id", "status", "result"}."""
    done = subprocess.run(
        [node, str(NODE_DIR / "send_backup.js"), broker, backend, session_id, *options],
        cwd=NODE_DIR,
        capture_output=True,
        text=True,
        timeout=90,
        check=False,
    )
    assert done.returncode == 0, f"exit {done.returncode}\n{done.stdout}\n{done.stderr}"
    return json.loads(done.stdout.strip().splitlines()[-1])


# -- a private Redis: broker and results, with no key prefix ---------------------------


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


@pytest.fixture
def private_redis(tmp_path: Path) -> Iterator[str]:
    """A redis-server of this test's own (its URL, no database); stopped by its PID."""
    binary = shutil.which("redis-server")
    if binary is None:
        pytest.fail("redis-server is not on PATH (this test starts one of its own)", pytrace=False)
    port = _free_port()
    log_path = tmp_path / "redis-server.log"
    with log_path.open("wb") as log:
        server = subprocess.Popen(
            [binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly",
             "no", "--dir", str(tmp_path)],
            stdout=log,
            stderr=subprocess.STDOUT,
        )  # fmt: skip
    try:
        _wait_for_redis(server, port, log_path)
        yield f"redis://127.0.0.1:{port}"
    finally:
        server.terminate()  # SIGTERM to its PID
        try:
            server.wait(10)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait(10)


def _wait_for_redis(server: subprocess.Popen[bytes], port: int, log_path: Path) -> None:
    client = redis.Redis(port=port, socket_connect_timeout=1)
    deadline = time.monotonic() + 15
    try:
        while True:
            try:
                client.ping()
                return
            except redis.ConnectionError:
                if server.poll() is not None or time.monotonic() > deadline:
                    raise AssertionError(
                        f"redis-server on port {port} did not start:\n{log_path.read_text()}"
                    ) from None
                time.sleep(0.1)
    finally:
        client.close()


# -- RabbitMQ: a virtual host of the test's own, or a queue name of its own -------------


@dataclass(frozen=True)
class AmqpPlace:
    url: str  # the broker URL, of the private virtual host if there is one
    queue: str | None  # the producer queue; None: celery-node's default, `celery`
    queue_prefix: str  # the worker's CELERY_QUEUE_PREFIX


@pytest.fixture
def amqp_place(amqp_url: str) -> Iterator[AmqpPlace]:
    """A private virtual host, deleted afterwards; or, where rabbitmqctl cannot make one,
    the shared one with queue names of this test's own, deleted afterwards."""
    tag = f"t{uuid.uuid4().hex[:10]}"
    vhost = _private_vhost(amqp_url)
    if vhost is not None:
        try:
            yield AmqpPlace(_with_vhost(amqp_url, vhost), None, f"{tag}.")
        finally:
            _rabbitmqctl("delete_vhost", vhost)
        return
    place = AmqpPlace(amqp_url, f"{tag}.celery", f"{tag}.")
    try:
        yield place
    finally:
        ours = [f"{tag}.default", *(f"{tag}.shard.{n}" for n in range(SHARDS))]
        delete_amqp_queues(amqp_url, [*ours, f"{tag}.celery"])


def _with_vhost(url: str, vhost: str) -> str:
    return urlunsplit(urlsplit(url)._replace(path=f"/{vhost}"))


def _rabbitmqctl(*args: str) -> None:
    subprocess.run(
        ["rabbitmqctl", *args],
        capture_output=True,
        timeout=20,
        check=True,
        stdin=subprocess.DEVNULL,
    )


def _private_vhost(url: str) -> str | None:
    """A new virtual host on the RabbitMQ at ``url``, if rabbitmqctl can make one."""
    parts = urlsplit(url)
    if shutil.which("rabbitmqctl") is None or parts.hostname not in LOCAL_HOSTS:
        return None
    vhost = f"dnd-test-{uuid.uuid4().hex[:10]}"
    user = unquote(parts.username or "guest")
    try:
        _rabbitmqctl("add_vhost", vhost)
    except (OSError, subprocess.SubprocessError):
        return None  # e.g. not allowed to read the Erlang cookie
    try:
        _rabbitmqctl("set_permissions", "-p", vhost, user, ".*", ".*", ".*")
        _check_amqp(_with_vhost(url, vhost))  # the same server as the URL's
    except Exception:
        _rabbitmqctl("delete_vhost", vhost)
        return None
    return vhost


def _check_amqp(url: str) -> None:
    from kombu.connection import Connection

    with Connection(url) as conn:
        conn.ensure_connection(max_retries=1, timeout=5)


# -- the worker -----------------------------------------------------------------------


def worker_env(
    env: dict[str, str], broker: str, backend: str, queue_prefix: str = "t.", **extra: str
) -> dict[str, str]:
    """Settings of a worker whose broker and results are the producer's: no key prefix."""
    return {
        **env,
        "CELERY_BROKER_URL": broker,
        "CELERY_RESULT_BACKEND": backend,
        "CELERY_QUEUE_PREFIX": queue_prefix,
        "BACKUP_SHARDS": str(SHARDS),
        "BACKUP_SCHEDULE": "off",
        # The tests count what the task sent from Node stored; continuous backups
        # (on by default, tests/e2e/test_continuous.py) would store it first.
        "CONTINUOUS_BACKUP": "0",
        **extra,
    }


def _session(redis_client: redis.Redis, keys: Any, count: int) -> str:
    sid = write_session(redis_client, keys, session_fields())
    add_messages(redis_client, keys, sid, [message(sid, i) for i in range(count)])
    return sid


def _stored(conn: psycopg.Connection, session_id: str) -> int:
    row = conn.execute(
        "SELECT count(*) FROM client_messages WHERE session_id = %s", (session_id,)
    ).fetchone()
    assert row is not None
    return int(row[0])


def _assert_backed_up(answer: Any, session_id: str, messages: int, status: str = "completed"):
    assert answer["status"] == "SUCCESS", answer
    result = answer["result"]
    assert (result["session_id"], result["status"], result["messages"]) == (
        session_id,
        status,
        messages,
    )
    assert result["error"] is None
    assert result["shard"] == shard_of(session_id, SHARDS)
    # A one-session run like any other, named after the task celery-node sent.
    assert (result["run_id"], result["run_status"]) == (answer["task_id"], "completed")


# -- the tests --------------------------------------------------------------------------


def test_celery_node_with_its_defaults_on_redis(
    node, private_redis, env, workers, redis_client, keys, pg_conn
):
    broker, backend = f"{private_redis}/0", f"{private_redis}/1"
    celery = worker_env(env, broker, backend)
    worker = workers(celery, name="node")  # every queue: ours and `celery`
    sid, go_sid = _session(redis_client, keys, 25), _session(redis_client, keys, 7)

    answer = send_backup(node, broker, backend, sid)

    _assert_backed_up(answer, sid, 25)
    assert _stored(pg_conn, sid) == 25
    assert f"backup_session[{answer['task_id']}] received" in worker.log()
    [run] = runs(pg_conn)
    assert (run["id"], run["scope"], run["message_count"]) == (answer["task_id"], "session", 25)
    # celery-node pushed onto the list `celery`, as is: nothing is left in any queue.
    broker_redis = redis.Redis.from_url(broker)
    assert [k for k in broker_redis.keys("*") if broker_redis.type(k) == b"list"] == []
    broker_redis.close()

    # Protocol 1 (the task in the body, no headers) is what gocelery sends.
    _assert_backed_up(send_backup(node, broker, backend, go_sid, "--protocol", "1"), go_sid, 7)
    assert _stored(pg_conn, go_sid) == 7

    # Idempotent, whatever the queue it came by.
    _assert_backed_up(send_backup(node, broker, backend, sid), sid, 0, "unchanged")
    assert _stored(pg_conn, sid) == 25

    # The CLI's check that a worker consumes the session's shard still passes.
    run = cli_json(celery, "backup", "--session", sid)
    assert (run["scope"], run["status"]) == ("session", "completed")


def test_a_worker_of_the_producer_queue_alone_backs_up_any_session(
    node, private_redis, env, workers, redis_client, keys, pg_conn
):
    broker, backend = f"{private_redis}/0", f"{private_redis}/1"
    celery = worker_env(env, broker, backend)
    workers(celery, name="go-only", queues=["celery"])
    sid = _session(redis_client, keys, 12)

    # Not the session's shard queue: the session's lock in PostgreSQL, not the
    # queue, keeps two runs of one session apart, so this is safe.
    _assert_backed_up(send_backup(node, broker, backend, sid), sid, 12)
    assert _stored(pg_conn, sid) == 12

    # The CLI checks the queues our own tasks go to: `celery` is not one.
    done = run_cli(celery, "backup", "--session", sid, timeout=90)
    assert done.returncode == NO_WORKERS, describe(done)
    assert shard_queue(Settings.from_env(celery), shard_of(sid, SHARDS)) in done.stderr


def test_celery_node_on_rabbitmq_with_results_in_redis(
    node, private_redis, amqp_place, env, workers, redis_client, keys, pg_conn
):
    broker, backend = amqp_place.url, f"{private_redis}/1"
    extra, options = {}, []
    if amqp_place.queue is not None:  # no private virtual host: a queue of our own
        extra, options = {"CELERY_PRODUCER_QUEUES": amqp_place.queue}, ["--queue", amqp_place.queue]
    workers(worker_env(env, broker, backend, amqp_place.queue_prefix, **extra), name="node-amqp")
    sid, go_sid = _session(redis_client, keys, 9), _session(redis_client, keys, 4)

    _assert_backed_up(send_backup(node, broker, backend, sid, *options), sid, 9)
    _assert_backed_up(
        send_backup(node, broker, backend, go_sid, "--protocol", "1", *options), go_sid, 4
    )

    assert (_stored(pg_conn, sid), _stored(pg_conn, go_sid)) == (9, 4)
