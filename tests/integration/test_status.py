"""`dnd-client status` and the metrics: figures from rows written as the watcher and drains would.

The continuous watcher and drains (worker/watch.py, worker/continuous.py) write
continuous_pending, continuous_watcher and continuous_activity; here the test
writes those rows itself, against a real PostgreSQL, and reads the figures as
the status command and beat's metrics do. The workers' count is asked of a real
Redis broker.
"""

from __future__ import annotations

import math
import socket
import time
import urllib.request
import uuid

import pytest

from tests.factories import new_id
from worker import metrics
from worker.celery_health import count_workers
from worker.health import BEAT_KEY, Workers, assess, read_figures
from worker.lag import WATCHER_STALE_AFTER_S
from worker.pg_store import OWNER_LOCK_CLASS, PostgresStore
from worker.settings import Settings
from worker.sharding import shard_of


def pending(pg_conn, session_id, seconds_ago, shard=None):
    pg_conn.execute(
        "INSERT INTO continuous_pending (session_id, shard, changed_at) "
        "VALUES (%s, %s, now() - make_interval(secs => %s))",
        (session_id, shard_of(session_id, 8) if shard is None else shard, seconds_ago),
    )


def watcher(pg_conn, heartbeat_s_ago, notifications="on"):
    pg_conn.execute(
        "INSERT INTO continuous_watcher (node, heartbeat_at, notifications, last_sweep_at, "
        "last_sweep_sessions, last_sweep_seconds) "
        "VALUES ('w1@host', now() - make_interval(secs => %s), %s, now(), 42, 0.05) "
        "ON CONFLICT (id) DO UPDATE SET heartbeat_at = excluded.heartbeat_at",
        (heartbeat_s_ago, notifications),
    )


def full_backup(pg_conn, started_s_ago, finished_s_ago, status="completed", scope="all"):
    run_id = str(uuid.uuid4())
    pg_conn.execute(
        "INSERT INTO persistence_snapshots (id, kind, scope, status, created_at, finished_at, "
        "session_count, message_count) VALUES (%s, 'backup', %s, %s, "
        "now() - make_interval(secs => %s), now() - make_interval(secs => %s), 3, 30)",
        (run_id, scope, status, started_s_ago, finished_s_ago),
    )
    return run_id


def test_empty_database_nothing_ever_backed_up(settings):
    health = assess(read_figures(settings), settings, Workers(0))
    assert math.isinf(health.recovery_point_s)
    assert health.lag_exceeded
    assert health.pending_sessions == 0
    assert health.figures.last_full_backup is None
    assert not health.figures.beat_alive
    assert [s.shard for s in health.shards] == list(range(8))


def test_figures_from_the_rows(settings, pg_conn):
    a, b, c = new_id(), new_id(), new_id()
    pending(pg_conn, a, 30, shard=2)
    pending(pg_conn, b, 4, shard=2)
    pending(pg_conn, c, 9, shard=5)
    watcher(pg_conn, 1)
    full_backup(pg_conn, 7300, 7200)
    newest = full_backup(pg_conn, 700, 600, status="partial")
    full_backup(pg_conn, 100, 50, status="failed")  # not completed: does not count
    full_backup(pg_conn, 40, 30, scope="session")  # one session: not a full backup
    pg_conn.execute(
        "INSERT INTO persistence_snapshots (id, kind, scope, status) "
        "VALUES (%s, 'restore', 'all', 'running')",
        (str(uuid.uuid4()),),
    )
    pg_conn.execute(
        "INSERT INTO continuous_activity (minute, shard, backups, sessions, messages) VALUES "
        "(date_trunc('minute', now()) - interval '1 minute', 2, 3, 4, 50), "
        "(date_trunc('minute', now()), 2, 1, 1, 7), (date_trunc('minute', now()), 5, 2, 2, 9)"
    )
    pg_conn.execute(
        "INSERT INTO persistence_kept_records (kind, redis_key, raw, raw_sha256, preview, "
        "reason, resolved_at) SELECT 'message', 'k' || n, r, sha256(r), n::text, 'bad', "
        "CASE WHEN n = 3 THEN now() END "
        "FROM generate_series(1, 3) AS n, LATERAL (SELECT convert_to(n::text, 'UTF8') AS r) x"
    )
    health = assess(read_figures(settings), settings, Workers(1))

    assert health.recovery_point_s == pytest.approx(30, abs=2)
    by_shard = {s.shard: s for s in health.shards}
    assert by_shard[2].recovery_point_s == pytest.approx(30, abs=2)
    assert by_shard[5].recovery_point_s == pytest.approx(9, abs=2)
    assert by_shard[0].recovery_point_s == 0.0
    assert (by_shard[2].pending_sessions, by_shard[5].pending_sessions) == (2, 1)
    assert (by_shard[2].continuous_backups, by_shard[2].continuous_messages) == (4, 57)
    assert (by_shard[5].continuous_backups, by_shard[5].continuous_messages) == (2, 9)
    assert health.pending_sessions == 3
    assert health.figures.last_full_backup is not None
    assert health.figures.last_full_backup.id == newest
    assert health.last_full_backup_age_s == pytest.approx(600, abs=2)
    assert [r.kind for r in health.figures.running] == ["restore"]
    assert health.figures.open_kept_records == 2
    assert health.watcher_alive
    counts = {(c.kind, c.status): c.runs for c in health.figures.run_counts}
    assert counts[("backup", "completed")] == 2  # the one-session run too
    assert counts[("backup", "failed")] == 1


def test_a_stale_watcher_keeps_the_lag_rising(settings, pg_conn):
    watcher(pg_conn, WATCHER_STALE_AFTER_S + 5)
    first = assess(read_figures(settings), settings, Workers(0))
    assert not first.watcher_alive
    assert first.recovery_point_s == pytest.approx(WATCHER_STALE_AFTER_S + 5, abs=1)
    time.sleep(1.1)
    second = assess(read_figures(settings), settings, Workers(0))
    assert second.recovery_point_s >= first.recovery_point_s + 1


def test_continuous_off_the_last_full_backup_bounds_it(env, pg_conn):
    settings = Settings.from_env({**env, "CONTINUOUS_BACKUP": "0"})
    watcher(pg_conn, 1)
    full_backup(pg_conn, 1800, 1700)
    health = assess(read_figures(settings), settings, Workers(0))
    assert health.recovery_point_s == pytest.approx(1800, abs=2)


def test_beat_is_alive_while_its_lock_is_held(settings, database_url):
    from worker.connections import connect_postgres

    conn = connect_postgres(settings)
    try:
        assert PostgresStore(conn, settings).try_owner_lock(BEAT_KEY)
        assert read_figures(settings).beat_alive
    finally:
        conn.close()
    assert not read_figures(settings).beat_alive


def test_workers_are_counted_on_our_queues_only(env, redis_server_url):
    from celery import Celery

    from worker.celery_config import build_config

    tag = uuid.uuid4().hex[:8]
    settings = Settings.from_env(
        {**env, "CELERY_BROKER_URL": redis_server_url, "CELERY_KEY_PREFIX": f"t{tag}:",
         "CELERY_QUEUE_PREFIX": f"t{tag}."}
    )  # fmt: skip
    app = Celery("probe")
    app.conf.update(build_config(settings))
    assert count_workers(app, settings) == Workers(0)
    down = Settings.from_env({**env, "CELERY_BROKER_URL": "redis://127.0.0.1:1/0"})
    app_down = Celery("probe-down")
    app_down.conf.update(build_config(down))
    result = count_workers(app_down, down)
    assert result.count is None
    assert result.error is not None
    assert "cannot be reached" in result.error


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def scrape(port: int) -> dict[str, float]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as answer:
        text = answer.read().decode()
    return {
        line.rsplit(" ", 1)[0]: float(line.rsplit(" ", 1)[1])
        for line in text.splitlines()
        if line and not line.startswith("#")
    }


def test_the_metrics_server_serves_the_figures_at_scrape_time(env, pg_conn):
    port = free_port()
    settings = Settings.from_env({**env, "METRICS_PORT": str(port), "METRICS_ADDRESS": "127.0.0.1"})
    assert metrics.serve(settings, lambda: Workers(3))
    sid = new_id()
    pending(pg_conn, sid, 20, shard=1)
    watcher(pg_conn, 1)
    first = scrape(port)
    assert first["dnd_database_up"] == 1
    assert first["dnd_workers_up"] == 3
    assert first["dnd_broker_up"] == 1
    assert first['dnd_recovery_point_seconds{shard="1"}'] == pytest.approx(20, abs=2)
    assert first['dnd_pending_sessions{shard="1"}'] == 1
    assert first["dnd_watcher_up"] == 1
    time.sleep(1.1)
    second = scrape(port)
    assert (
        second['dnd_recovery_point_seconds{shard="1"}']
        >= first['dnd_recovery_point_seconds{shard="1"}'] + 1
    )
    # The port is taken now: a second server says so and does not raise.
    assert not metrics.serve(settings, lambda: Workers(0))


def test_metrics_with_postgresql_down_say_so(env):
    port = free_port()
    settings = Settings.from_env(
        {**env, "DATABASE_URL": "postgresql://postgres@127.0.0.1:1/x", "METRICS_PORT": str(port),
         "METRICS_ADDRESS": "127.0.0.1"}
    )  # fmt: skip
    assert metrics.serve(settings, lambda: Workers(None, "down"))
    figures = scrape(port)
    assert figures == {"dnd_database_up": 0, "dnd_workers_up": 0, "dnd_broker_up": 0}


def wait_until(predicate, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.1)


def test_beat_presence_holds_the_lock_warns_of_a_second_beat_and_reconnects(
    settings, pg_conn, caplog, monkeypatch
):
    from worker import beat_presence

    monkeypatch.setattr(beat_presence, "CHECK_INTERVAL_S", 0.2)
    first = beat_presence.BeatPresence(settings)
    second = beat_presence.BeatPresence(settings)
    try:
        first.start()
        assert first.holding.wait(10)
        assert read_figures(settings).beat_alive
        second.start()
        wait_until(lambda: "another beat holds the beat lock" in caplog.text)
        assert not second.holding.is_set()
        second.stop_event.set()
        second.join(5)

        # PostgreSQL drops the holder's connection: the lock goes with it, and
        # the thread takes it again on a new connection.
        pg_conn.execute(
            "SELECT pg_terminate_backend(l.pid) FROM pg_locks l "
            "WHERE l.locktype = 'advisory' AND l.granted AND l.classid = %s::oid "
            "AND l.objid = (hashtext(%s)::bigint & 4294967295)::oid "
            "AND l.database = (SELECT oid FROM pg_database WHERE datname = current_database())",
            (OWNER_LOCK_CLASS, BEAT_KEY),
        )
        wait_until(lambda: "PostgreSQL cannot be reached" in caplog.text)
        wait_until(lambda: read_figures(settings).beat_alive)
    finally:
        for presence in (first, second):
            presence.stop_event.set()
        first.join(5)
    assert not first.is_alive()
    assert not read_figures(settings).beat_alive
