"""`dnd-client status` as a probe, and beat's metrics endpoint, with real processes.

The continuous watcher (worker/watch.py) is not what is tested here: the test
writes the rows it would (its heartbeat, the sessions it saw changed) straight
into PostgreSQL, and looks at what the real `dnd-client status` process and
the real `celery -A worker beat` process make of them.
"""

from __future__ import annotations

import json
import re
import socket
import time
import urllib.request

from tests.e2e.cli_helpers import describe
from tests.factories import make_sessions, message, session_fields, write_session
from tests.processes import run_cli

LAG_EXCEEDED = 12
UNAVAILABLE = 5


def heartbeat(pg_conn, seconds_ago: float) -> None:
    """The watcher's row, as the active watcher writes it every 5 s."""
    pg_conn.execute(
        "INSERT INTO continuous_watcher (node, heartbeat_at, notifications) "
        "VALUES ('w1@host', now() - make_interval(secs => %s), 'on') "
        "ON CONFLICT (id) DO UPDATE SET heartbeat_at = excluded.heartbeat_at",
        (seconds_ago,),
    )


def changed(pg_conn, session_id: str, seconds_ago: float, shard: int = 0) -> None:
    """A session the watcher saw changed in Redis, not yet backed up."""
    pg_conn.execute(
        "INSERT INTO continuous_pending (session_id, shard, changed_at) "
        "VALUES (%s, %s, now() - make_interval(secs => %s)) ON CONFLICT DO NOTHING",
        (session_id, shard, seconds_ago),
    )


def status(env, *args):
    return run_cli(env, "status", *args, timeout=60)


def test_status_exits_non_zero_while_workers_are_stopped_and_writes_go_on(
    celery_env, workers, pg_conn, redis_client, keys
):
    sids = make_sessions(redis_client, keys, 3, 4)
    worker = workers(celery_env)
    done = run_cli(celery_env, "backup", "--all", timeout=120)
    assert done.returncode == 0, describe(done)
    heartbeat(pg_conn, 1)

    healthy = status(celery_env, "--max-lag", "5")
    assert healthy.returncode == 0, describe(healthy)
    assert "workers             1 alive" in healthy.stdout
    # 0 s here; with the continuous watcher running in the worker, what it
    # has seen and not yet drained (at most a few seconds).
    assert re.search(r"^recovery point      \d\.\d s \(target 5\.0 s\)$", healthy.stdout, re.M)

    worker.stop()
    # Writes go on: the application appends to a session; the watcher saw it
    # (3 s ago) and then its worker was stopped: its heartbeat is 20 s old.
    write_session(redis_client, keys, session_fields(sids[0]), [message(sids[0], 100)])
    changed(pg_conn, sids[0], 3)
    heartbeat(pg_conn, 20)

    probe = status(celery_env, "--max-lag", "5")
    assert probe.returncode == LAG_EXCEEDED, describe(probe)
    assert "is above --max-lag 5.0 s" in probe.stderr
    assert "workers             none alive" in probe.stdout
    payload = json.loads(status(celery_env, "--max-lag", "5", "-o", "json").stdout)
    assert payload["lag_exceeded"] is True
    assert payload["recovery_point_s"] >= 20
    assert payload["workers"]["alive"] == 0
    assert payload["pending_sessions"] >= 1
    assert payload["continuous"]["watcher_alive"] is False
    assert payload["last_full_backup"]["sessions"] == 3

    # A looser probe passes; the default (CONTINUOUS_MAX_LAG) is the setting's.
    assert status(celery_env, "--max-lag", "600").returncode == 0
    loose = {**celery_env, "CONTINUOUS_MAX_LAG": "600"}
    assert status(loose, "--no-workers").returncode == 0
    assert status(celery_env, "--no-workers").returncode == LAG_EXCEEDED


def test_status_with_postgresql_down_is_one_line_and_exit_5(celery_env):
    env = {**celery_env, "DATABASE_URL": "postgresql://postgres:s3cret-pw@127.0.0.1:1/x"}
    done = status(env)
    assert done.returncode == UNAVAILABLE, describe(done)
    assert done.stdout == ""
    [line] = done.stderr.splitlines()
    assert line.startswith("dnd-client: error: cannot reach PostgreSQL")
    assert "s3cret-pw" not in done.stderr


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def scrape(port: int) -> dict[str, float]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=15) as answer:
        text = answer.read().decode()
    return {
        line.rsplit(" ", 1)[0]: float(line.rsplit(" ", 1)[1])
        for line in text.splitlines()
        if line and not line.startswith("#")
    }


def wait_for_metrics(port: int, timeout: float = 30) -> dict[str, float]:
    deadline = time.monotonic() + timeout
    while True:
        try:
            return scrape(port)
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.2)


def test_beat_serves_the_lag_rising_while_no_worker_runs(celery_env, beats, pg_conn):
    port = free_port()
    env = {**celery_env, "METRICS_PORT": str(port), "METRICS_ADDRESS": "127.0.0.1"}
    beat = beats(env)
    # The watcher's last heartbeat was 30 s ago and it had seen a session
    # changed 40 s ago: every worker is dead, nobody backs it up.
    heartbeat(pg_conn, 30)
    changed(pg_conn, "2f1c0a7e-6a9e-4a2b-9f7e-2b1d4c3a5e60", 40, shard=2)

    first = wait_for_metrics(port)
    assert first["dnd_database_up"] == 1
    assert first["dnd_workers_up"] == 0
    assert first["dnd_broker_up"] == 1
    assert first["dnd_watcher_up"] == 0
    assert first['dnd_pending_sessions{shard="2"}'] == 1
    assert first['dnd_recovery_point_seconds{shard="2"}'] >= 40
    # The others: at least the heartbeat's age (nobody looks at Redis).
    assert first['dnd_recovery_point_seconds{shard="0"}'] >= 30
    assert first["dnd_recovery_point_target_seconds"] == 5
    # beat holds its lock: it says so (its thread takes it at start).
    deadline = time.monotonic() + 15
    while first["dnd_beat_up"] != 1 and time.monotonic() < deadline:
        time.sleep(0.5)
        first = scrape(port)
    assert first["dnd_beat_up"] == 1, beat.log()[-2000:]
    time.sleep(2)
    second = scrape(port)
    assert (
        second['dnd_recovery_point_seconds{shard="2"}']
        >= first['dnd_recovery_point_seconds{shard="2"}'] + 2
    )
    assert (
        second['dnd_recovery_point_seconds{shard="0"}']
        >= first['dnd_recovery_point_seconds{shard="0"}'] + 2
    )
    # `dnd-client status` sees beat alive, through its lock.
    payload = json.loads(status(celery_env, "--no-workers", "-o", "json").stdout)
    assert payload["beat"]["alive"] is True
    assert "metrics: serving http://127.0.0.1:" in beat.log()

    beat.stop()
    payload = json.loads(status(celery_env, "--no-workers", "-o", "json").stdout)
    assert payload["beat"]["alive"] is False


def test_beat_with_metrics_port_0_serves_nothing_and_still_runs(celery_env, beats, pg_conn):
    beat = beats({**celery_env, "METRICS_PORT": "0"})
    deadline = time.monotonic() + 20
    while "metrics: METRICS_PORT=0, not served" not in beat.log():
        assert time.monotonic() < deadline, beat.log()[-2000:]
        time.sleep(0.2)
    assert beat.alive()
