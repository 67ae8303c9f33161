"""Several hosts, simulated on this machine: workers with their own `-Q` shard lists.

Three `celery -A worker worker` processes with different node names stand
for three hosts. In the README's recommended layout every shard is consumed
by two hosts (a ring: host i takes its own block of shards and the next
host's), so losing any one host leaves every shard a consumer and the run
completes. With disjoint lists, the only consumer of some shards dying stops
the run on those shards: the test shows what the operator sees and that the
run goes on when a worker for them starts.

No timeout is shortened: a batch the dead worker was in the middle of comes
back through the supervisor (beat's supervise_runs), not the broker's
30-minute visibility timeout.
"""

from __future__ import annotations

import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import psycopg
import pytest

from tests.e2e.conftest import wait_for, wait_for_run
from tests.factories import make_sessions
from tests.processes import REPO, base_env, run_python
from worker.pg_store import PostgresStore
from worker.settings import Settings

MINUTE = 60
SHARDS = 6
SESSIONS, EACH = 90, 200
pytestmark = [pytest.mark.slow, pytest.mark.timeout(3 * MINUTE)]


def _queues(env: dict[str, str], *shards: int, default: bool = True) -> list[str]:
    prefix = env["CELERY_QUEUE_PREFIX"]
    names = [f"{prefix}shard.{n}" for n in shards]
    if default:
        # Coordinators, chord callbacks, the supervisor; and tasks from other languages.
        names += [f"{prefix}default", env["CELERY_PRODUCER_QUEUES"]]
    return names


def _start_hosts(workers: Any, env: dict[str, str], layout: dict[str, list[str]]) -> dict[str, Any]:
    """One worker per host, started at once (each takes seconds to be ready)."""
    with ThreadPoolExecutor(len(layout)) as pool:
        started = {
            name: pool.submit(workers, env, name=name, queues=queues)
            for name, queues in layout.items()
        }
        return {name: future.result() for name, future in started.items()}


def _hosts_env(celery_env: dict[str, str]) -> dict[str, str]:
    # What happens to a full run's batches when hosts die: continuous backups
    # (on by default, tests of their own) would store the sessions first and
    # leave the run's batches nothing to do.
    return {**celery_env, "BACKUP_SHARDS": str(SHARDS), "CONTINUOUS_BACKUP": "0"}


def _cli(env: dict[str, str], *args: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, str(REPO / "bin" / "dnd-client"), *args],
        cwd=REPO,
        env=base_env(env),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def _reported(conn: psycopg.Connection) -> int:
    row = conn.execute(
        "SELECT count(*) FROM persistence_session_results r JOIN persistence_snapshots s "
        "ON s.id = r.snapshot_id WHERE s.scope = 'all' AND s.status = 'running'"
    ).fetchone()
    return int(row[0]) if row else 0


def _begun_unfinished(
    conn: psycopg.Connection, env: dict[str, str], shards: tuple[int, ...]
) -> set[int]:
    """Batches of the running full run on these shards, begun and not finished."""
    [run_id] = conn.execute(
        "SELECT id::text FROM persistence_snapshots WHERE scope = 'all' AND status = 'running'"
    ).fetchone()
    store = PostgresStore(conn, Settings.from_env(env))
    return {
        batch.batch_no
        for batch in store.unfinished_batches(run_id)
        if batch.shard in shards and batch.started_at is not None
    }


def _resent_batches(conn: psycopg.Connection, run_id: str) -> set[int]:
    rows = conn.execute(
        "SELECT batch_no FROM persistence_run_batches WHERE snapshot_id = %s AND dispatches > 1",
        (run_id,),
    ).fetchall()
    return {row[0] for row in rows}


def _consumed(env: dict[str, str]) -> dict[str, list[str]]:
    """Each live worker's queues, as `celery inspect active_queues` tells them."""
    answer: dict[str, list[str]] = run_python(
        env,
        """
import json
from worker.celery import app
replies = app.control.inspect(timeout=2).active_queues() or {}
print(json.dumps({w: sorted(q["name"] for q in qs) for w, qs in replies.items()}))
""",
    )
    return answer


def _assert_everything_stored(conn: psycopg.Connection, run_id: str) -> None:
    total = SESSIONS * EACH
    rows, distinct = conn.execute(
        "SELECT count(*), count(DISTINCT id) FROM client_messages"
    ).fetchone()
    assert (rows, distinct) == (total, total)
    results = conn.execute(
        "SELECT count(*), count(DISTINCT session_id) FROM persistence_session_results "
        "WHERE snapshot_id = %s",
        (run_id,),
    ).fetchone()
    assert results == (SESSIONS, SESSIONS)


def test_recommended_layout_every_shard_on_two_hosts_survives_a_host(
    celery_env, workers, beats, redis_client, keys, pg_conn
):
    env = _hosts_env(celery_env)
    make_sessions(redis_client, keys, SESSIONS, EACH)
    # The ring: a takes blocks 0 and 1, b blocks 1 and 2, c blocks 2 and 0.
    layout = {
        "a": _queues(env, 0, 1, 2, 3),
        "b": _queues(env, 2, 3, 4, 5),
        "c": _queues(env, 4, 5, 0, 1),
    }
    hosts = _start_hosts(workers, env, layout)
    beat = beats(env)
    cli = _cli(env, "backup", "--all")
    wait_for(lambda: _reported(pg_conn) >= 10, MINUTE, 0.05, "progress")
    hosts["b"].kill()  # the whole worker and its pool: a host gone
    reported_at_kill = _reported(pg_conn)

    consumed = _consumed(env)
    assert sorted(w.split("@")[0] for w in consumed) == ["a", "c"]
    every_queue = set(_queues(env, *range(SHARDS)))
    assert set().union(*consumed.values()) == every_queue

    _out, err = cli.communicate(timeout=2 * MINUTE)
    assert cli.returncode == 0, err + beat.log()[-3000:]
    run = wait_for_run(pg_conn, timeout=10)
    assert reported_at_kill < SESSIONS, "b was killed after the run"
    assert run["status"] == "completed", run
    assert run["session_count"] == SESSIONS
    _assert_everything_stored(pg_conn, run["id"])


def test_disjoint_lists_the_only_consumer_of_a_shard_dies_and_the_run_waits(
    celery_env, workers, beats, redis_client, keys, pg_conn
):
    env = _hosts_env(celery_env)
    make_sessions(redis_client, keys, SESSIONS, EACH)
    hosts = _start_hosts(
        workers,
        env,
        {
            "a": _queues(env, 0, 1),
            "b": _queues(env, 2, 3, default=False),
            "c": _queues(env, 4, 5, default=False),
        },
    )
    first, victim = hosts["a"], hosts["c"]
    beat = beats(env)
    cli = _cli(env, "backup", "--all")
    wait_for(lambda: _reported(pg_conn) >= 1, MINUTE, 0.05, "progress")
    victim.kill()
    # The batches the victim was in the middle of, read from PostgreSQL once it
    # can write nothing more. Not from its log: it may have committed a batch
    # and died before logging "succeeded" (CI saw it: the kill comes right
    # after the first result appears, which can be the victim's own).
    orphaned = _begun_unfinished(pg_conn, env, shards=(4, 5))

    # What the operator sees: the waiting CLI stops once the other shards are
    # done and nothing moves, naming the queues without a consumer and the
    # command that gives them one (exit 6: no worker). The run is not failed:
    # it waits.
    _out, err = cli.communicate(timeout=2 * MINUTE)
    prefix = env["CELERY_QUEUE_PREFIX"]
    assert cli.returncode == 6, err
    last = err.strip().splitlines()[-1]
    assert f"no worker consumes queues {prefix}shard.4, {prefix}shard.5" in last
    assert f"-Q {prefix}shard.4,{prefix}shard.5" in last
    assert "waits for one and goes on when it starts" in last
    run_id = last.split("run ", 1)[1].split()[0]
    status = pg_conn.execute(
        "SELECT status FROM persistence_snapshots WHERE id = %s", (run_id,)
    ).fetchone()
    assert status == ("running",)
    assert _reported(pg_conn) < SESSIONS

    # What the operator does: start a worker for those shards (the command the
    # line gave). The supervisor has sent the dead worker's batch again; the
    # new worker takes it and the queued ones, and the run completes.
    workers(env, name="d", queues=_queues(env, 4, 5, default=False))
    run = wait_for_run(pg_conn, run_id, timeout=MINUTE)
    assert run["status"] == "completed", run
    _assert_everything_stored(pg_conn, run_id)
    # The supervisor (beat's supervise_runs, run by the worker on the default
    # queue, or the waiting CLI) sent the dead worker's batches again: the one
    # it was in the middle of, and any it had taken from the queue without
    # beginning. Such a message waits in the broker's unacked set for the
    # 30-minute visibility timeout, so the run completing within the minute
    # above is itself the proof that it was sent again; each sending is said.
    said = first.log() + err
    resent = _resent_batches(pg_conn, run_id)
    assert orphaned <= resent, (orphaned, resent)
    for batch_no in resent:
        assert f"batch {batch_no}: sending again" in said, said[-3000:] + beat.log()[-2000:]
    for batch_no in orphaned:
        assert f"batch {batch_no}: sending again, its worker stopped before finishing it" in said
