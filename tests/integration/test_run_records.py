"""Run records: a persistence_snapshots row per run, `running` until it ends, and its results."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from tests.factories import message, new_id, session_fields, write_session
from tests.integration.helpers import (
    backup_run,
    restore_run,
    results_by_session,
    rows,
    scalar,
    snapshot,
)
from worker.models import RunStatus, SessionStatus
from worker.services import open_services
from worker.settings import Settings

REPO = Path(__file__).resolve().parents[2]


class RecordingProgress:
    """A progress callback that looks at the run's rows in PostgreSQL as it goes."""

    def __init__(self, pg_conn):
        self.pg_conn = pg_conn
        self.run_id = None
        self.total = None
        self.statuses: list[str] = []
        self.reported: list[int] = []  # results in the table at each advance
        self.advanced = 0

    def _status(self):
        return scalar(
            self.pg_conn, "SELECT status FROM persistence_snapshots WHERE id = %s", self.run_id
        )

    def start(self, run, total):
        assert run.status is RunStatus.RUNNING
        self.run_id = run.id
        self.total = total
        self.statuses.append(self._status())

    def advance(self, results):
        self.advanced += len(results)
        self.statuses.append(self._status())
        self.reported.append(
            scalar(
                self.pg_conn,
                "SELECT count(*) FROM persistence_session_results WHERE snapshot_id = %s",
                self.run_id,
            )
        )


def _sessions(redis_client, keys, count, messages_each=2):
    sids = []
    for _ in range(count):
        sid = new_id()
        write_session(
            redis_client, keys, session_fields(sid), [message(sid, i) for i in range(messages_each)]
        )
        sids.append(sid)
    return sids


def test_backup_run_is_running_until_it_ends(env, redis_client, keys, pg_conn):
    sids = _sessions(redis_client, keys, 5)
    progress = RecordingProgress(pg_conn)
    # One connection: batches one after the other, so the counts below are exact.
    settings = Settings.from_env({**env, "BACKUP_BATCH_SESSIONS": "2", "LOCAL_CONNECTIONS": "1"})
    with open_services(settings) as services:
        run = backup_run(services, progress=progress)
        results = results_by_session(services, run)

    assert progress.run_id == run.id
    assert progress.total == 5
    assert progress.statuses == ["running"] * 4  # at start and after each of 3 batches
    assert progress.reported == [2, 4, 5]  # results are recorded batch by batch
    assert progress.advanced == 5
    row = snapshot(pg_conn, run.id)
    assert row["status"] == "completed"
    assert row["kind"] == "backup"
    assert row["scope"] == "all"
    assert row["session_count"] == 5
    assert row["message_count"] == 10
    assert row["expected_sessions"] == 5
    assert row["duration_ms"] is not None
    assert row["finished_at"] is not None
    assert row["finished_at"] >= row["created_at"]
    assert set(results) == set(sids)
    assert all(r.status is SessionStatus.COMPLETED and r.messages == 2 for r in results.values())


def test_parallel_batches_report_as_they_finish(env, redis_client, keys, pg_conn):
    sids = _sessions(redis_client, keys, 7)
    progress = RecordingProgress(pg_conn)
    settings = Settings.from_env({**env, "BACKUP_BATCH_SESSIONS": "2", "LOCAL_CONNECTIONS": "3"})
    with open_services(settings) as services:
        run = backup_run(services, progress=progress)
        results = results_by_session(services, run)

    assert progress.statuses == ["running"] * 5  # at start and after each of 4 batches
    assert progress.reported == sorted(progress.reported)
    assert progress.reported[-1] == 7
    assert progress.advanced == 7
    assert set(results) == set(sids)
    assert snapshot(pg_conn, run.id)["message_count"] == 14


def test_restore_run_is_running_until_it_ends(services, redis_client, keys, pg_conn):
    sids = _sessions(redis_client, keys, 3, messages_each=4)
    backup_run(services)
    redis_client.delete(*(keys.session(sid) for sid in sids), *(keys.messages(s) for s in sids))
    progress = RecordingProgress(pg_conn)

    run = restore_run(services, progress=progress, force=True)

    assert progress.statuses == ["running", "running"]
    assert progress.total == 3
    row = snapshot(pg_conn, run.id)
    assert row["kind"] == "restore"
    assert row["forced"] is True
    assert row["status"] == "completed"
    assert row["session_count"] == 3
    assert row["message_count"] == 12
    assert row["duration_ms"] is not None
    results = rows(
        pg_conn,
        "SELECT session_id::text, status, messages FROM persistence_session_results"
        " WHERE snapshot_id = %s ORDER BY session_id",
        run.id,
    )
    assert results == [
        {"session_id": sid, "status": "completed", "messages": 4} for sid in sorted(sids)
    ]


def test_partial_and_failed_runs(services, redis_client, keys, pg_conn):
    good = _sessions(redis_client, keys, 1)[0]
    redis_client.sadd(keys.sessions, "not-a-uuid")

    partial = backup_run(services)
    missing = new_id()
    failed = backup_run(services, session_id=missing)
    restore_failed = restore_run(services, session_id=missing)

    assert partial.status is RunStatus.PARTIAL
    assert partial.kept_count == 1
    assert snapshot(pg_conn, partial.id)["status"] == "partial"
    assert results_by_session(services, partial)[good].status is SessionStatus.COMPLETED

    assert failed.status is RunStatus.FAILED
    assert failed.failed_count == 1
    assert failed.message_count == 0
    assert snapshot(pg_conn, failed.id)["status"] == "failed"
    result = results_by_session(services, failed)[missing]
    assert result.status is SessionStatus.FAILED
    assert "not found" in result.error
    assert missing in result.error
    # The run row says why too (what `backup list` and monitoring queries see).
    assert "1 session(s) failed" in failed.error
    assert missing in failed.error
    assert "not found" in failed.error
    assert restore_failed.status is RunStatus.FAILED
    # A failed run changed nothing.
    assert rows(pg_conn, "SELECT id FROM client_sessions WHERE id = %s", missing) == []


def test_cli_backup_of_a_missing_session_fails_saying_not_found(env, pg_conn):
    missing = new_id()
    completed = subprocess.run(
        [sys.executable, "-m", "worker", "backup", "--session", missing, "--local"],
        env={**os.environ, **env},
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )

    assert completed.returncode == 4, completed.stderr  # exit status 4: run failed
    assert "not found" in completed.stderr
    assert "Traceback" not in completed.stderr
    [run] = rows(pg_conn, "SELECT status, scope FROM persistence_snapshots")
    assert run == {"status": "failed", "scope": "session"}


def test_every_run_has_a_row_and_list_runs_is_newest_first(services, redis_client, keys):
    _sessions(redis_client, keys, 2)
    made = [
        backup_run(services),
        restore_run(services),
        backup_run(services),
        restore_run(services, force=True),
        backup_run(services, full=True),
    ]

    listed = services.pg.list_runs(limit=100)
    assert [r.id for r in listed] == [r.id for r in reversed(made)]
    assert [r.id for r in services.pg.list_runs(limit=2)] == [made[4].id, made[3].id]
    backups = services.pg.list_runs(limit=10, kind="backup")
    assert [r.id for r in backups] == [made[4].id, made[2].id, made[0].id]
    assert [r.id for r in services.pg.list_runs(limit=1, kind="restore")] == [made[3].id]
    assert all(r.done for r in listed)
    assert all(r.duration_ms is not None for r in listed)


def test_finished_run_is_not_finished_twice(services, redis_client, keys, pg_conn):
    _sessions(redis_client, keys, 1)
    run = backup_run(services)
    before = snapshot(pg_conn, run.id)

    again = services.pg.finish_run(run.id, error="late error")

    assert again.status is RunStatus.COMPLETED
    assert snapshot(pg_conn, run.id) == before


class _VanishOnStart:
    """Deletes a session from Redis after the run listed it, before it is backed up."""

    def __init__(self, redis_client, keys, sid):
        self.redis_client, self.keys, self.sid = redis_client, keys, sid

    def start(self, run, total):
        self.redis_client.delete(self.keys.session(self.sid), self.keys.messages(self.sid))
        self.redis_client.srem(self.keys.sessions, self.sid)

    def advance(self, results):
        pass


def test_session_removed_after_listing_is_skipped(services, redis_client, keys, pg_conn):
    stays, goes = _sessions(redis_client, keys, 2)

    run = backup_run(services, progress=_VanishOnStart(redis_client, keys, goes))

    assert run.status is RunStatus.COMPLETED
    assert run.session_count == 2
    results = results_by_session(services, run)
    assert results[goes].status is SessionStatus.SKIPPED
    assert "removed from Redis" in results[goes].error
    assert results[stays].status is SessionStatus.COMPLETED
    assert rows(pg_conn, "SELECT id::text FROM client_sessions") == [{"id": stays}]


def test_kept_counts_add_up_in_the_run(services, redis_client, keys, pg_conn):
    sid = _sessions(redis_client, keys, 1)[0]
    redis_client.zadd(keys.messages(sid), {b"{bad": 1, b"[]": 2})
    redis_client.sadd(keys.sessions, "*")

    run = backup_run(services)

    assert run.status is RunStatus.PARTIAL
    assert run.kept_count == 3  # one set member, two messages
    assert run.message_count == 2
    assert snapshot(pg_conn, run.id)["kept_count"] == 3
    assert results_by_session(services, run)[sid].kept == 2
    assert (
        scalar(
            pg_conn,
            "SELECT count(*) FROM persistence_kept_records WHERE last_snapshot_id = %s",
            run.id,
        )
        == 3
    )
