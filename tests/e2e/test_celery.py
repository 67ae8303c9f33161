"""Backups and restores through real `celery -A worker worker` processes.

Each test starts its own workers on its own queues (see conftest.celery_env),
against the real PostgreSQL, Redis and, where parametrised, RabbitMQ.
"""

from __future__ import annotations

import itertools
import json
import threading
import time

import psycopg
import pytest

from tests.e2e.conftest import runs, wait_for, wait_for_run
from tests.factories import add_messages, make_sessions, message, session_fields, write_session
from tests.processes import run_python
from worker.runs import cut_batches
from worker.sharding import shard_of


@pytest.fixture
def celery_env(celery_env: dict[str, str]) -> dict[str, str]:
    # These tests are about explicit and scheduled runs: what each run stores,
    # counts and reports. Continuous backups (on by default) would store the
    # same sessions first, and the runs would find them unchanged; they have
    # their own tests (tests/e2e/test_continuous.py).
    return {**celery_env, "CONTINUOUS_BACKUP": "0"}


def _message_counts(conn: psycopg.Connection) -> tuple[int, int]:
    row = conn.execute("SELECT count(*), count(DISTINCT id) FROM client_messages").fetchone()
    assert row is not None
    return int(row[0]), int(row[1])


def _task_ids(log: str, event: str, task: str = r"\w+") -> set[str]:
    """IDs of the tasks (a name pattern) a worker log says were received / succeeded."""
    import re

    return set(re.findall(rf"Task worker\.tasks\.{task}\[([0-9a-f-]+)\] {event}", log))


def test_backup_session_delay_from_application_code(
    broker, celery_env, workers, redis_client, keys, pg_conn
):
    sid = write_session(redis_client, keys, session_fields())
    add_messages(redis_client, keys, sid, [message(sid, i) for i in range(100)])
    worker = workers(celery_env, name="app")

    result = run_python(
        celery_env,
        f"""
import json
from worker.tasks import backup_session
print(json.dumps(backup_session.delay({sid!r}).get(timeout=60)))
""",
    )

    assert result["session_id"] == sid
    assert result["status"] == "completed"
    assert result["messages"] == 100
    assert result["error"] is None
    assert isinstance(result["duration_ms"], int)
    assert result["shard"] == shard_of(sid, int(celery_env["BACKUP_SHARDS"]))
    assert result["worker"].startswith(f"{worker.name}@")
    assert _message_counts(pg_conn) == (100, 100)
    # The call was a run of its own, recorded like any other.
    [run] = runs(pg_conn)
    assert run["id"] == result["run_id"]
    assert (run["scope"], run["status"], run["message_count"]) == ("session", "completed", 100)

    # Idempotent: the same call again stores nothing new.
    again = run_python(
        celery_env,
        f"""
import json
from worker.tasks import backup_session
print(json.dumps(backup_session.delay({sid!r}).get(timeout=60)))
""",
    )
    assert (again["status"], again["messages"]) == ("unchanged", 0)
    assert _message_counts(pg_conn) == (100, 100)


def test_delay_refuses_a_session_id_that_is_not_a_uuid(celery_env):
    result = run_python(
        celery_env,
        """
import json
from worker.errors import InvalidArgument
from worker.tasks import backup_session
try:
    backup_session.delay("*")
except InvalidArgument as exc:
    print(json.dumps({"refused": str(exc)}))
""",
    )
    assert "UUID" in result["refused"]


def test_full_backup_chord_writes_a_completed_snapshot(
    broker, celery_env, workers, redis_client, keys, pg_conn
):
    make_sessions(redis_client, keys, 23, 7)
    workers(celery_env, concurrency=2)

    answer = run_python(
        celery_env,
        """
import json
from worker.tasks import full_backup
print(json.dumps(full_backup.delay().get(timeout=60)))
""",
    )
    assert answer["status"] == "running"
    # 23 sessions in batches of at most 5 per shard: several chord members.
    assert answer["batches"] >= 5

    run = wait_for_run(pg_conn, answer["run_id"])
    assert run["status"] == "completed"
    assert (run["session_count"], run["message_count"]) == (23, 161)
    assert run["details"]["dispatched"] is True
    assert _message_counts(pg_conn) == (161, 161)
    results = pg_conn.execute(
        "SELECT count(*), sum(messages) FROM persistence_session_results WHERE snapshot_id = %s",
        (run["id"],),
    ).fetchone()
    assert results == (23, 161)


def test_full_backup_with_bad_records_is_partial_not_failed(
    celery_env, workers, redis_client, keys, pg_conn
):
    good = make_sessions(redis_client, keys, 3, 4)
    add_messages(redis_client, keys, good[0], [b"{not json"], score=1)
    redis_client.sadd(keys.sessions, "not-a-uuid")
    workers(celery_env)

    answer = run_python(
        celery_env,
        """
import json
from worker.tasks import full_backup
print(json.dumps(full_backup.delay().get(timeout=60)))
""",
    )
    run = wait_for_run(pg_conn, answer["run_id"])
    assert run["status"] == "partial"
    assert run["kept_count"] == 2
    assert run["message_count"] == 12
    kept = pg_conn.execute("SELECT kind FROM persistence_kept_records ORDER BY kind").fetchall()
    assert kept == [("message",), ("session_id",)]


def test_full_restore_through_workers(celery_env, workers, redis_client, keys, pg_conn):
    ids = make_sessions(redis_client, keys, 12, 6)
    workers(celery_env, concurrency=2)
    answer = run_python(
        celery_env,
        """
import json
from worker.tasks import full_backup
print(json.dumps(full_backup.delay().get(timeout=60)))
""",
    )
    wait_for_run(pg_conn, answer["run_id"])
    redis_client.delete(
        *[keys.session(i) for i in ids], *[keys.messages(i) for i in ids], keys.sessions
    )

    answer = run_python(
        celery_env,
        """
import json
from worker.tasks import full_restore
print(json.dumps(full_restore.delay().get(timeout=60)))
""",
    )
    run = wait_for_run(pg_conn, answer["run_id"], kind="restore")
    assert (run["status"], run["session_count"], run["message_count"]) == ("completed", 12, 72)
    assert {m.decode() for m in redis_client.smembers(keys.sessions)} == set(ids)
    assert all(redis_client.zcard(keys.messages(i)) == 6 for i in ids)


def test_two_workers_both_work_and_a_sessions_shard_never_changes(
    celery_env, workers, redis_client, keys, pg_conn
):
    ids = make_sessions(redis_client, keys, 40, 3)
    first = workers(celery_env, name="one")
    second = workers(celery_env, name="two")
    shards = int(celery_env["BACKUP_SHARDS"])

    def full(full_scan: bool) -> dict:
        answer = run_python(
            celery_env,
            f"""
import json
from worker.tasks import full_backup
print(json.dumps(full_backup.delay(full={full_scan}).get(timeout=60)))
""",
        )
        return wait_for_run(pg_conn, answer["run_id"])

    runs_done = [full(False), full(True)]
    for run in runs_done:
        assert run["status"] == "completed"
        rows = pg_conn.execute(
            "SELECT session_id::text, shard, worker FROM persistence_session_results "
            "WHERE snapshot_id = %s",
            (run["id"],),
        ).fetchall()
        assert len(rows) == 40
        for session_id, shard, _worker in rows:
            assert shard == shard_of(session_id, shards)
        names = {worker.split("@")[0] for _sid, _shard, worker in rows}
        assert names == {first.name, second.name}, "both workers should have taken batches"
    assert set(ids) == {
        r[0] for r in pg_conn.execute("SELECT id::text FROM client_sessions").fetchall()
    }


def test_sigkill_mid_full_backup_loses_nothing(celery_env, workers, redis_client, keys, pg_conn):
    # Short limits so that a task taken by the killed worker comes back fast. The
    # defaults' path (the 30-minute visibility timeout untouched, the batch sent
    # again by the supervisor) is tests/e2e/test_faults.py's and test_hosts.py's.
    env = {
        **celery_env,
        "BROKER_VISIBILITY_TIMEOUT": "12",
        "TASK_SOFT_TIME_LIMIT": "8",
        "TASK_TIME_LIMIT": "10",
        "STALE_RUN_AFTER": "600",
        "BACKUP_BATCH_SESSIONS": "6",
    }
    make_sessions(redis_client, keys, 60, 400)
    victim = workers(env, name="victim")
    survivor = workers(env, name="survivor")

    answer = run_python(
        env,
        """
import json
from worker.tasks import full_backup
print(json.dumps(full_backup.delay().get(timeout=60)))
""",
    )
    run_id = answer["run_id"]

    # Kill the victim (the worker and its pool process, no goodbye) while it
    # is in the middle of a batch of the run: received, not finished. (Only the
    # run's batches: a continuous drain the victim was running comes back on its
    # own time, and the run does not wait for it.)
    def cut_short_batches() -> set[str]:
        log = victim.log()
        return _task_ids(log, "received", "backup_batch") - _task_ids(log, "succeeded")

    wait_for(lambda: bool(cut_short_batches()), 60, interval=0.01,
             message="the victim to take a batch")  # fmt: skip
    victim.kill()
    assert survivor.alive()
    # The batch the victim was running when it died (received, never finished).
    cut_short = cut_short_batches()
    assert cut_short, "the victim was killed between tasks; nothing was in flight"

    # Whatever the victim held comes back after the visibility timeout; the
    # run completes on the survivor.
    run = wait_for_run(pg_conn, run_id, timeout=120)
    assert run["status"] == "completed", run
    assert _message_counts(pg_conn) == (24_000, 24_000)
    assert cut_short <= _task_ids(survivor.log(), "succeeded")

    # A worker is back, a backup runs again: still every message exactly once.
    workers(env, name="back")
    answer = run_python(
        env,
        """
import json
from worker.tasks import full_backup
print(json.dumps(full_backup.delay(full=True).get(timeout=60)))
""",
    )
    run = wait_for_run(pg_conn, answer["run_id"], timeout=120)
    assert run["status"] == "completed"
    assert _message_counts(pg_conn) == (24_000, 24_000)


def test_postgres_unreachable_for_a_moment_is_retried(
    celery_env, workers, redis_client, keys, pg_conn, database_url
):
    from urllib.parse import urlsplit, urlunsplit

    from tests.proxy import TcpProxy

    target = urlsplit(database_url)
    proxy = TcpProxy(target.hostname or "127.0.0.1", target.port or 5432)
    try:
        netloc = target.netloc.rsplit("@", 1)
        auth = netloc[0] + "@" if len(netloc) == 2 else ""
        proxied = urlunsplit(target._replace(netloc=f"{auth}127.0.0.1:{proxy.port}"))
        env = {**celery_env, "DATABASE_URL": proxied, "BACKUP_BATCH_SESSIONS": "2"}
        make_sessions(redis_client, keys, 80, 300)
        worker = workers(env, concurrency=2)

        answer = run_python(
            env,
            """
import json
from worker.tasks import full_backup
print(json.dumps(full_backup.delay().get(timeout=60)))
""",
        )
        wait_for(
            lambda: (
                pg_conn.execute(
                    "SELECT count(*) FROM persistence_session_results WHERE snapshot_id = %s",
                    (answer["run_id"],),
                ).fetchone()[0]
                > 0
            ),
            60,
            message="the run to start",
        )
        with proxy.outage():
            time.sleep(3)
        run = wait_for_run(pg_conn, answer["run_id"], timeout=180)
        assert run["status"] == "completed", run
        assert run["message_count"] == 24_000
        assert _message_counts(pg_conn) == (24_000, 24_000)
        # The outage did hit work in flight, which was retried.
        assert "retry: Retry in" in worker.log()
        assert proxy.refused > 0
    finally:
        proxy.close()


def test_a_backup_waits_for_a_restore_of_the_same_session(
    celery_env, workers, redis_client, keys, pg_conn, database_url
):
    """The per-session lock lives in PostgreSQL, shared by every worker on every host."""
    sid = write_session(redis_client, keys, session_fields())
    add_messages(redis_client, keys, sid, [message(sid, i) for i in range(10)])
    workers(celery_env, concurrency=2)

    # Hold the session's lock the way a restore of it does, from outside.
    holder = psycopg.connect(database_url)
    holder.execute("SELECT pg_advisory_xact_lock(1684956267, hashtext(%s))", (sid,))
    outcome: dict = {}

    def call() -> None:
        outcome["result"] = run_python(
            celery_env,
            f"""
import json
from worker.tasks import backup_session
print(json.dumps(backup_session.delay({sid!r}).get(timeout=60)))
""",
        )
        outcome["at"] = time.monotonic()

    thread = threading.Thread(target=call)
    thread.start()
    time.sleep(4)
    assert "result" not in outcome, "the backup ran while the session was locked"
    assert _message_counts(pg_conn) == (0, 0)
    released = time.monotonic()
    holder.rollback()
    holder.close()
    thread.join(60)
    assert outcome["result"]["status"] == "completed"
    assert outcome["at"] >= released
    assert _message_counts(pg_conn) == (10, 10)


def test_beat_starts_repeated_runs_that_never_overlap(
    celery_env, workers, beats, redis_client, keys, pg_conn
):
    env = {**celery_env, "BACKUP_SCHEDULE": "1"}
    make_sessions(redis_client, keys, 30, 200)
    workers(env, concurrency=2)
    # Two beat processes started by mistake: still one run at a time.
    beats(env, name="beat-a")
    beats(env, name="beat-b")

    def keep_writing() -> None:
        # New messages keep arriving, so every run has work to do.
        sid = redis_client.srandmember(keys.sessions).decode()
        for i in range(40):
            add_messages(redis_client, keys, sid, [message(sid, 10_000 + i)])
            time.sleep(0.2)

    writer = threading.Thread(target=keep_writing)
    writer.start()
    wait_for(
        lambda: len([r for r in runs(pg_conn) if r["status"] != "running"]) >= 3,
        90,
        message="three finished beat runs",
    )
    writer.join()

    finished = [r for r in runs(pg_conn) if r["status"] != "running"]
    assert all(r["status"] == "completed" for r in finished), finished
    assert all(r["details"].get("trigger") == "beat" for r in finished)
    spans = sorted((r["created_at"], r["finished_at"]) for r in finished)
    for (_start, end), (next_start, _end) in itertools.pairwise(spans):
        assert next_start >= end, f"runs overlap: {spans}"


def test_cli_through_workers(celery_env, workers, redis_client, keys, pg_conn):
    from tests.processes import run_cli

    ids = make_sessions(redis_client, keys, 9, 5)
    workers(celery_env, concurrency=2)

    done = run_cli(celery_env, "backup", "--all", "--output", "json")
    assert done.returncode == 0, done.stderr
    summary = json.loads(done.stdout)
    assert (summary["status"], summary["session_count"], summary["message_count"]) == (
        "completed",
        9,
        45,
    )
    assert summary["details"]["mode"] == "celery"

    done = run_cli(celery_env, "backup", "--session", ids[0], "-o", "json")
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["scope"] == "session"

    done = run_cli(celery_env, "restore", "--all", "--no-wait", "-o", "json")
    assert done.returncode == 0, done.stderr
    queued = json.loads(done.stdout)
    run = wait_for_run(pg_conn, queued["run_id"], kind="restore")
    # Everything exists in Redis already: skipped, not replaced.
    assert (run["status"], run["message_count"]) == ("completed", 0)


def test_cli_without_workers_fails_fast_with_a_hint(celery_env):
    from tests.processes import run_cli

    started = time.monotonic()
    done = run_cli(celery_env, "backup", "--all", timeout=60)
    elapsed = time.monotonic() - started
    assert done.returncode == 6, (done.stdout, done.stderr)
    assert "celery -A worker worker" in done.stderr
    assert len(done.stderr.strip().splitlines()) == 1
    assert elapsed < 30


@pytest.mark.parametrize("kind", ["backup", "restore"])
def test_cli_with_the_broker_down_says_which_setting(celery_env, kind):
    from tests.processes import run_cli

    env = {**celery_env, "CELERY_BROKER_URL": "redis://:s3cret@127.0.0.1:1/0"}
    done = run_cli(env, kind, "--all", timeout=60)
    assert done.returncode == 5, (done.stdout, done.stderr)
    assert "CELERY_BROKER_URL" in done.stderr
    assert "s3cret" not in done.stderr + done.stdout


@pytest.mark.parametrize("place", ["first", "last"])
def test_a_batch_that_fails_for_good_marks_the_run_failed(
    celery_env, workers, redis_client, keys, pg_conn, database_url, place
):
    """The chord's error path: the callback never runs; the batch's task fails its session.

    Celery calls the chord's errback (fail_run) before the failing task's own
    on_failure; the session's error must be the batch's, whichever batch it is
    in (the errback once took the first batch for the failed one).
    """
    env = {
        **celery_env,
        # Short, to fail for good within seconds; the default timeouts reaching
        # every connection: test_error_texts.py::test_the_default_timeouts_reach_every_connection.
        "DATABASE_LOCK_TIMEOUT_MS": "300",
        "TASK_MAX_RETRIES": "1",
        "BACKUP_BATCH_SESSIONS": "1",
    }
    ids = make_sessions(redis_client, keys, 6, 3)
    batches = cut_batches(sorted(ids), int(env["BACKUP_SHARDS"]), 1)
    locked = batches[0 if place == "first" else -1].session_ids[0]
    workers(env, concurrency=2)
    # One session's lock held all along: its batch times out waiting, is
    # retried once, then fails for good. The other batches complete.
    holder = psycopg.connect(database_url)
    holder.execute("SELECT pg_advisory_xact_lock(1684956267, hashtext(%s))", (locked,))
    try:
        answer = run_python(
            env,
            """
import json
from worker.tasks import full_backup
print(json.dumps(full_backup.delay().get(timeout=60)))
""",
        )
        run = wait_for_run(pg_conn, answer["run_id"], timeout=120)
    finally:
        holder.rollback()
        holder.close()
    assert run["status"] == "failed"
    assert "batch task" in run["error"]
    assert "LockTimeout" in run["error"]
    stored = {r[0] for r in pg_conn.execute("SELECT id::text FROM client_sessions")}
    assert stored == set(ids) - {locked}


def test_a_run_abandoned_by_a_crash_is_marked_failed(celery_env, workers, pg_conn):
    workers(celery_env)
    pg_conn.execute(
        "INSERT INTO persistence_snapshots (id, kind, scope, created_at) "
        "VALUES (gen_random_uuid(), 'backup', 'all', now() - interval '3 hours')"
    )
    pg_conn.execute(
        "INSERT INTO persistence_snapshots (id, kind, scope) "
        "VALUES (gen_random_uuid(), 'restore', 'all')"
    )
    swept = run_python(
        celery_env,
        """
import json
from worker.tasks import fail_stale_runs
print(json.dumps(fail_stale_runs.delay().get(timeout=60)))
""",
    )
    assert len(swept) == 1
    statuses = dict(pg_conn.execute("SELECT kind, status FROM persistence_snapshots").fetchall())
    assert statuses == {"backup": "failed", "restore": "running"}
    error = pg_conn.execute(
        "SELECT error FROM persistence_snapshots WHERE kind = 'backup'"
    ).fetchone()[0]
    assert "abandoned" in error
