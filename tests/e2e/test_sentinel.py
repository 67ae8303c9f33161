"""Redis behind Sentinel: the data Redis, the broker and the result backend, through a failover.

Every test starts its own primary, two replicas (--replicaof) and three
sentinels (quorum 2) on free ports, and SIGKILLs the primary so the
sentinels promote a replica. The sentinels' down-after-milliseconds is 1 s
here: that is the test environment's sentinel configuration (an operator's
choice, 30 s by default), not a setting of ours. Our own timeouts and retries
keep their defaults.

Redis replication is asynchronous: what the old primary acknowledged but had
not yet sent to a replica is lost by Redis itself at a failover. The tests
write their sessions and wait until both replicas have them (WAIT) before the
failover, so "nothing lost" is about us, not about Redis.
"""

from __future__ import annotations

import contextlib
import json
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest
import redis

from tests.e2e.conftest import wait_for, wait_for_run
from tests.factories import make_sessions
from tests.processes import REPO, base_env, run_cli
from tests.servers import SentinelGroup
from worker.errors import ServiceUnavailable
from worker.keys import RedisKeys
from worker.services import redis_store
from worker.settings import Settings

MINUTE = 60
pytestmark = pytest.mark.timeout(2 * MINUTE)


@pytest.fixture
def group(tmp_path: Path) -> Iterator[SentinelGroup]:
    started = SentinelGroup(tmp_path / "sentinel")
    try:
        yield started
    finally:
        started.stop()


def _data_env(group: SentinelGroup, prefix: str) -> dict[str, str]:
    """The data Redis behind the sentinels; REDIS_URL's host is not used (only its db)."""
    return {
        "REDIS_URL": "redis://not-used.invalid:6379/0",
        "REDIS_SENTINELS": group.addresses,
        "REDIS_SENTINEL_MASTER": group.master,
        "REDIS_KEY_PREFIX": prefix,
    }


def _primary(group: SentinelGroup) -> redis.Redis:
    return redis.Redis(host="127.0.0.1", port=group.primary_port())


def _write_replicated(group: SentinelGroup, keys: RedisKeys, count: int, each: int) -> None:
    """Sessions on the primary, acknowledged by both replicas before anything else happens."""
    with contextlib.closing(_primary(group)) as client:
        make_sessions(client, keys, count, each)
        replicas = len(group.servers) - 1
        assert client.wait(replicas, 10_000) == replicas


def _fail_over(group: SentinelGroup) -> int:
    """SIGKILL the primary; returns the port of the replica the sentinels promote."""
    old = group.primary_port()
    group.server(old).kill()
    return int(wait_for(lambda: (p := group.primary_port()) != old and p, 30, 0.1, "a failover"))


def _redis_messages(group: SentinelGroup, keys: RedisKeys) -> int:
    with contextlib.closing(_primary(group)) as client:
        members: Any = client.smembers(keys.sessions)
        sessions = [m.decode() for m in members]
        return sum(int(client.zcard(keys.messages(sid))) for sid in sessions)


def test_the_data_client_follows_the_primary_across_a_failover(group, key_prefix):
    keys = RedisKeys(key_prefix)
    _write_replicated(group, keys, 20, 10)
    store = redis_store(Settings.from_env(_data_env(group, key_prefix)))
    before = sorted(m.decode() for m in store.session_members())
    assert len(before) == 20

    promoted = _fail_over(group)
    # The same client, connections to the dead primary and all: it asks the
    # sentinels again and reads from the promoted replica.
    after = sorted(m.decode() for m in store.session_members())
    probes = store.probe(after, {})
    assert after == before
    assert {p.message_count for p in probes.values()} == {10}
    store.client.set(f"{key_prefix}written-after", b"1")
    with contextlib.closing(redis.Redis(host="127.0.0.1", port=promoted)) as direct:
        assert direct.get(f"{key_prefix}written-after") == b"1"
    store.client.close()


def test_no_sentinel_answering_is_one_clear_line_naming_the_setting(tmp_path, key_prefix):
    from tests.servers import free_port

    env = {
        "REDIS_URL": "redis://:data-secret@x:6379/0",
        "REDIS_SENTINELS": f"127.0.0.1:{free_port()}",
        "REDIS_SENTINEL_MASTER": "nowhere",
        "REDIS_SENTINEL_PASSWORD": "sentinel-secret",
    }
    with pytest.raises(ServiceUnavailable) as info:
        redis_store(Settings.from_env(env))
    text = str(info.value)
    assert "\n" not in text
    assert "primary 'nowhere' of the sentinels 127.0.0.1:" in text
    assert text.endswith("check REDIS_SENTINELS")
    assert "secret" not in text


def test_backup_restore_and_verify_from_the_cli_behind_sentinel(group, env, key_prefix, pg_conn):
    """The CLI's --local runs reach the data through the sentinels, before and after a failover."""
    keys = RedisKeys(key_prefix)
    _write_replicated(group, keys, 5, 40)
    data = {**env, **_data_env(group, key_prefix)}
    assert run_cli(data, "backup", "--all", "--local").returncode == 0

    _fail_over(group)
    with contextlib.closing(_primary(group)) as client:
        client.delete(*client.keys(f"{key_prefix}*"))
    restored = run_cli(data, "restore", "--all", "--local", "--output", "json")
    assert restored.returncode == 0, restored.stderr
    answer = json.loads(restored.stdout)
    assert (answer["status"], answer["session_count"], answer["message_count"]) == (
        "completed",
        5,
        200,
    )
    verified = run_cli(data, "verify", "--all", "--local")
    assert verified.returncode == 0, verified.stdout + verified.stderr
    assert _redis_messages(group, keys) == 200


def _cli(env: dict[str, str], *args: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, str(REPO / "bin" / "dnd-client"), *args],
        cwd=REPO,
        env=base_env(env),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def _progress(conn: psycopg.Connection) -> tuple[str, int] | None:
    row = conn.execute(
        "SELECT s.id::text, (SELECT count(*) FROM persistence_session_results r "
        "WHERE r.snapshot_id = s.id) FROM persistence_snapshots s "
        "WHERE s.status = 'running' AND s.scope = 'all'"
    ).fetchone()
    return (str(row[0]), int(row[1])) if row else None


@pytest.mark.slow
def test_a_full_backup_through_a_failover_of_data_broker_and_results(
    group, celery_env, workers, beats, key_prefix, pg_conn
):
    sessions, each = 150, 200
    keys = RedisKeys(key_prefix)
    _write_replicated(group, keys, sessions, each)
    env = {
        **celery_env,
        **_data_env(group, key_prefix),
        # Broker and results in the same sentinel-managed Redis, databases 1 and 2.
        "CELERY_BROKER_URL": group.celery_url(1),
        "CELERY_RESULT_BACKEND": group.celery_url(2),
    }
    worker = workers(env, name="w1", concurrency=2)
    beat = beats(env)
    cli = _cli(env, "backup", "--all")

    run_id, reported = wait_for(
        lambda: (p := _progress(pg_conn)) and p[1] >= 10 and p, MINUTE, 0.05, "progress"
    )
    _fail_over(group)
    assert reported < sessions, "the failover came after the backup"

    # kombu 5.7's sentinel channel can crash a worker whose broker connection
    # drops ("Unrecoverable error: AttributeError: 'NoneType' object has no
    # attribute 'hostname'"): the worker exits, with a failure status, and its
    # process manager starts it again (the systemd unit's Restart=on-failure,
    # compose's restart: unless-stopped, Kubernetes). So does this test.
    started, exits = [worker], []
    deadline = time.monotonic() + 90
    while cli.poll() is None and time.monotonic() < deadline:
        if not worker.alive():
            exits.append(worker.proc.returncode)
            worker = workers(env, name=f"w{len(started) + 1}", concurrency=2)
            started.append(worker)
        time.sleep(0.2)
    _out, err = cli.communicate(timeout=5)
    logs = "".join(w.log() for w in started)
    run = wait_for_run(pg_conn, run_id, timeout=10)
    assert cli.returncode == 0, err + beat.log()[-3000:] + logs[-3000:]
    assert run["status"] == "completed", run
    assert all(code != 0 for code in exits), exits  # Restart=on-failure restarts it
    # The broker was behind the failover too: the worker lost it.
    assert "Connection to broker lost" in logs
    total = sessions * each
    assert _redis_messages(group, keys) == total
    rows, distinct = pg_conn.execute(
        "SELECT count(*), count(DISTINCT id) FROM client_messages"
    ).fetchone()
    assert (rows, distinct) == (total, total)
    results = pg_conn.execute(
        "SELECT count(*), count(DISTINCT session_id) FROM persistence_session_results "
        "WHERE snapshot_id = %s",
        (run_id,),
    ).fetchone()
    assert results == (sessions, sessions)
