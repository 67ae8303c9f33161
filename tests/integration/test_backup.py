"""Backup: sessions upserted by ID, messages stored once, counts reported right."""

from __future__ import annotations

import json
from datetime import UTC, datetime

from tests.factories import (
    BASE_TIME,
    add_messages,
    message,
    new_id,
    session_fields,
    write_session,
)
from tests.integration.helpers import (
    backup_run,
    message_count,
    results_by_session,
    rows,
    scalar,
    snapshot,
)
from worker.models import RunStatus, SessionStatus


def _session_row(pg_conn, sid):
    found = rows(pg_conn, "SELECT * FROM client_sessions WHERE id = %s", sid)
    assert len(found) == 1
    return found[0]


def test_backup_stores_every_field_of_sessions_and_messages(services, redis_client, keys, pg_conn):
    sid = new_id()
    msgs = [message(sid, i) for i in range(6)]
    msgs[1]["content"] = None
    msgs[2]["player_id"] = None
    msgs[3]["tool_calls"] = {"calls": [{"name": "move", "args": {"x": 1.5, "ok": True}}]}
    write_session(redis_client, keys, session_fields(sid), msgs)

    run = backup_run(services)

    assert run.status is RunStatus.COMPLETED
    row = _session_row(pg_conn, sid)
    assert row["name"] == "The Sunless Citadel"
    assert row["creator_id"] == "user-1"
    assert row["mcp_server_url"] == "http://mcp.local:9000"
    assert row["websocket_key"] == "ws-key-1"
    assert row["max_players"] == 5
    assert row["settings"] == {"dice": "d20", "house_rules": ["flanking"]}
    assert row["status"] == "active"
    assert row["created_at"] == BASE_TIME
    assert row["updated_at"] == datetime(2026, 2, 12, 10, 5, tzinfo=UTC)
    assert row["deleted_at"] is None

    stored = {
        str(r["id"]): r
        for r in rows(pg_conn, "SELECT * FROM client_messages WHERE session_id = %s", sid)
    }
    assert set(stored) == {m["id"] for m in msgs}
    for m in msgs:
        got = stored[m["id"]]
        assert str(got["session_id"]) == sid
        assert got["created_at"] == datetime.fromisoformat(m["created_at"])
        assert got["role"] == m["role"]
        assert got["content"] == m["content"]
        assert got["tool_calls"] == m["tool_calls"]
        assert got["player_id"] == m["player_id"]


def test_optional_session_fields_missing_or_empty(services, redis_client, keys, pg_conn):
    sid = new_id()
    fields = session_fields(sid, max_players=None, settings=None, status=None, deleted_at="")
    write_session(redis_client, keys, fields)

    run = backup_run(services)

    assert run.status is RunStatus.COMPLETED
    row = _session_row(pg_conn, sid)
    assert row["max_players"] is None
    assert row["settings"] is None
    assert row["status"] == "active"  # the contract's default
    assert row["deleted_at"] is None  # empty = not deleted


def test_changed_session_hash_is_upserted_by_id(services, redis_client, keys, pg_conn):
    sid = new_id()
    write_session(redis_client, keys, session_fields(sid), [message(sid, 0)])
    backup_run(services)

    redis_client.hset(
        keys.session(sid),
        mapping={
            "name": "Tomb of Horrors",
            "status": "paused",
            "max_players": "7",
            "settings": json.dumps({"dice": "d12"}),
            "updated_at": "2026-03-01T08:30:00Z",
            "websocket_key": "ws-key-2",
        },
    )
    run = backup_run(services)

    assert run.status is RunStatus.COMPLETED
    assert run.message_count == 0
    result = results_by_session(services, run)[sid]
    assert result.status is SessionStatus.COMPLETED
    assert result.messages == 0
    row = _session_row(pg_conn, sid)  # still exactly one row
    assert row["name"] == "Tomb of Horrors"
    assert row["status"] == "paused"
    assert row["max_players"] == 7
    assert row["settings"] == {"dice": "d12"}
    assert row["updated_at"] == datetime(2026, 3, 1, 8, 30, tzinfo=UTC)
    assert row["websocket_key"] == "ws-key-2"
    assert row["created_at"] == BASE_TIME
    assert message_count(pg_conn, sid) == 1


def test_deleted_at_is_carried_over_and_cleared(services, redis_client, keys, pg_conn):
    sid = new_id()
    write_session(redis_client, keys, session_fields(sid), [message(sid, 0)])
    backup_run(services)
    assert _session_row(pg_conn, sid)["deleted_at"] is None

    redis_client.hset(
        keys.session(sid), mapping={"deleted_at": "2026-02-13T00:00:00Z", "status": "deleted"}
    )
    backup_run(services)
    row = _session_row(pg_conn, sid)
    assert row["deleted_at"] == datetime(2026, 2, 13, tzinfo=UTC)
    assert row["status"] == "deleted"

    redis_client.hdel(keys.session(sid), "deleted_at")
    backup_run(services)
    assert _session_row(pg_conn, sid)["deleted_at"] is None


def test_same_backup_twice_leaves_one_copy_of_each_message(services, redis_client, keys, pg_conn):
    ids = []
    for n in range(3):
        sid = new_id()
        write_session(
            redis_client, keys, session_fields(sid), [message(sid, i) for i in range(n + 2)]
        )
        ids.append(sid)
    expected = 2 + 3 + 4

    first = backup_run(services)
    second = backup_run(services)
    third = backup_run(services, full=True)

    assert first.message_count == expected
    assert second.message_count == 0
    assert third.message_count == 0  # a full rescan of identical messages stores nothing
    assert message_count(pg_conn) == expected
    for n, sid in enumerate(ids):
        assert message_count(pg_conn, sid) == n + 2
    assert len(rows(pg_conn, "SELECT id FROM client_sessions")) == 3


def test_results_and_snapshot_counts(services, redis_client, keys, pg_conn):
    sizes = {new_id(): n for n in (0, 1, 5, 12)}
    for sid, n in sizes.items():
        write_session(redis_client, keys, session_fields(sid), [message(sid, i) for i in range(n)])

    run = backup_run(services)

    assert run.status is RunStatus.COMPLETED
    assert run.session_count == 4
    assert run.message_count == 18
    assert run.kept_count == 0
    assert run.failed_count == 0
    results = results_by_session(services, run)
    assert set(results) == set(sizes)
    for sid, n in sizes.items():
        assert results[sid].messages == n
        assert results[sid].status is SessionStatus.COMPLETED
        assert results[sid].error is None
        assert results[sid].worker == "test-worker"
        assert results[sid].shard == services.shard(sid)
    row = snapshot(pg_conn, run.id)
    assert row["status"] == "completed"
    assert row["session_count"] == 4
    assert row["message_count"] == 18
    assert row["duration_ms"] is not None
    assert row["duration_ms"] >= 0
    assert message_count(pg_conn) == 18


def test_single_session_backup_touches_only_that_session(services, redis_client, keys, pg_conn):
    wanted, other = new_id(), new_id()
    for sid in (wanted, other):
        write_session(redis_client, keys, session_fields(sid), [message(sid, i) for i in range(3)])

    run = backup_run(services, session_id=wanted)

    assert run.status is RunStatus.COMPLETED
    assert run.scope == "session"
    assert run.session_count == 1
    assert run.message_count == 3
    assert set(results_by_session(services, run)) == {wanted}
    assert [str(r["id"]) for r in rows(pg_conn, "SELECT id FROM client_sessions")] == [wanted]
    assert message_count(pg_conn, other) == 0


def test_session_not_in_the_set_is_not_part_of_a_full_run(services, redis_client, keys, pg_conn):
    listed, unlisted = new_id(), new_id()
    write_session(redis_client, keys, session_fields(listed), [message(listed, 0)])
    write_session(
        redis_client, keys, session_fields(unlisted), [message(unlisted, 0)], listed=False
    )

    run = backup_run(services)

    assert set(results_by_session(services, run)) == {listed}
    assert message_count(pg_conn, unlisted) == 0
    # ... but it can be backed up by name.
    assert backup_run(services, session_id=unlisted).message_count == 1


TIMESTAMPS = [
    # (as a writer sent it, the UTC instant PostgreSQL must hold)
    ("2026-02-12T10:00:00.123456789+08:00", "2026-02-12 02:00:00.123456"),  # Go, nanoseconds
    ("2026-02-12T10:00:00.123Z", "2026-02-12 10:00:00.123000"),
    ("2026-02-12T10:00:00z", "2026-02-12 10:00:00.000000"),
    ("2026-02-12T10:00:00", "2026-02-12 10:00:00.000000"),  # no offset = UTC
    ("2026-02-12T10:00:00.5", "2026-02-12 10:00:00.500000"),
    ("2026-02-12T10:00:00.25-05:00", "2026-02-12 15:00:00.250000"),
    ("2026-02-12T21:30:00-05:00", "2026-02-13 02:30:00.000000"),  # crosses midnight
    ("2026-02-12 10:00:00.1+0530", "2026-02-12 04:30:00.100000"),
    ("2026-02-12T23:59:59.9999996Z", "2026-02-12 23:59:59.999999"),  # truncated, no carry
    ("2026-02-12T10:00:00.000000001+00:00", "2026-02-12 10:00:00.000000"),
]


def _utc_text(pg_conn, query, *params):
    return scalar(
        pg_conn,
        f"SELECT to_char(ts AT TIME ZONE 'UTC', 'YYYY-MM-DD HH24:MI:SS.US') FROM ({query}) q",
        *params,
    )


def test_message_timestamps_from_any_writer_are_stored_as_utc(
    services, redis_client, keys, pg_conn
):
    sid = new_id()
    write_session(redis_client, keys, session_fields(sid))
    sent = {}
    for n, (text, _utc) in enumerate(TIMESTAMPS):
        msg = message(sid, n)
        msg["created_at"] = text
        sent[msg["id"]] = text
        add_messages(redis_client, keys, sid, [json.dumps(msg).encode()], score=n)

    run = backup_run(services)

    assert run.status is RunStatus.COMPLETED
    assert run.message_count == len(TIMESTAMPS)
    expected = dict(TIMESTAMPS)
    for message_id, text in sent.items():
        stored = _utc_text(
            pg_conn, "SELECT created_at AS ts FROM client_messages WHERE id = %s", message_id
        )
        assert stored == expected[text], text


def test_session_timestamps_from_any_writer_are_stored_as_utc(
    services, redis_client, keys, pg_conn
):
    sid = new_id()
    fields = session_fields(
        sid,
        created_at="2026-02-12T10:00:00.123456789+08:00",
        updated_at="2026-02-12T10:00:00-05:00",
        deleted_at="2026-02-12T10:00:00",
    )
    write_session(redis_client, keys, fields)

    backup_run(services)

    def column(name):
        return _utc_text(pg_conn, f"SELECT {name} AS ts FROM client_sessions WHERE id = %s", sid)

    assert column("created_at") == "2026-02-12 02:00:00.123456"
    assert column("updated_at") == "2026-02-12 15:00:00.000000"
    assert column("deleted_at") == "2026-02-12 10:00:00.000000"
    # And compared as instants by PostgreSQL itself, whatever the session's time zone.
    assert scalar(
        pg_conn,
        "SELECT created_at = '2026-02-12T10:00:00.123456+08:00'::timestamptz"
        " FROM client_sessions WHERE id = %s",
        sid,
    )
