"""Incremental backups: a run reads only what changed since the last one, and misses nothing."""

from __future__ import annotations

import json
from datetime import timedelta

import pytest

from tests.factories import (
    BASE_TIME,
    add_messages,
    message,
    new_id,
    score_of,
    session_fields,
    write_session,
)
from tests.integration.helpers import backup_run, message_count, results_by_session, rows, scalar
from worker.models import RunStatus, SessionStatus
from worker.services import open_services
from worker.settings import Settings


def _member(msg):
    return json.dumps(msg, separators=(",", ":")).encode()


def _score(msg):
    return score_of(msg["created_at"])


def test_second_run_with_nothing_changed_stores_nothing(services, redis_client, keys, pg_conn):
    ids = []
    for n in (0, 3, 8):
        sid = new_id()
        write_session(redis_client, keys, session_fields(sid), [message(sid, i) for i in range(n)])
        ids.append(sid)
    first = backup_run(services)
    assert first.message_count == 11

    second = backup_run(services)

    assert second.status is RunStatus.COMPLETED
    assert second.message_count == 0
    assert second.session_count == 3
    results = results_by_session(services, second)
    assert {sid: r.status for sid, r in results.items()} == dict.fromkeys(
        ids, SessionStatus.UNCHANGED
    )
    assert all(r.messages == 0 for r in results.values())
    assert message_count(pg_conn) == 11


def test_appended_messages_are_stored_by_the_next_run(services, redis_client, keys, pg_conn):
    grows, stays = new_id(), new_id()
    write_session(redis_client, keys, session_fields(grows), [message(grows, i) for i in range(5)])
    write_session(redis_client, keys, session_fields(stays), [message(stays, i) for i in range(4)])
    backup_run(services)

    added = [message(grows, i) for i in range(5, 12)]
    add_messages(redis_client, keys, grows, added)
    run = backup_run(services)

    assert run.status is RunStatus.COMPLETED
    assert run.message_count == 7
    results = results_by_session(services, run)
    assert results[grows].status is SessionStatus.COMPLETED
    assert results[grows].messages == 7
    assert results[stays].status is SessionStatus.UNCHANGED
    assert message_count(pg_conn, grows) == 12
    stored = {
        str(r["id"])
        for r in rows(pg_conn, "SELECT id FROM client_messages WHERE session_id = %s", grows)
    }
    assert {m["id"] for m in added} <= stored

    # And again: the watermark moved with the appended messages.
    add_messages(redis_client, keys, grows, [message(grows, 12)])
    assert backup_run(services).message_count == 1
    assert message_count(pg_conn, grows) == 13


def test_late_message_with_an_older_timestamp_is_found(services, redis_client, keys, pg_conn):
    sid = new_id()
    write_session(redis_client, keys, session_fields(sid), [message(sid, i) for i in range(10)])
    backup_run(services)

    # Written after the backup, but timestamped before everything backed up.
    late = message(sid, 0, created_at=BASE_TIME - timedelta(hours=1), content="late")
    add_messages(redis_client, keys, sid, [late])
    run = backup_run(services)

    assert run.message_count == 1
    assert results_by_session(services, run)[sid].messages == 1
    assert message_count(pg_conn, sid) == 11
    assert scalar(pg_conn, "SELECT content FROM client_messages WHERE id = %s", late["id"]) == (
        "late"
    )
    assert backup_run(services).message_count == 0


def test_late_message_with_the_newest_score_is_found(services, redis_client, keys, pg_conn):
    sid = new_id()
    msgs = [message(sid, i) for i in range(5)]
    write_session(redis_client, keys, session_fields(sid), msgs)
    backup_run(services)

    # Same score as the newest message backed up: not "after" the watermark.
    twin = message(sid, 9, created_at=None)
    twin["created_at"] = msgs[-1]["created_at"]
    add_messages(redis_client, keys, sid, [twin])
    run = backup_run(services)

    assert run.message_count == 1
    assert message_count(pg_conn, sid) == 6


def test_late_and_appended_messages_together(services, redis_client, keys, pg_conn):
    sid = new_id()
    write_session(redis_client, keys, session_fields(sid), [message(sid, i) for i in range(5)])
    backup_run(services)

    late = message(sid, 1, created_at=BASE_TIME - timedelta(days=1))
    newer = [message(sid, i) for i in range(20, 23)]
    add_messages(redis_client, keys, sid, [late, *newer])
    run = backup_run(services)

    assert run.message_count == 4
    assert message_count(pg_conn, sid) == 9


def test_changed_session_hash_is_found_by_the_next_run(services, redis_client, keys, pg_conn):
    sid = new_id()
    write_session(redis_client, keys, session_fields(sid), [message(sid, i) for i in range(3)])
    backup_run(services)

    redis_client.hset(keys.session(sid), "name", "Renamed")
    run = backup_run(services)

    result = results_by_session(services, run)[sid]
    assert result.status is SessionStatus.COMPLETED
    assert result.messages == 0
    assert scalar(pg_conn, "SELECT name FROM client_sessions WHERE id = %s", sid) == "Renamed"
    # Changing it back is a change too.
    redis_client.hset(keys.session(sid), "name", "The Sunless Citadel")
    backup_run(services)
    assert scalar(pg_conn, "SELECT name FROM client_sessions WHERE id = %s", sid) == (
        "The Sunless Citadel"
    )


def test_full_run_picks_up_a_message_edited_in_place(services, redis_client, keys, pg_conn):
    sid = new_id()
    msgs = [message(sid, i) for i in range(6)]
    write_session(redis_client, keys, session_fields(sid), msgs)
    backup_run(services)

    target = msgs[2]
    edited = {**target, "content": "edited: the party flees", "tool_calls": {"undo": [1, 2]}}
    key = keys.messages(sid)
    pipe = redis_client.pipeline(transaction=True)
    pipe.zrem(key, _member(target))
    pipe.zadd(key, {_member(edited): _score(target)})
    pipe.execute()
    assert redis_client.zcard(key) == 6

    run = backup_run(services, full=True)

    assert run.status is RunStatus.COMPLETED
    assert run.message_count == 1
    assert results_by_session(services, run)[sid].messages == 1
    row = rows(pg_conn, "SELECT * FROM client_messages WHERE id = %s", target["id"])
    assert len(row) == 1
    assert row[0]["content"] == "edited: the party flees"
    assert row[0]["tool_calls"] == {"undo": [1, 2]}
    assert message_count(pg_conn, sid) == 6


def test_appends_across_many_small_chunks(env, redis_client, keys, pg_conn):
    """Paging by score: groups of equal scores straddle chunk boundaries, none is lost."""
    settings = Settings.from_env({**env, "BACKUP_CHUNK_MESSAGES": "10"})
    sid = new_id()
    # 7 messages per millisecond: every page of 10 ends inside a group.
    msgs = [
        message(sid, i, created_at=BASE_TIME + timedelta(milliseconds=i // 7)) for i in range(45)
    ]
    write_session(redis_client, keys, session_fields(sid), msgs)
    with open_services(settings) as services:
        assert backup_run(services).message_count == 45
        more = [
            message(sid, i, created_at=BASE_TIME + timedelta(milliseconds=10 + i // 7))
            for i in range(45, 83)
        ]
        add_messages(redis_client, keys, sid, more)
        assert backup_run(services).message_count == 38
        assert backup_run(services, full=True).message_count == 0
    assert message_count(pg_conn, sid) == 83


@pytest.mark.parametrize("removed_index", [0, 4])
def test_removed_message_makes_the_next_run_rescan(
    services, redis_client, keys, pg_conn, removed_index
):
    """A member removed below the watermark plus one added above: nothing missed."""
    sid = new_id()
    msgs = [message(sid, i) for i in range(5)]
    write_session(redis_client, keys, session_fields(sid), msgs)
    backup_run(services)

    redis_client.zrem(keys.messages(sid), _member(msgs[removed_index]))
    newer = message(sid, 30, created_at=BASE_TIME + timedelta(hours=2))
    add_messages(redis_client, keys, sid, [newer])
    run = backup_run(services)

    assert run.message_count == 1
    assert scalar(pg_conn, "SELECT count(*) FROM client_messages WHERE id = %s", newer["id"]) == 1
    assert backup_run(services).message_count == 0


def test_session_backed_up_empty_then_given_messages(services, redis_client, keys, pg_conn):
    sid = new_id()
    write_session(redis_client, keys, session_fields(sid))
    first = backup_run(services)
    assert results_by_session(services, first)[sid].status is SessionStatus.COMPLETED
    assert backup_run(services).message_count == 0

    add_messages(redis_client, keys, sid, [message(sid, i) for i in range(4)])
    run = backup_run(services)

    assert run.message_count == 4
    assert message_count(pg_conn, sid) == 4
