"""Continuous protection with real processes: `celery -A worker worker` and beat.

A session written by a plain Redis client (no call into this package) reaches
PostgreSQL within CONTINUOUS_MAX_LAG; writes in a tight loop are coalesced into
a few backups; with keyspace notifications off and CONFIG refused the sweep
still finds changes within its (default) interval; a SIGKILLed worker's
continuous work is taken over; backup_session.delay asked 1,000 times gives a
handful of tasks. Tests whose workers must be allowed to CONFIG SET run on a
Redis of their own (the shared one is never reconfigured).
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

import psycopg
import pytest
import redis

from tests.e2e.conftest import wait_for
from tests.factories import message, session_fields, write_session
from tests.processes import CeleryProcess, run_python
from tests.servers import RedisServer
from worker.keys import RedisKeys
from worker.settings import Settings

pytestmark = pytest.mark.timeout(240)

DEFAULTS = Settings()


def _default_env(celery_env: dict[str, str], url: str) -> dict[str, str]:
    """The test's environment on a Redis of its own, every continuous setting at its default."""
    env = {**celery_env, "REDIS_URL": url}
    env.pop("CONTINUOUS_SET_NOTIFICATIONS", None)
    return env


def _stored(conn: psycopg.Connection[Any], sid: str) -> int:
    row = conn.execute(
        "SELECT count(*) FROM client_messages WHERE session_id = %s", (sid,)
    ).fetchone()
    assert row is not None
    return int(row[0])


def _stored_once(conn: psycopg.Connection[Any], sid: str) -> bool:
    return _stored(conn, sid) == 1


def _has_message(conn: psycopg.Connection[Any], message_id: str) -> bool:
    found = conn.execute("SELECT 1 FROM client_messages WHERE id = %s", (message_id,))
    return found.fetchone() is not None


def _watcher_active(conn: psycopg.Connection[Any]) -> dict[str, Any] | None:
    """The active watcher's row once it has finished its first sweep."""
    row = conn.execute(
        "SELECT node, notifications, last_sweep_at FROM continuous_watcher "
        "WHERE heartbeat_at > now() - interval '10 seconds' AND last_sweep_at IS NOT NULL"
    ).fetchone()
    return None if row is None else {"node": row[0], "notifications": row[1]}


def _backups(conn: psycopg.Connection[Any]) -> int:
    row = conn.execute("SELECT coalesce(sum(backups), 0) FROM continuous_activity").fetchone()
    assert row is not None
    return int(row[0])


def _new_session(client: redis.Redis | redis.cluster.RedisCluster, keys: RedisKeys) -> str:
    fields = session_fields()
    return write_session(client, keys, fields, [message(fields["id"], 0)])  # type: ignore[arg-type]


def _zadd(
    client: redis.Redis | redis.cluster.RedisCluster, keys: RedisKeys, sid: str, index: int
) -> str:
    """Write one message as the application does (ZADD + HSET updated_at); its ID."""
    data = message(sid, index)
    member = json.dumps(data, separators=(",", ":")).encode()
    pipe = client.pipeline(transaction=False)
    pipe.zadd(keys.messages(sid), {member: 1_770_890_400_000 + index * 1000})
    pipe.hset(keys.session(sid), "updated_at", data["created_at"])
    pipe.execute()
    return str(data["id"])


def test_a_message_written_by_a_plain_client_is_in_postgresql_within_the_max_lag(
    celery_env: dict[str, str],
    own_redis: RedisServer,
    workers: Callable[..., CeleryProcess],
    beats: Callable[..., CeleryProcess],
    pg_conn: psycopg.Connection[Any],
) -> None:
    env = _default_env(celery_env, own_redis.url())
    client = redis.Redis.from_url(own_redis.url())
    keys = RedisKeys(env["REDIS_KEY_PREFIX"])
    sid = _new_session(client, keys)
    worker = workers(env)
    beats(env)
    watcher = wait_for(lambda: _watcher_active(pg_conn), 60, message="an active watcher")
    # The server had notifications off: the watcher said so once and set them.
    assert watcher["notifications"] == "enabled"
    assert "notify-keyspace-events was ''; set it to 'Kzh'" in worker.log()
    assert set(client.config_get("notify-keyspace-events")["notify-keyspace-events"]) == set("Kzh")
    wait_for(lambda: _stored(pg_conn, sid) == 1, 30, message="the first message stored")

    lags = []
    for index in range(1, 6):
        written = time.monotonic()
        message_id = _zadd(client, keys, sid, index)
        wait_for(partial(_has_message, pg_conn, message_id), 30, 0.02, "the message stored")
        lags.append(time.monotonic() - written)
    assert max(lags) <= DEFAULTS.continuous_max_lag_s, lags
    # Continuous backups write no run record per session.
    runs = pg_conn.execute("SELECT count(*) FROM persistence_snapshots").fetchone()
    assert runs == (0,)
    assert worker.log().count("notify-keyspace-events was") == 1


def test_a_session_written_in_a_tight_loop_is_backed_up_a_few_times(
    celery_env: dict[str, str],
    own_redis: RedisServer,
    workers: Callable[..., CeleryProcess],
    pg_conn: psycopg.Connection[Any],
) -> None:
    env = _default_env(celery_env, own_redis.url())
    client = redis.Redis.from_url(own_redis.url())
    keys = RedisKeys(env["REDIS_KEY_PREFIX"])
    sid = _new_session(client, keys)
    workers(env, concurrency=2)
    wait_for(lambda: _watcher_active(pg_conn), 60, message="an active watcher")
    wait_for(lambda: _stored(pg_conn, sid) == 1, 30, message="the first message stored")
    before = _backups(pg_conn)

    written, index, deadline = 0, 1, time.monotonic() + 4
    while time.monotonic() < deadline:
        _zadd(client, keys, sid, index)
        index += 1
        written += 1
    in_redis = client.zcard(keys.messages(sid))
    assert in_redis == written + 1
    wait_for(lambda: _stored(pg_conn, sid) == in_redis, 30, message="every message stored")
    time.sleep(2)  # nothing more comes
    backups = _backups(pg_conn) - before
    # Thousands of writes in 4 s; a backup about every CONTINUOUS_MAX_LAG / 5
    # (1 s) while they go on, and the last one after.
    assert written > 500, written
    assert 1 <= backups <= 8, backups
    assert _stored(pg_conn, sid) == in_redis
    pending = pg_conn.execute("SELECT count(*) FROM continuous_pending").fetchone()
    assert pending == (0,)


def test_with_notifications_off_and_config_refused_the_sweep_finds_changes(
    celery_env: dict[str, str],
    tmp_path: Path,
    workers: Callable[..., CeleryProcess],
    pg_conn: psycopg.Connection[Any],
) -> None:
    # A managed Redis: no notifications, and CONFIG renamed away.
    server = RedisServer(tmp_path, "--notify-keyspace-events", "", "--rename-command", "CONFIG", "")
    try:
        env = _default_env(celery_env, server.url())
        client = redis.Redis.from_url(server.url())
        keys = RedisKeys(env["REDIS_KEY_PREFIX"])
        sid = _new_session(client, keys)
        worker = workers(env)
        watcher = wait_for(lambda: _watcher_active(pg_conn), 60, message="an active watcher")
        assert watcher["notifications"] == "off"
        assert "CONFIG is refused" in worker.log()
        wait_for(lambda: _stored(pg_conn, sid) == 1, 30, message="the first sweep's backup")

        # Written after the first sweep: only the next one (the default
        # interval after the first started) can find it.
        written = time.monotonic()
        message_id = _zadd(client, keys, sid, 1)
        bound = DEFAULTS.continuous_sweep_interval_s + DEFAULTS.continuous_max_lag_s
        wait_for(lambda: _has_message(pg_conn, message_id), bound + 5, 0.1, "the sweep's backup")
        lag = time.monotonic() - written
        assert lag <= bound, lag
        assert worker.log().count("CONFIG is refused") == 1
    finally:
        server.stop()


def test_a_subscription_dropped_and_notifications_forgotten_are_set_up_again(
    celery_env: dict[str, str],
    own_redis: RedisServer,
    workers: Callable[..., CeleryProcess],
    pg_conn: psycopg.Connection[Any],
) -> None:
    """What a quick Redis restart or a Sentinel failover does to the watcher: its
    subscription's connection drops and notify-keyspace-events is forgotten. The watcher
    must notice (an error here; redis-py subscribing again by itself where its client
    retries: tests/integration/test_watch_reconnect.py), set it again and sweep, not
    listen on to nothing."""
    env = _default_env(celery_env, own_redis.url())
    client = redis.Redis.from_url(own_redis.url())
    keys = RedisKeys(env["REDIS_KEY_PREFIX"])
    sid = _new_session(client, keys)
    worker = workers(env)
    wait_for(lambda: _watcher_active(pg_conn), 60, message="an active watcher")
    wait_for(lambda: _stored(pg_conn, sid) == 1, 30, message="the first backup")

    client.config_set("notify-keyspace-events", "")
    assert client.client_kill_filter(_type="pubsub") == 1
    wait_for(
        lambda: client.config_get("notify-keyspace-events")["notify-keyspace-events"] != "",
        10, 0.1, "the watcher to set notify-keyspace-events again",
    )  # fmt: skip
    assert worker.log().count("this worker's watcher is the active one") >= 2

    written = time.monotonic()
    sid = _new_session(client, keys)
    wait_for(lambda: _stored(pg_conn, sid) == 1, 30, 0.1, "the new session's backup")
    lag = time.monotonic() - written
    assert lag <= DEFAULTS.continuous_max_lag_s, lag


def test_a_worker_killed_while_continuous_backups_run_is_taken_over(
    celery_env: dict[str, str],
    own_redis: RedisServer,
    workers: Callable[..., CeleryProcess],
    beats: Callable[..., CeleryProcess],
    pg_conn: psycopg.Connection[Any],
) -> None:
    env = _default_env(celery_env, own_redis.url())
    client = redis.Redis.from_url(own_redis.url())
    keys = RedisKeys(env["REDIS_KEY_PREFIX"])
    sessions = [_new_session(client, keys) for _ in range(40)]
    first = workers(env, name="first")
    wait_for(lambda: _watcher_active(pg_conn), 60, message="an active watcher")
    second = workers(env, name="second")
    beats(env)

    stop = threading.Event()
    counts = {"written": 0}

    def write() -> None:
        writer = redis.Redis.from_url(own_redis.url())
        index = 1
        while not stop.is_set():
            for sid in sessions:
                _zadd(writer, keys, sid, index)
                counts["written"] += 1
            index += 1
            time.sleep(0.2)

    thread = threading.Thread(target=write, daemon=True)
    thread.start()
    try:
        time.sleep(5)
        assert _watcher_active(pg_conn)["node"].startswith("first@")
        first.kill()  # the worker with the active watcher, and its drains
        killed = time.monotonic()
        time.sleep(10)  # writes go on
    finally:
        stop.set()
        thread.join()

    total = sum(client.zcard(keys.messages(sid)) for sid in sessions)
    assert total == counts["written"] + len(sessions)

    def caught_up() -> bool:
        row = pg_conn.execute("SELECT count(*) FROM client_messages").fetchone()
        return row is not None and row[0] == total

    wait_for(caught_up, 60 - (time.monotonic() - killed), 0.2, "every message stored")
    assert time.monotonic() - killed <= 60
    watcher = wait_for(lambda: _watcher_active(pg_conn), 10, message="an active watcher")
    assert watcher["node"].startswith("second@")
    assert second.alive()


def test_a_thousand_backup_requests_for_one_session_give_a_handful_of_tasks(
    celery_env: dict[str, str],
    workers: Callable[..., CeleryProcess],
    redis_client: redis.Redis,
    keys: RedisKeys,
    pg_conn: psycopg.Connection[Any],
) -> None:
    # About explicit requests: continuous backups would also back the session up.
    env = {**celery_env, "CONTINUOUS_BACKUP": "0"}
    sid = _new_session(redis_client, keys)
    asking = f"""
import json, time
from worker.tasks import backup_session
ids = [backup_session.delay({sid!r}).id for _ in range(1000)]
print(json.dumps(ids))
"""
    # No worker yet: the first request is queued, the 999 others join it.
    queued = run_python(env, asking)
    assert len(set(queued)) == 1
    workers(env)
    answer = run_python(
        env,
        f"""
import json
from worker.tasks import backup_session
print(json.dumps(backup_session.AsyncResult({queued[0]!r}).get(timeout=60)))
""",
    )
    assert answer["session_id"] == sid
    assert answer["status"] == "completed"
    assert answer["run_id"] == queued[0]
    assert answer["run_status"] == "completed"

    # With the worker at work: a new task only once the queued one has started.
    started = time.monotonic()
    asked = run_python(env, asking)
    seconds = time.monotonic() - started
    distinct = list(dict.fromkeys(asked))
    results = run_python(
        env,
        f"""
import json
from worker.tasks import backup_session
print(json.dumps([backup_session.AsyncResult(i).get(timeout=60) for i in {distinct!r}]))
""",
    )
    assert all(r["session_id"] == sid for r in results)
    assert all(r["status"] in ("completed", "unchanged") for r in results)
    durations = [
        float(row[0])
        for row in pg_conn.execute(
            "SELECT extract(epoch FROM finished_at - created_at) FROM persistence_snapshots "
            "WHERE scope = 'session' ORDER BY created_at"
        )
    ]
    assert len(durations) == 1 + len(distinct)
    # At most one queued and one running: a task is queued only once the one
    # before has started, and (one worker process) starts once the one before
    # it has finished; so while the requests went on, at most one task per
    # execution time, plus the one queued and the one running.
    assert len(distinct) <= 2 + seconds / min(durations[1:]), (len(distinct), seconds, durations)
    assert len(distinct) <= 100


def test_continuous_backups_follow_a_redis_cluster(
    celery_env: dict[str, str],
    tmp_path: Path,
    workers: Callable[..., CeleryProcess],
    pg_conn: psycopg.Connection[Any],
) -> None:
    # A cluster publishes keyspace notifications per node: the watcher subscribes
    # to every primary (worker/watch_cluster.py) and sweeps when they change.
    from tests.cluster import redis_cluster

    with redis_cluster(tmp_path / "cluster", primaries=3, replicas=0) as cluster:
        env = {**_default_env(celery_env, cluster.url), "REDIS_CLUSTER": "1"}
        client = redis.cluster.RedisCluster.from_url(cluster.url)
        try:
            keys = RedisKeys(env["REDIS_KEY_PREFIX"])
            sessions = [_new_session(client, keys) for _ in range(12)]  # on every primary
            worker = workers(env)
            watcher = wait_for(lambda: _watcher_active(pg_conn), 60, message="an active watcher")
            assert watcher["notifications"] == "on"
            for sid in sessions:
                wait_for(partial(_stored_once, pg_conn, sid), 30, message="first message")
            lags = []
            for index, sid in enumerate(sessions, start=1):
                written = time.monotonic()
                message_id = _zadd(client, keys, sid, index)
                wait_for(partial(_has_message, pg_conn, message_id), 30, 0.02, "message stored")
                lags.append(time.monotonic() - written)
            assert max(lags) <= DEFAULTS.continuous_max_lag_s, lags
            # Found by the notifications of each primary, not by the 30 s sweep.
            assert "relying on the sweep" not in worker.log()
        finally:
            client.close()
