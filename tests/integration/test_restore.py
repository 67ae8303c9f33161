"""Restore: the contract layout written exactly; existing, soft-deleted and empty sessions."""

from __future__ import annotations

import json
import threading
from datetime import UTC, datetime, timedelta

from tests.factories import (
    BASE_TIME,
    add_messages,
    message,
    new_id,
    session_fields,
    write_session,
)
from tests.integration.helpers import backup_run, restore_run, results_by_session
from worker.models import RunStatus, SessionStatus
from worker.services import open_services
from worker.settings import Settings

MESSAGE_KEYS = {"id", "session_id", "created_at", "role", "content", "tool_calls", "player_id"}
HASH_FIELDS = {
    "id",
    "name",
    "creator_id",
    "mcp_server_url",
    "websocket_key",
    "max_players",
    "settings",
    "created_at",
    "updated_at",
    "status",
    "deleted_at",
}


def _drop_from_redis(redis_client, keys, *sids):
    redis_client.delete(*(k for sid in sids for k in (keys.session(sid), keys.messages(sid))))
    redis_client.srem(keys.sessions, *sids)


def _insert_session(pg_conn, sid, *, deleted_at=None):
    pg_conn.execute(
        "INSERT INTO client_sessions (id, created_at, updated_at, deleted_at, name, creator_id,"
        " mcp_server_url, websocket_key, max_players, settings, status) VALUES"
        " (%s, %s, %s, %s, 'Direct', 'user-9', 'http://mcp', 'ws-9', NULL, NULL, 'active')",
        (sid, BASE_TIME, BASE_TIME, deleted_at),
    )


def _insert_message(pg_conn, sid, created_at, **values):
    mid = new_id()
    pg_conn.execute(
        "INSERT INTO client_messages (id, session_id, created_at, role, content, tool_calls,"
        " player_id) VALUES (%s, %s, %s, %s, %s, %s::jsonb, %s)",
        (
            mid,
            sid,
            created_at,
            values.get("role", "user"),
            values.get("content"),
            values.get("tool_calls"),
            values.get("player_id"),
        ),
    )
    return mid


def _redis_state(redis_client, keys, sid):
    return (
        redis_client.sismember(keys.sessions, sid),
        redis_client.hgetall(keys.session(sid)),
        redis_client.zrange(keys.messages(sid), 0, -1, withscores=True),
    )


def _staging_keys(redis_client, keys):
    return list(redis_client.scan_iter(match=f"{keys.prefix}restore-staging*", count=1000))


def test_restore_writes_the_contract_layout(services, redis_client, keys, pg_conn):
    sid = new_id()
    _insert_session(pg_conn, sid)
    pg_conn.execute(
        'UPDATE client_sessions SET max_players = 4, settings = \'{"b": [1, 2], "a": null}\''
        " WHERE id = %s",
        (sid,),
    )
    times = [
        datetime(2026, 2, 12, 10, 0, 0, 999999, tzinfo=UTC),  # score rounds down
        datetime(2026, 2, 12, 10, 0, 1, 1000, tzinfo=UTC),
        datetime(1999, 12, 31, 23, 59, 59, 500, tzinfo=UTC),
    ]
    ids = [
        _insert_message(
            pg_conn,
            sid,
            times[0],
            role="assistant",
            content="hi",
            tool_calls='[{"name": "roll"}]',
            player_id="p1",
        ),
        _insert_message(pg_conn, sid, times[1], role="tool"),
        _insert_message(pg_conn, sid, times[2], role="system", content=""),
    ]

    run = restore_run(services, session_id=sid)

    assert run.status is RunStatus.COMPLETED
    assert run.message_count == 3
    assert redis_client.type(keys.sessions) == b"set"
    assert redis_client.type(keys.session(sid)) == b"hash"
    assert redis_client.type(keys.messages(sid)) == b"zset"
    assert redis_client.smembers(keys.sessions) == {sid.encode()}
    fields = {k.decode(): v.decode() for k, v in redis_client.hgetall(keys.session(sid)).items()}
    assert set(fields) <= HASH_FIELDS
    assert fields == {
        "id": sid,
        "name": "Direct",
        "creator_id": "user-9",
        "mcp_server_url": "http://mcp",
        "websocket_key": "ws-9",
        "max_players": "4",
        "settings": fields["settings"],
        "created_at": "2026-02-12T10:00:00.000000Z",
        "updated_at": "2026-02-12T10:00:00.000000Z",
        "status": "active",
    }
    assert json.loads(fields["settings"]) == {"a": None, "b": [1, 2]}

    members = redis_client.zrange(keys.messages(sid), 0, -1, withscores=True)
    assert len(members) == 3
    by_id = {}
    for raw, score in members:
        obj = json.loads(raw)
        assert set(obj) == MESSAGE_KEYS
        created = datetime.fromisoformat(obj["created_at"])
        assert obj["created_at"].endswith("Z")
        assert score == (created - datetime(1970, 1, 1, tzinfo=UTC)) // timedelta(milliseconds=1)
        by_id[obj["id"]] = (obj, score)
    assert set(by_id) == set(ids)
    first, score = by_id[ids[0]]
    assert first == {
        "id": ids[0],
        "session_id": sid,
        "created_at": "2026-02-12T10:00:00.999999Z",
        "role": "assistant",
        "content": "hi",
        "tool_calls": [{"name": "roll"}],
        "player_id": "p1",
    }
    assert score == 1770890400999
    assert by_id[ids[1]][0]["content"] is None
    assert by_id[ids[1]][0]["tool_calls"] is None
    assert by_id[ids[1]][0]["player_id"] is None
    assert by_id[ids[2]][0]["content"] == ""
    assert by_id[ids[2]][1] == 946684799000
    assert _staging_keys(redis_client, keys) == []
    # Nothing restored expires (the staging zset it was assembled in did).
    assert redis_client.ttl(keys.messages(sid)) == -1
    assert redis_client.ttl(keys.session(sid)) == -1
    assert redis_client.ttl(keys.sessions) == -1


def test_restore_skips_a_session_that_exists_in_redis(services, redis_client, keys):
    sid = new_id()
    write_session(redis_client, keys, session_fields(sid), [message(sid, i) for i in range(3)])
    backup_run(services)
    redis_client.hset(keys.session(sid), "name", "changed in Redis only")
    add_messages(redis_client, keys, sid, [message(sid, 7)])
    before = _redis_state(redis_client, keys, sid)

    single = restore_run(services, session_id=sid)
    every = restore_run(services)

    for run in (single, every):
        assert run.status is RunStatus.COMPLETED
        assert run.message_count == 0
        result = results_by_session(services, run)[sid]
        assert result.status is SessionStatus.SKIPPED
        assert "exists in Redis" in result.error
    assert _redis_state(redis_client, keys, sid) == before
    assert _staging_keys(redis_client, keys) == []


def test_restore_skips_a_session_with_only_messages_in_redis(services, redis_client, keys):
    sid = new_id()
    write_session(redis_client, keys, session_fields(sid), [message(sid, 0)])
    backup_run(services)
    redis_client.delete(keys.session(sid))  # the messages are still there
    before = _redis_state(redis_client, keys, sid)

    run = restore_run(services, session_id=sid)

    assert results_by_session(services, run)[sid].status is SessionStatus.SKIPPED
    assert _redis_state(redis_client, keys, sid) == before


def test_force_replaces_the_hash_and_all_messages(services, redis_client, keys):
    sid = new_id()
    msgs = [message(sid, i) for i in range(4)]
    write_session(redis_client, keys, session_fields(sid), msgs)
    backup_run(services)
    backed_up = _redis_state(redis_client, keys, sid)
    redis_client.hset(keys.session(sid), mapping={"name": "Redis only", "extra": "field"})
    only_in_redis = message(sid, 9, content="never backed up")
    add_messages(redis_client, keys, sid, [only_in_redis])
    redis_client.zrem(keys.messages(sid), json.dumps(msgs[0], separators=(",", ":")))

    run = restore_run(services, session_id=sid, force=True)

    assert run.status is RunStatus.COMPLETED
    assert run.forced
    assert run.message_count == 4
    listed, fields, members = _redis_state(redis_client, keys, sid)
    assert listed
    assert fields[b"name"] == b"The Sunless Citadel"
    assert b"extra" not in fields
    restored = {json.loads(m)["id"]: score for m, score in members}
    assert restored == {json.loads(m)["id"]: s for m, s in backed_up[2]}
    assert only_in_redis["id"] not in restored
    assert msgs[0]["id"] in restored
    assert _staging_keys(redis_client, keys) == []


def test_force_restore_of_every_session(services, redis_client, keys):
    sids = [new_id() for _ in range(3)]
    for sid in sids:
        write_session(redis_client, keys, session_fields(sid), [message(sid, i) for i in range(2)])
    backup_run(services)
    for sid in sids:
        add_messages(redis_client, keys, sid, [message(sid, 5)])

    run = restore_run(services, force=True)

    assert run.session_count == 3
    assert run.message_count == 6
    for sid in sids:
        assert redis_client.zcard(keys.messages(sid)) == 2


def test_soft_deleted_sessions_are_never_restored(services, redis_client, keys, pg_conn):
    gone, live = new_id(), new_id()
    write_session(
        redis_client,
        keys,
        session_fields(gone, deleted_at="2026-02-13T00:00:00Z"),
        [message(gone, 0)],
    )
    write_session(redis_client, keys, session_fields(live), [message(live, 0)])
    backup_run(services)
    _drop_from_redis(redis_client, keys, gone, live)

    every = restore_run(services, force=True)
    single = restore_run(services, session_id=gone, force=True)

    assert every.details["soft_deleted_not_restored"] == 1
    assert set(results_by_session(services, every)) == {live}
    result = results_by_session(services, single)[gone]
    assert result.status is SessionStatus.SKIPPED
    assert "soft-deleted" in result.error
    assert single.message_count == 0
    assert _redis_state(redis_client, keys, gone) == (False, {}, [])
    assert redis_client.zcard(keys.messages(live)) == 1

    # Present in Redis and deleted in PostgreSQL: force leaves Redis alone too.
    write_session(redis_client, keys, session_fields(gone, name="still here"), [message(gone, 3)])
    before = _redis_state(redis_client, keys, gone)
    restore_run(services, session_id=gone, force=True)
    assert _redis_state(redis_client, keys, gone) == before


def test_session_with_zero_messages_restores_its_hash_only(services, redis_client, keys):
    sid = new_id()
    write_session(redis_client, keys, session_fields(sid))
    backup_run(services)
    _drop_from_redis(redis_client, keys, sid)

    run = restore_run(services, session_id=sid)

    assert run.status is RunStatus.COMPLETED
    assert results_by_session(services, run)[sid].status is SessionStatus.COMPLETED
    assert redis_client.hget(keys.session(sid), "id") == sid.encode()
    assert redis_client.exists(keys.messages(sid)) == 0
    assert redis_client.sismember(keys.sessions, sid)


def test_force_restore_of_an_empty_session_removes_redis_messages(services, redis_client, keys):
    sid = new_id()
    write_session(redis_client, keys, session_fields(sid))
    backup_run(services)
    add_messages(redis_client, keys, sid, [message(sid, 0)])

    restore_run(services, session_id=sid, force=True)

    assert redis_client.exists(keys.messages(sid)) == 0
    assert redis_client.exists(keys.session(sid)) == 1


def test_restore_of_a_session_missing_from_postgres_fails(services, redis_client, keys):
    sid = new_id()

    run = restore_run(services, session_id=sid)

    assert run.status is RunStatus.FAILED
    result = results_by_session(services, run)[sid]
    assert result.status is SessionStatus.FAILED
    assert "not found in PostgreSQL" in result.error
    assert _redis_state(redis_client, keys, sid) == (False, {}, [])


def _observe_while(redis_client, keys, sid, action):
    """Run ``action`` while a thread polls the session atomically; return the observations."""
    observations: list[tuple[bool, int]] = []
    first_seen = threading.Event()
    stop = threading.Event()

    def poll():
        while True:
            done = stop.is_set()
            pipe = redis_client.pipeline(transaction=True)  # MULTI/EXEC: one instant
            pipe.exists(keys.session(sid))
            pipe.zcard(keys.messages(sid))
            has_hash, count = pipe.execute()
            observations.append((bool(has_hash), count))
            first_seen.set()
            if done:
                return

    poller = threading.Thread(target=poll, daemon=True)
    poller.start()
    assert first_seen.wait(10)
    try:
        action()
    finally:
        stop.set()
        poller.join(30)
    assert not poller.is_alive()
    return observations


def _big_session(redis_client, keys, sid, count):
    write_session(redis_client, keys, session_fields(sid))
    pipe = redis_client.pipeline(transaction=False)
    for start in range(0, count, 5000):
        add_messages(pipe, keys, sid, [message(sid, i) for i in range(start, start + 5000)])
    pipe.execute()


def test_reader_never_sees_half_a_restored_session(env, redis_client, keys):
    total = 20_000
    settings = Settings.from_env({**env, "BACKUP_CHUNK_MESSAGES": "500"})
    sid = new_id()
    _big_session(redis_client, keys, sid, total)
    with open_services(settings) as services:
        assert backup_run(services).message_count == total
        _drop_from_redis(redis_client, keys, sid)

        seen = _observe_while(redis_client, keys, sid, lambda: restore_run(services))

    assert seen[0] == (False, 0)
    assert seen[-1] == (True, total)
    torn = [obs for obs in seen if obs not in ((False, 0), (True, total))]
    assert torn == [], f"a reader saw half a session: {torn[:5]}"
    assert _staging_keys(redis_client, keys) == []
    assert redis_client.ttl(keys.messages(sid)) == -1


def test_reader_never_sees_half_a_forced_restore(env, redis_client, keys):
    total = 20_000
    settings = Settings.from_env({**env, "BACKUP_CHUNK_MESSAGES": "500"})
    sid = new_id()
    _big_session(redis_client, keys, sid, total)
    with open_services(settings) as services:
        backup_run(services)
        # Redis now holds a different, smaller version of the session.
        redis_client.zremrangebyrank(keys.messages(sid), 0, 14_999)
        assert redis_client.zcard(keys.messages(sid)) == 5000

        seen = _observe_while(redis_client, keys, sid, lambda: restore_run(services, force=True))

    assert seen[0] == (True, 5000)
    assert seen[-1] == (True, total)
    torn = [obs for obs in seen if obs not in ((True, 5000), (True, total))]
    assert torn == [], f"a reader saw half a session: {torn[:5]}"
    assert _staging_keys(redis_client, keys) == []
