"""Checksums: what every backup records per session equals a recomputation from the rows.

The recomputation here is independent of the backup's bookkeeping: rows are read
with plain psycopg queries and summed with worker.checksums.message_digest.
"""

from __future__ import annotations

import json
from datetime import timedelta

import pytest

import worker.backup
from tests.factories import (
    BASE_TIME,
    add_messages,
    iso,
    message,
    new_id,
    score_of,
    session_fields,
    write_session,
)
from tests.integration.helpers import backup_run, results_by_session, rows
from worker.checksums import MODULUS, message_digest, session_digest
from worker.models import Session, SessionStatus
from worker.records import parse_message

MESSAGE_SQL = (
    "SELECT id::text, session_id::text, created_at, role, content, tool_calls::text, player_id"
    " FROM client_messages WHERE session_id = %s"
)


def _member(text: str) -> bytes:
    return text.encode()


def _tricky_members(sid: str) -> list[tuple[bytes, int]]:
    """Messages as other writers send them: key order, exponents, escapes, odd timestamps."""
    members = []
    templates = [
        # Keys in reverse order; numbers with exponents and trailing zeros; nested objects.
        '{"player_id":null,"tool_calls":[{"name":"roll","arguments":{"z":{"b":1.0,"a":1e2},'
        '"a":0.1,"n":-3,"small":2.5e-7,"big":1e16,"huge":1E+20}}],"content":null,'
        '"role":"assistant","created_at":"%(t0)s","session_id":"%(sid)s","id":"%(id)s"}',
        # Unicode, escaped and not; an empty string; a null tool_calls.
        '{"id":"%(id)s","session_id":"%(sid)s","created_at":"%(t1)s","role":"user",'
        '"content":"caf\\u00e9 \\ud83d\\udc09 dragon \\u2028 \\"quoted\\" \\\\ \u00fcber",'
        '"tool_calls":null,"player_id":"pl\u00e4yer-\U0001f409"}',
        # Nanoseconds and a +08:00 offset, as Go writes them; deep nesting, empty containers.
        '{"id":"%(id)s","session_id":"%(sid)s","created_at":"2026-02-12T18:00:02.123456789+08:00",'
        '"role":"tool","content":"","tool_calls":{"y":{"x":[true,false,null,{},[]],'
        '"w":{"b":"2","a":2}},"a":[3.50,-0.5]},"player_id":null}',
        # No offset at all: UTC.
        '{"id":"%(id)s","session_id":"%(sid)s","created_at":"2026-02-12T10:00:03.5",'
        '"role":"system","content":"rules","tool_calls":[],"player_id":"p"}',
    ]
    for index, template in enumerate(templates):
        when = BASE_TIME + timedelta(seconds=index)
        text = template % {"id": new_id(), "sid": sid, "t0": iso(when), "t1": iso(when)}
        members.append((_member(text), score_of(iso(when))))
    return members


def _write_tricky_session(redis_client, keys, sid: str, plain: int = 3) -> None:
    write_session(
        redis_client,
        keys,
        session_fields(
            sid,
            settings=json.dumps({"z": {"b": 1.0, "a": [1, 2]}, "a": "\u00e9", "f": 0.1}),
        ),
        [message(sid, i) for i in range(plain)],
    )
    for raw, score in _tricky_members(sid):
        add_messages(redis_client, keys, sid, [raw], score=score)


def _recorded(pg_conn, sid: str) -> dict | None:
    found = rows(
        pg_conn,
        "SELECT message_count, messages_digest, session_digest, snapshot_id::text AS run,"
        " computed_at FROM backup_checksums WHERE session_id = %s",
        sid,
    )
    return found[0] if found else None


def _recomputed(pg_conn, sid: str) -> tuple[int, bytes]:
    """(count, sum of digests mod 2**128) of the rows PostgreSQL holds, computed here."""
    found = pg_conn.execute(MESSAGE_SQL, (sid,)).fetchall()
    total = sum(message_digest(tuple(row)) for row in found) % MODULUS
    return len(found), total.to_bytes(16, "big")


def _session_row_digest(pg_conn, sid: str) -> bytes:
    row = pg_conn.execute(
        "SELECT id::text, name, creator_id, mcp_server_url, websocket_key, created_at,"
        " updated_at, max_players, settings::text, status, deleted_at"
        " FROM client_sessions WHERE id = %s",
        (sid,),
    ).fetchone()
    assert row is not None
    return session_digest(Session(*row))  # the columns in the order of Session's fields


def _assert_matches_rows(pg_conn, sid: str) -> dict:
    recorded = _recorded(pg_conn, sid)
    assert recorded is not None, f"no checksum recorded for {sid}"
    count, total = _recomputed(pg_conn, sid)
    assert recorded["message_count"] == count
    assert bytes(recorded["messages_digest"]) == total
    assert bytes(recorded["session_digest"]) == _session_row_digest(pg_conn, sid)
    return recorded


def _checksum_text(recorded: dict) -> str:
    return f"{recorded['message_count']}:{bytes(recorded['messages_digest']).hex()}"


def _count_digests(monkeypatch) -> list[str]:
    """Record the ID of every message the backup engine hashes."""
    hashed: list[str] = []
    real = worker.backup.message_digest  # type: ignore[attr-defined]

    def counting(row):
        hashed.append(row[0])
        return real(row)

    monkeypatch.setattr(worker.backup, "message_digest", counting)
    return hashed


def test_cold_backup_records_what_postgres_holds(services, redis_client, keys, pg_conn):
    tricky, plain, empty = new_id(), new_id(), new_id()
    _write_tricky_session(redis_client, keys, tricky)
    write_session(redis_client, keys, session_fields(plain), [message(plain, i) for i in range(9)])
    write_session(redis_client, keys, session_fields(empty))

    run = backup_run(services)

    assert run.message_count == 7 + 9
    results = results_by_session(services, run)
    for sid, count in ((tricky, 7), (plain, 9), (empty, 0)):
        recorded = _assert_matches_rows(pg_conn, sid)
        assert recorded["message_count"] == count
        assert recorded["run"] == run.id
        assert results[sid].status is SessionStatus.COMPLETED
        assert results[sid].details == {"checksum": _checksum_text(recorded)}
    assert bytes(_recorded(pg_conn, empty)["messages_digest"]) == bytes(16)


def test_a_message_digests_the_same_from_redis_and_from_postgres(
    services, redis_client, keys, pg_conn
):
    sid = new_id()
    _write_tricky_session(redis_client, keys, sid, plain=6)
    backup_run(services)

    from_redis = {}
    for raw in redis_client.zrange(keys.messages(sid), 0, -1):
        row, lossy = parse_message(sid, raw)
        assert lossy is None
        from_redis[row[0]] = message_digest(row)
    from_postgres = {
        row[0]: message_digest(tuple(row)) for row in pg_conn.execute(MESSAGE_SQL, (sid,))
    }

    assert len(from_redis) == 10
    assert from_postgres == from_redis


def test_an_append_adds_only_the_new_messages(services, redis_client, keys, pg_conn, monkeypatch):
    sid = new_id()
    write_session(redis_client, keys, session_fields(sid), [message(sid, i) for i in range(5)])
    first = backup_run(services)
    before = _assert_matches_rows(pg_conn, sid)
    new = [message(sid, i) for i in range(5, 8)]
    add_messages(redis_client, keys, sid, new)
    add_messages(redis_client, keys, sid, [b"{not json"], score=score_of(new[-1]["created_at"]))
    hashed = _count_digests(monkeypatch)

    second = backup_run(services)

    result = results_by_session(services, second)[sid]
    assert result.messages == 3
    assert result.status is SessionStatus.PARTIAL  # the bad member was kept aside
    # Only the appended rows were hashed: the old sum was added to, not recomputed.
    assert sorted(hashed) == sorted(m["id"] for m in new)
    after = _assert_matches_rows(pg_conn, sid)
    assert after["message_count"] == 8
    assert after["run"] == second.id != first.id
    assert after["messages_digest"] != before["messages_digest"]
    assert result.details == {"checksum": _checksum_text(after)}


def test_an_append_builds_on_the_recorded_sum(services, redis_client, keys, pg_conn):
    # Had the append recomputed from the rows, a wrong recorded sum would be
    # repaired; it is carried forward instead: the recorded sum plus the new digests.
    sid = new_id()
    write_session(redis_client, keys, session_fields(sid), [message(sid, i) for i in range(3)])
    backup_run(services)
    planted = (12345).to_bytes(16, "big")
    pg_conn.execute(
        "UPDATE backup_checksums SET messages_digest = %s WHERE session_id = %s", (planted, sid)
    )
    new = message(sid, 3)
    add_messages(redis_client, keys, sid, [new])

    backup_run(services)

    row = next(r for r in pg_conn.execute(MESSAGE_SQL, (sid,)) if r[0] == new["id"])
    expected = (12345 + message_digest(tuple(row))) % MODULUS
    recorded = _recorded(pg_conn, sid)
    assert recorded["message_count"] == 4
    assert bytes(recorded["messages_digest"]) == expected.to_bytes(16, "big")


def test_a_late_message_with_an_old_timestamp_recomputes(
    services, redis_client, keys, pg_conn, monkeypatch
):
    sid = new_id()
    write_session(redis_client, keys, session_fields(sid), [message(sid, i) for i in range(4)])
    backup_run(services)
    # A wrong recorded sum, to tell a recomputation from an addition.
    pg_conn.execute(
        "UPDATE backup_checksums SET messages_digest = %s WHERE session_id = %s",
        (bytes(16), sid),
    )
    late = message(sid, 0, created_at=BASE_TIME - timedelta(days=3), content="late")
    add_messages(redis_client, keys, sid, [late])
    hashed = _count_digests(monkeypatch)

    run = backup_run(services)

    result = results_by_session(services, run)[sid]
    assert result.messages == 1
    recorded = _assert_matches_rows(pg_conn, sid)
    assert recorded["message_count"] == 5
    assert recorded["run"] == run.id
    assert len(hashed) == 5  # every stored row was read back and hashed
    assert result.details == {"checksum": _checksum_text(recorded)}


def test_a_full_backup_picks_up_an_edit_and_recomputes(services, redis_client, keys, pg_conn):
    sid = new_id()
    msgs = [message(sid, i) for i in range(4)]
    write_session(redis_client, keys, session_fields(sid), msgs)
    backup_run(services)
    before = _assert_matches_rows(pg_conn, sid)
    old = json.dumps(msgs[2], separators=(",", ":")).encode()
    edited = {**msgs[2], "content": "edited in place", "tool_calls": {"b": [1.5], "a": None}}
    redis_client.zrem(keys.messages(sid), old)
    add_messages(redis_client, keys, sid, [edited])

    plain = backup_run(services)
    # Same count, same scores: an incremental backup cannot see the edit.
    assert _recorded(pg_conn, sid)["run"] != plain.id
    full = backup_run(services, full=True)

    assert results_by_session(services, full)[sid].messages == 1
    stored = pg_conn.execute(
        "SELECT content FROM client_messages WHERE id = %s", (msgs[2]["id"],)
    ).fetchone()
    assert stored == ("edited in place",)
    after = _assert_matches_rows(pg_conn, sid)
    assert after["message_count"] == 4
    assert after["messages_digest"] != before["messages_digest"]
    assert after["run"] == full.id


def test_a_session_hash_change_only_changes_the_session_digest(
    services, redis_client, keys, pg_conn, monkeypatch
):
    sid = new_id()
    write_session(redis_client, keys, session_fields(sid), [message(sid, i) for i in range(3)])
    first = backup_run(services)
    before = _assert_matches_rows(pg_conn, sid)
    redis_client.hset(
        keys.session(sid),
        mapping={
            "name": "Renamed \u00e9",
            "settings": json.dumps({"b": {"y": 2.0, "x": 1e2}, "a": None}),
        },
    )
    hashed = _count_digests(monkeypatch)

    second = backup_run(services)

    assert results_by_session(services, second)[sid].status is SessionStatus.COMPLETED
    after = _assert_matches_rows(pg_conn, sid)
    assert hashed == []
    assert after["session_digest"] != before["session_digest"]
    assert (after["message_count"], after["messages_digest"]) == (
        before["message_count"],
        before["messages_digest"],
    )
    assert (before["run"], after["run"]) == (first.id, second.id)


def test_an_unchanged_session_keeps_its_checksum_row(services, redis_client, keys, pg_conn):
    sid = new_id()
    write_session(redis_client, keys, session_fields(sid), [message(sid, i) for i in range(3)])
    first = backup_run(services)
    before = _recorded(pg_conn, sid)

    second = backup_run(services)

    result = results_by_session(services, second)[sid]
    assert result.status is SessionStatus.UNCHANGED
    assert result.details is None
    assert _recorded(pg_conn, sid) == before
    assert before["run"] == first.id


@pytest.mark.parametrize("rows_deleted", ["one", "every"])
def test_a_missing_checksum_is_recomputed_even_if_nothing_changed(
    services, redis_client, keys, pg_conn, rows_deleted
):
    sids = [new_id() for _ in range(2)]
    for sid in sids:
        write_session(redis_client, keys, session_fields(sid), [message(sid, i) for i in range(4)])
    backup_run(services)
    before = {sid: _recorded(pg_conn, sid) for sid in sids}
    lost = sids[:1] if rows_deleted == "one" else sids
    pg_conn.execute("DELETE FROM backup_checksums WHERE session_id = ANY(%s::uuid[])", (lost,))

    run = backup_run(services)

    results = results_by_session(services, run)
    for sid in sids:
        # Nothing changed in Redis: the session's backup is unchanged.
        assert results[sid].status is SessionStatus.UNCHANGED
        assert results[sid].messages == 0
        recorded = _assert_matches_rows(pg_conn, sid)
        if sid in lost:
            assert recorded["run"] == run.id
            assert (recorded["message_count"], recorded["messages_digest"]) == (
                before[sid]["message_count"],
                before[sid]["messages_digest"],
            )
            assert results[sid].details == {"checksum": _checksum_text(recorded)}
        else:
            assert recorded == before[sid]
