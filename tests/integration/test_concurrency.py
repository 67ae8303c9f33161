"""Concurrency: runs over the same session, each on its own connections, never double up."""

from __future__ import annotations

import contextlib
import json
import threading
import time

import psycopg

from tests.factories import (
    add_messages,
    message,
    new_id,
    score_of,
    session_fields,
    write_session,
)
from tests.integration.helpers import (
    backup_run,
    message_count,
    restore_run,
    results_by_session,
    rows,
    scalar,
)
from worker.models import RunStatus, SessionStatus
from worker.services import open_services
from worker.settings import Settings
from worker.sql import QUERIES


class _Runner(threading.Thread):
    """Runs ``action(services)`` on Services of its own; keeps the result or the error."""

    def __init__(self, settings, action, start_together=None):
        super().__init__(daemon=True)
        self.settings = settings
        self.action = action
        self.start_together = start_together
        self.result = None
        self.error: BaseException | None = None

    def run(self):
        try:
            with open_services(self.settings) as services:
                if self.start_together is not None:
                    self.start_together.wait(10)
                self.result = self.action(services)
        except BaseException as exc:
            self.error = exc


def _finish(*threads):
    for thread in threads:
        thread.join(60)
        assert not thread.is_alive()
        assert thread.error is None, repr(thread.error)
    return [thread.result for thread in threads]


def _waiting_for_session_locks(pg_conn) -> int:
    return int(
        scalar(
            pg_conn,
            "SELECT count(*) FROM pg_locks l JOIN pg_database d ON d.oid = l.database"
            " WHERE l.locktype = 'advisory' AND NOT l.granted AND d.datname = current_database()",
        )
    )


def _wait_until(condition, what):
    deadline = time.monotonic() + 30
    while not condition():
        assert time.monotonic() < deadline, f"gave up waiting: {what}"
        time.sleep(0.01)


@contextlib.contextmanager
def _session_lock_held(pg_conn, sid):
    """Hold the per-session lock the engine takes (its own query) until the block ends."""
    with pg_conn.transaction():
        pg_conn.execute(QUERIES["lock_sessions"], {"ids": [sid]})
        yield


def test_two_concurrent_backups_leave_one_copy(settings, redis_client, keys, pg_conn):
    sid = new_id()
    write_session(redis_client, keys, session_fields(sid), [message(sid, i) for i in range(3000)])
    together = threading.Barrier(2)
    threads = [
        _Runner(settings, lambda s: backup_run(s, session_id=sid), together) for _ in range(2)
    ]
    for thread in threads:
        thread.start()
    runs = _finish(*threads)

    assert [run.status for run in runs] == [RunStatus.COMPLETED] * 2
    assert sorted(run.message_count for run in runs) == [0, 3000]
    assert message_count(pg_conn, sid) == 3000
    with open_services(settings) as services:
        again = backup_run(services)
        assert results_by_session(services, again)[sid].status is SessionStatus.UNCHANGED
    assert again.message_count == 0


def test_backups_queued_on_a_held_lock_store_each_message_once(
    settings, redis_client, keys, pg_conn
):
    """Both backups are ready before either may start: they contend for real."""
    sid = new_id()
    write_session(redis_client, keys, session_fields(sid), [message(sid, i) for i in range(500)])
    with open_services(settings) as services:
        backup_run(services)
    add_messages(redis_client, keys, sid, [message(sid, i) for i in range(500, 1700)])

    with _session_lock_held(pg_conn, sid):
        threads = [_Runner(settings, lambda s: backup_run(s, session_id=sid)) for _ in range(2)]
        for thread in threads:
            thread.start()
        _wait_until(lambda: _waiting_for_session_locks(pg_conn) == 2, "both backups queued")
        assert message_count(pg_conn, sid) == 500
    runs = _finish(*threads)

    assert sorted(run.message_count for run in runs) == [0, 1200]
    assert message_count(pg_conn, sid) == 1700


def test_backup_waits_for_the_session_lock(settings, redis_client, keys, pg_conn):
    sid = new_id()
    write_session(redis_client, keys, session_fields(sid), [message(sid, i) for i in range(10)])

    with _session_lock_held(pg_conn, sid):
        thread = _Runner(settings, lambda s: backup_run(s, session_id=sid))
        thread.start()
        _wait_until(lambda: _waiting_for_session_locks(pg_conn) == 1, "the backup queued")
        assert thread.is_alive()
        assert message_count(pg_conn, sid) == 0
    [run] = _finish(thread)

    assert run.message_count == 10
    assert message_count(pg_conn, sid) == 10


def test_restore_waits_for_the_session_lock(settings, redis_client, keys, pg_conn):
    sid = new_id()
    write_session(redis_client, keys, session_fields(sid), [message(sid, i) for i in range(10)])
    with open_services(settings) as services:
        backup_run(services)
    redis_client.delete(keys.session(sid), keys.messages(sid))

    with _session_lock_held(pg_conn, sid):
        thread = _Runner(settings, lambda s: restore_run(s, session_id=sid))
        thread.start()
        _wait_until(lambda: _waiting_for_session_locks(pg_conn) == 1, "the restore queued")
        assert thread.is_alive()
        assert redis_client.exists(keys.session(sid), keys.messages(sid)) == 0
    [run] = _finish(thread)

    assert run.status is RunStatus.COMPLETED
    assert redis_client.zcard(keys.messages(sid)) == 10


def test_concurrent_backup_and_forced_restore_stay_consistent(
    settings, redis_client, keys, pg_conn
):
    sid = new_id()
    write_session(redis_client, keys, session_fields(sid), [message(sid, i) for i in range(2000)])
    with open_services(settings) as services:
        backup_run(services)
    add_messages(redis_client, keys, sid, [message(sid, i) for i in range(2000, 2600)])
    together = threading.Barrier(2)
    backup = _Runner(settings, lambda s: backup_run(s, session_id=sid), together)
    restore = _Runner(settings, lambda s: restore_run(s, session_id=sid, force=True), together)
    backup.start()
    restore.start()
    backup_result, restore_result = _finish(backup, restore)

    assert backup_result.status is RunStatus.COMPLETED
    assert restore_result.status is RunStatus.COMPLETED
    # Whichever went first, the restore wrote what PostgreSQL held at that moment, and
    # the two stores agree on every message the restore wrote back.
    restored = redis_client.zcard(keys.messages(sid))
    assert restored in (2000, 2600)
    assert restore_result.message_count == restored
    assert backup_result.message_count in (0, 600)
    assert (restored == 2000) == (backup_result.message_count == 0)
    # Nothing is lost either way: the backup stored the 600 new messages first, or the
    # restore replaced them and backed up the state it replaced (its undo) before
    # the backup looked, which then found nothing new.
    assert message_count(pg_conn, sid) == 2600


def test_forced_restore_before_the_backup_keeps_what_it_replaced(
    settings, redis_client, keys, pg_conn
):
    """The "restore went first" order of the test above, made certain."""
    sid = new_id()
    write_session(redis_client, keys, session_fields(sid), [message(sid, i) for i in range(2000)])
    with open_services(settings) as services:
        backup_run(services)
        add_messages(redis_client, keys, sid, [message(sid, i) for i in range(2000, 2600)])
        restored = restore_run(services, session_id=sid, force=True)
        backup = backup_run(services, session_id=sid)

    assert restored.message_count == redis_client.zcard(keys.messages(sid)) == 2000
    assert backup.message_count == 0
    assert message_count(pg_conn, sid) == 2600


def test_a_backup_rolled_back_mid_merge_leaves_the_connection_usable(
    env, redis_client, keys, pg_conn
):
    """A batch that fails inside its first merge must not break the next batches.

    The merge path's scratch tables are temporary tables created on first use;
    a rolled-back transaction takes them with it.
    """
    settings = Settings.from_env({**env, "DATABASE_LOCK_TIMEOUT_MS": "200"})
    sid = new_id()
    msgs = [message(sid, i) for i in range(3)]
    write_session(redis_client, keys, session_fields(sid), msgs)
    edited = {**msgs[0], "content": "edited in place"}
    with open_services(settings) as services:
        assert backup_run(services).status is RunStatus.COMPLETED
        pipe = redis_client.pipeline(transaction=True)
        pipe.zrem(keys.messages(sid), json.dumps(msgs[0], separators=(",", ":")))
        pipe.zadd(keys.messages(sid), {json.dumps(edited): score_of(edited["created_at"])})
        pipe.execute()

        # Another transaction holds the message's row: the merge cannot update it.
        with pg_conn.transaction():
            pg_conn.execute(
                "SELECT 1 FROM client_messages WHERE id = %s FOR UPDATE", (msgs[0]["id"],)
            )
            blocked = backup_run(services, session_id=sid, full=True)
        assert blocked.status is RunStatus.FAILED
        assert "lock" in results_by_session(services, blocked)[sid].error

        # Same Services, same connection, the row free again.
        retried = backup_run(services, session_id=sid, full=True)

        result = results_by_session(services, retried)[sid]
        assert result.error is None
        assert retried.status is RunStatus.COMPLETED
        assert retried.message_count == 1
    assert scalar(pg_conn, "SELECT content FROM client_messages WHERE id = %s", msgs[0]["id"]) == (
        "edited in place"
    )


def _waiting_on_locks(database_url) -> int:
    # A connection of its own: pg_stat_activity is a snapshot per transaction.
    with psycopg.connect(database_url, autocommit=True) as conn:
        return int(
            scalar(
                conn,
                "SELECT count(*) FROM pg_stat_activity"
                " WHERE datname = current_database() AND wait_event_type = 'Lock'",
            )
        )


def test_message_id_taken_by_a_concurrent_backup_is_kept_not_lost(
    settings, database_url, redis_client, keys, pg_conn
):
    """Two sessions share a message ID; the other session's backup commits it mid-merge."""
    owner, intruder = new_id(), new_id()
    shared = message(owner, 0)
    copy = {**shared, "session_id": intruder}
    write_session(redis_client, keys, session_fields(intruder), [message(intruder, 1)])
    with open_services(settings) as services:
        backup_run(services)
    add_messages(redis_client, keys, intruder, [copy])

    # The owner's backup, as its transaction stands before commit: the row is in.
    with pg_conn.transaction():
        pg_conn.execute(
            "INSERT INTO client_sessions (id, created_at, updated_at, name, creator_id,"
            " mcp_server_url, websocket_key) VALUES (%s, now(), now(), 'o', 'c', 'u', 'w')",
            (owner,),
        )
        pg_conn.execute(
            "INSERT INTO client_messages (id, session_id, created_at, role, content)"
            " VALUES (%s, %s, now(), 'user', 'the owner''s')",
            (shared["id"], owner),
        )
        thread = _Runner(settings, lambda s: backup_run(s, session_id=intruder, full=True))
        thread.start()
        _wait_until(lambda: _waiting_on_locks(database_url) == 1, "the merge waits for the row")
    [run] = _finish(thread)

    assert (
        scalar(pg_conn, "SELECT session_id::text FROM client_messages WHERE id = %s", shared["id"])
        == owner
    )
    kept = rows(pg_conn, "SELECT session_id, raw, reason FROM persistence_kept_records")
    assert len(kept) == 1, "the intruder's copy was neither stored nor kept"
    assert kept[0]["session_id"] == intruder
    assert bytes(kept[0]["raw"]) == json.dumps(copy, separators=(",", ":")).encode()
    assert f"already stored for session {owner}" in kept[0]["reason"]
    assert run.status is RunStatus.PARTIAL


def test_restore_queued_behind_a_backup_restores_what_the_backup_stored(
    settings, redis_client, keys, pg_conn
):
    """A restore that waited for the session lock reads PostgreSQL as it is once it has it."""
    sid = new_id()
    write_session(redis_client, keys, session_fields(sid), [message(sid, i) for i in range(5)])
    with open_services(settings) as services:
        backup_run(services)
    late = message(sid, 6)

    # A backup of the session, in the middle of its transaction: it holds the
    # lock and has stored one more message, committed when the block ends.
    with _session_lock_held(pg_conn, sid):
        pg_conn.execute(
            "INSERT INTO client_messages (id, session_id, created_at, role, content)"
            " VALUES (%s, %s, %s, 'user', 'late')",
            (late["id"], sid, late["created_at"]),
        )
        thread = _Runner(settings, lambda s: restore_run(s, session_id=sid, force=True))
        thread.start()
        _wait_until(lambda: _waiting_for_session_locks(pg_conn) == 1, "the restore queued")
    [run] = _finish(thread)

    assert run.status is RunStatus.COMPLETED
    assert run.message_count == 6
    restored = {json.loads(m)["id"] for m in redis_client.zrange(keys.messages(sid), 0, -1)}
    assert late["id"] in restored
    assert len(restored) == 6
