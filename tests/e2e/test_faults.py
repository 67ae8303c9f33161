"""Faults, with the settings a user gets: every run ends promptly, whatever dies.

Each test kills or cuts off one part of the system in the middle of a run and
checks that the run ends (completed, or failed saying why) within about a
minute, that nothing is lost or stored twice, that the next run is not
blocked, and which mechanism recovered it: the supervisor (beat's
supervise_runs, or a waiting CLI) sending lost batches again, or a run's
owner lock telling that its process is gone. No timeout is shortened: with
the defaults, a task of a dead worker comes back on the Redis broker only
after BROKER_VISIBILITY_TIMEOUT (30 minutes), so a run that completes here in
a minute was revived by the supervisor.
"""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path

import psycopg
import pytest

from tests.e2e.conftest import wait_for, wait_for_run
from tests.factories import make_sessions
from tests.processes import REPO, base_env, run_python
from tests.proxy import TcpProxy
from tests.servers import redis_server

MINUTE = 60
# A test here waits for recovery that takes up to a minute, on top of its run.
pytestmark = pytest.mark.timeout(5 * MINUTE)


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


def _results(conn: psycopg.Connection, run_id: str) -> int:
    row = conn.execute(
        "SELECT count(*) FROM persistence_session_results WHERE snapshot_id = %s", (run_id,)
    ).fetchone()
    assert row is not None
    return int(row[0])


def _start_full_backup(env: dict[str, str]) -> str:
    answer = run_python(
        env,
        """
import json
from worker.tasks import full_backup
print(json.dumps(full_backup.delay().get(timeout=60)))
""",
    )
    assert answer["status"] == "running", answer
    return str(answer["run_id"])


def _cli(env: dict[str, str], *args: str) -> subprocess.Popen[str]:
    """`dnd-client ARGS` in the background, as a user starts it."""
    return subprocess.Popen(
        [sys.executable, str(REPO / "bin" / "dnd-client"), *args],
        cwd=REPO,
        env=base_env(env),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def _running_run(conn: psycopg.Connection, reported: int = 1) -> str:
    """The ID of the running full backup, once ``reported`` sessions have a result."""

    def found() -> str | None:
        row = conn.execute(
            "SELECT s.id::text, (SELECT count(*) FROM persistence_session_results r "
            "WHERE r.snapshot_id = s.id) FROM persistence_snapshots s "
            "WHERE s.status = 'running' AND s.scope = 'all'"
        ).fetchone()
        return row[0] if row and row[1] >= reported else None

    return str(wait_for(found, MINUTE, interval=0.05, message="a running run with progress"))


def _kill_mid_batch(victim) -> None:
    """SIGKILL the worker (and its pool) while it is in the middle of a long batch.

    A batch has been in flight for a while: it is at work, not committing (the
    run needs a batch that takes seconds: see _sessions_with_a_long_one).
    """
    import re

    first_seen: dict[str, float] = {}

    def long_in_flight() -> bool:
        log = victim.log()
        received = set(re.findall(r"Task worker\.tasks\.\w+\[([0-9a-f-]+)\] received", log))
        done = set(re.findall(r"Task worker\.tasks\.\w+\[([0-9a-f-]+)\] succeeded", log))
        now = time.monotonic()
        return any(now - first_seen.setdefault(t, now) > 0.3 for t in received - done)

    wait_for(long_in_flight, MINUTE, interval=0.02, message="the victim to be in a long batch")
    victim.kill()


def _sessions_with_a_long_one(redis_client, keys) -> int:
    """60 sessions of 500 messages and one of 100,000 (a batch of seconds); the total."""
    make_sessions(redis_client, keys, 60, 500)
    make_sessions(redis_client, keys, 1, 100_000)
    return 60 * 500 + 100_000


def _revived(*logs: str) -> bool:
    """Whether the supervisor sent a batch again (the mechanism that beat the 30 minutes)."""
    return any("sent again" in log or "sending again" in log for log in logs)


# -- a worker dies ------------------------------------------------------------------


@pytest.mark.slow
def test_a_dead_workers_batches_resume_within_a_minute(
    broker, celery_env, workers, beats, redis_client, keys, pg_conn
):
    total = _sessions_with_a_long_one(redis_client, keys)
    victim = workers(celery_env, name="victim", concurrency=2)
    beat = beats(celery_env)
    run_id = _start_full_backup(celery_env)

    _kill_mid_batch(victim)
    died = time.monotonic()
    survivor = workers(celery_env, name="survivor")
    run = wait_for_run(pg_conn, run_id, timeout=MINUTE)
    recovered = time.monotonic() - died
    # The figure of the README's Reliability section (pytest -s shows it).
    print(f"\n{broker}: worker SIGKILLed -> run completed in {recovered:.1f} s")

    assert run["status"] == "completed", run
    assert run["session_count"] == 61
    assert _message_counts(pg_conn) == (total, total)
    assert recovered < MINUTE
    if broker == "redis":
        # Not the visibility timeout (30 minutes): the supervisor.
        assert _revived(beat.log(), survivor.log()), survivor.log()[-3000:]


@pytest.mark.slow
def test_a_waiting_cli_revives_a_dead_workers_run_without_beat(
    celery_env, workers, redis_client, keys, pg_conn
):
    total = _sessions_with_a_long_one(redis_client, keys)
    victim = workers(celery_env, name="victim", concurrency=2)
    cli = _cli(celery_env, "backup", "--all")
    _kill_mid_batch(victim)
    workers(celery_env, name="survivor")

    _out, err = cli.communicate(timeout=2 * MINUTE)
    assert cli.returncode == 0, err
    assert "sending again" in err
    assert _message_counts(pg_conn) == (total, total)


def test_the_cli_stops_waiting_when_no_worker_is_left(
    celery_env, workers, redis_client, keys, pg_conn
):
    make_sessions(redis_client, keys, 60, 1000)
    victim = workers(celery_env, name="victim")
    cli = _cli(celery_env, "backup", "--all")
    run_id = _running_run(pg_conn, reported=5)
    victim.kill()

    _out, err = cli.communicate(timeout=MINUTE)
    assert cli.returncode == 6, err
    [line] = err.strip().splitlines()[-1:]
    assert "no Celery worker is consuming" in line
    assert f"run {run_id} waits for one" in line


# -- a --local run dies ---------------------------------------------------------------


def test_sigterm_of_a_local_run_marks_it_failed_and_the_next_starts(
    env, redis_client, keys, pg_conn
):
    make_sessions(redis_client, keys, 300, 300)
    cli = _cli(env, "backup", "--all", "--local")
    run_id = _running_run(pg_conn)
    cli.send_signal(signal.SIGTERM)
    stopped = time.monotonic()
    _out, err = cli.communicate(timeout=30)
    assert cli.returncode == 143, err
    assert time.monotonic() - stopped < 10
    assert "terminated (SIGTERM)" in err

    row = pg_conn.execute(
        "SELECT status, error FROM persistence_snapshots WHERE id = %s", (run_id,)
    ).fetchone()
    assert row[0] == "failed"
    assert "SIGTERM" in row[1]
    again = _cli(env, "backup", "--all", "--local")
    _out, err = again.communicate(timeout=2 * MINUTE)
    assert again.returncode == 0, err
    assert _message_counts(pg_conn) == (90_000, 90_000)


def test_a_killed_local_run_is_found_abandoned_by_the_next(env, redis_client, keys, pg_conn):
    make_sessions(redis_client, keys, 300, 300)
    cli = _cli(env, "backup", "--all", "--local")
    run_id = _running_run(pg_conn)
    cli.kill()  # SIGKILL: no goodbye, the run stays `running`
    killed_at = pg_conn.execute("SELECT clock_timestamp()").fetchone()[0]
    cli.communicate(timeout=30)
    assert pg_conn.execute(
        "SELECT status FROM persistence_snapshots WHERE id = %s", (run_id,)
    ).fetchone() == ("running",)

    again = _cli(env, "backup", "--all", "--local")
    _out, err = again.communicate(timeout=2 * MINUTE)
    assert again.returncode == 0, err
    status, error = pg_conn.execute(
        "SELECT status, error FROM persistence_snapshots WHERE id = %s", (run_id,)
    ).fetchone()
    assert status == "failed"
    assert error.startswith("abandoned: local@")
    assert _message_counts(pg_conn) == (90_000, 90_000)
    (next_started,) = pg_conn.execute(
        "SELECT min(created_at) FROM persistence_snapshots WHERE id <> %s", (run_id,)
    ).fetchone()
    # The figure of the README's Reliability section (pytest -s shows it).
    waited = (next_started - killed_at).total_seconds()
    print(f"\n--local run SIGKILLed -> the next run started {waited:.1f} s later")


def test_a_local_run_whose_connections_are_terminated_does_not_block_the_next(
    env, redis_client, keys, pg_conn, database_url
):
    make_sessions(redis_client, keys, 300, 300)
    cli = _cli(env, "backup", "--all", "--local")
    run_id = _running_run(pg_conn)
    dbname = database_url.rsplit("/", 1)[1]
    # What a failover does to every connection of the run.
    pg_conn.execute(
        "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
        "WHERE datname = %s AND application_name = 'dnd-client-worker'",
        (dbname,),
    )
    _out, err = cli.communicate(timeout=MINUTE)
    assert cli.returncode == 5, err
    assert "cannot reach PostgreSQL" in err

    again = _cli(env, "backup", "--all", "--local")
    _out, err = again.communicate(timeout=2 * MINUTE)
    assert again.returncode == 0, err
    status = pg_conn.execute(
        "SELECT status FROM persistence_snapshots WHERE id = %s", (run_id,)
    ).fetchone()[0]
    assert status == "failed"


# -- the broker or the result backend loses its state ------------------------------------


@pytest.mark.slow
def test_a_broker_restarted_without_its_queues_does_not_leave_the_run_hanging(
    celery_env, workers, beats, redis_client, keys, pg_conn, tmp_path: Path
):
    with redis_server(tmp_path) as broker:
        env = {**celery_env, "CELERY_BROKER_URL": broker.url(0), "BACKUP_BATCH_SESSIONS": "1"}
        make_sessions(redis_client, keys, 200, 200)
        worker = workers(env, concurrency=1)
        beat = beats(env)
        cli = _cli(env, "backup", "--all")
        run_id = _running_run(pg_conn, reported=5)
        broker.restart_empty()  # the queued batches are gone

        _out, err = cli.communicate(timeout=3 * MINUTE)
        assert cli.returncode == 0, err + worker.log()[-4000:] + beat.log()[-2000:]
        assert "cannot reach the Celery broker" not in err
    assert _results(pg_conn, run_id) == 200
    assert _message_counts(pg_conn) == (40_000, 40_000)


@pytest.mark.slow
def test_the_result_backend_gone_for_a_second_loses_no_batch(
    celery_env, workers, beats, redis_client, keys, pg_conn, redis_server_url
):
    host_port = redis_server_url.split("//", 1)[1].split("/", 1)[0]
    host, port = host_port.split(":")
    proxy = TcpProxy(host, int(port))
    try:
        backend = f"redis://127.0.0.1:{proxy.port}/0"
        env = {**celery_env, "CELERY_RESULT_BACKEND": backend}
        make_sessions(redis_client, keys, 200, 100)
        workers(env, concurrency=2)
        beats(env)
        run_id = _start_full_backup(env)
        _running_run(pg_conn, reported=10)
        with proxy.outage():
            time.sleep(1)
        run = wait_for_run(pg_conn, run_id, timeout=2 * MINUTE)
    finally:
        proxy.close()
    assert run["status"] == "completed", run
    assert _results(pg_conn, run_id) == 200
    assert _message_counts(pg_conn) == (20_000, 20_000)


# -- a worker that cannot do the work -----------------------------------------------


def _unreachable_database(env: dict[str, str]) -> dict[str, str]:
    from tests.servers import free_port

    return {**env, "DATABASE_URL": f"postgresql://postgres@127.0.0.1:{free_port()}/nowhere"}


def test_the_cli_says_why_a_session_task_is_retried(celery_env, workers, redis_client, keys):
    [sid] = make_sessions(redis_client, keys, 1, 3)
    workers(_unreachable_database(celery_env))
    cli = _cli(celery_env, "backup", "--session", sid)
    try:
        line = wait_for(
            lambda: _first_line_with(cli, "retrying"), MINUTE, message="the retry to be reported"
        )
    finally:
        cli.kill()
        cli.communicate()
    assert "cannot reach PostgreSQL" in line


def test_the_cli_stops_when_the_session_task_fails(celery_env, workers, redis_client, keys):
    [sid] = make_sessions(redis_client, keys, 1, 3)
    # No retries, so that the task fails at once (the default retries for about
    # 15 minutes, saying so: the test above).
    workers({**_unreachable_database(celery_env), "TASK_MAX_RETRIES": "0"})
    cli = _cli(celery_env, "backup", "--session", sid)
    _out, err = cli.communicate(timeout=MINUTE)
    assert cli.returncode == 5, err
    assert "cannot reach PostgreSQL" in err.strip().splitlines()[-1]


def _first_line_with(cli: subprocess.Popen[str], text: str) -> str | None:
    assert cli.stderr is not None
    import select

    while select.select([cli.stderr], [], [], 0.1)[0]:
        line = cli.stderr.readline()
        if not line:
            return None
        if text in line:
            return line
    return None


def test_a_postgres_error_on_a_worker_fails_the_run_with_exit_4_and_no_chat_content(
    celery_env, workers, redis_client, keys, pg_conn
):
    make_sessions(redis_client, keys, 10, 50)
    # Every statement of the worker is cancelled: a server that answers, with an error.
    workers({**celery_env, "DATABASE_STATEMENT_TIMEOUT_MS": "1"})
    cli = _cli(celery_env, "backup", "--all")
    out, err = cli.communicate(timeout=2 * MINUTE)
    assert cli.returncode == 4, err
    errors = [row[0] or "" for row in pg_conn.execute(
        "SELECT error FROM persistence_session_results UNION ALL "
        "SELECT error FROM persistence_snapshots"
    ).fetchall()]  # fmt: skip
    for text in [out, err, *errors]:
        assert "the party enters the citadel" not in text
        assert "2026-02-12" not in text
