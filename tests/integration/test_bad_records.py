"""Bad data: every bad record is kept aside, raw, with its reason and run; the rest goes on."""

from __future__ import annotations

import json

import pytest

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
    kept_records,
    message_count,
    results_by_session,
    rows,
)
from worker.models import RunStatus, SessionStatus


def _member(obj) -> bytes:
    return json.dumps(obj, separators=(",", ":"), ensure_ascii=False).encode()


def _good_session(redis_client, keys, count=3):
    sid = new_id()
    write_session(redis_client, keys, session_fields(sid), [message(sid, i) for i in range(count)])
    return sid


def _assert_all_accounted_for(redis_client, keys, pg_conn, sid):
    """Every member of the zset is stored or kept: nothing is silently dropped."""
    members = redis_client.zrange(keys.messages(sid), 0, -1)
    kept = {
        bytes(r["raw"])
        for r in kept_records(pg_conn)
        if r["kind"] == "message" and r["session_id"] == sid
    }
    stored = {
        str(r["id"])
        for r in rows(pg_conn, "SELECT id FROM client_messages WHERE session_id = %s", sid)
    }
    for member in members:
        if member in kept:
            continue
        assert json.loads(member)["id"] in stored, f"dropped silently: {member!r}"


def _bad_message_cases(sid: str) -> list[tuple[str, bytes, str]]:
    def with_(**changes):
        obj = message(sid, 99)
        for name, value in changes.items():
            if value is ...:
                del obj[name]
            else:
                obj[name] = value
        return _member(obj)

    return [
        ("invalid-json", b'{"id": "0f0f", "role": "user", oops', "not valid JSON"),
        ("invalid-utf8", b'{"content": "\xff\xfe\x00"}', "not valid JSON"),
        ("not-an-object", b'["a", "list"]', "must be a JSON object"),
        ("role", with_(role="wizard"), "role must be one of"),
        ("nul-content", with_(content="before\u0000after"), "NUL"),
        ("no-id", with_(id=...), "message id is missing"),
        ("bad-id", with_(id="not-a-uuid"), "not a UUID"),
        ("no-created-at", with_(created_at=...), "created_at"),
        ("bad-created-at", with_(created_at="yesterday at noon"), "not an RFC 3339 timestamp"),
        ("impossible-date", with_(created_at="2026-02-30T10:00:00Z"), "not a valid date"),
        ("other-session", with_(session_id=new_id()), "belongs to session"),
        ("no-session-id", with_(session_id=...), "no session_id"),
        ("content-number", with_(content=42), "content must be a string"),
    ]


CASE_NAMES = [name for name, _, _ in _bad_message_cases(new_id())]


@pytest.mark.parametrize("case", CASE_NAMES)
def test_bad_message_is_kept_and_the_rest_goes_on(services, redis_client, keys, pg_conn, case):
    sid = new_id()
    good = [message(sid, i) for i in range(4)]
    write_session(redis_client, keys, session_fields(sid), good)
    _name, raw, reason = next(c for c in _bad_message_cases(sid) if c[0] == case)
    add_messages(redis_client, keys, sid, [raw], score=score_of(good[1]["created_at"]))
    other = _good_session(redis_client, keys)

    run = backup_run(services)

    assert run.status is RunStatus.PARTIAL
    assert run.kept_count == 1
    assert run.message_count == 4 + 3
    results = results_by_session(services, run)
    assert results[sid].status is SessionStatus.PARTIAL
    assert results[sid].kept == 1
    assert results[sid].messages == 4
    assert "kept aside" in results[sid].error
    assert results[other].status is SessionStatus.COMPLETED
    assert message_count(pg_conn, sid) == 4
    assert message_count(pg_conn, other) == 3

    [kept] = kept_records(pg_conn)
    assert kept["kind"] == "message"
    assert kept["redis_key"] == keys.messages(sid)
    assert kept["session_id"] == sid
    assert reason in kept["reason"]
    assert bytes(kept["raw"]) == raw  # the exact bytes, NUL and invalid UTF-8 included
    assert kept["score"] == score_of(good[1]["created_at"])
    assert kept["first_run"] == run.id
    assert kept["last_run"] == run.id
    assert kept["times_seen"] == 1
    _assert_all_accounted_for(redis_client, keys, pg_conn, sid)


def test_message_with_unknown_keys_is_stored_and_kept(services, redis_client, keys, pg_conn):
    sid = new_id()
    extra = {**message(sid, 0), "reaction": "thumbs-up"}
    write_session(redis_client, keys, session_fields(sid), [extra, message(sid, 1)])

    run = backup_run(services)

    assert run.status is RunStatus.PARTIAL
    assert message_count(pg_conn, sid) == 2
    [kept] = kept_records(pg_conn)
    assert "reaction" in kept["reason"]
    assert json.loads(bytes(kept["raw"])) == extra
    assert kept["message_id"] == extra["id"]


@pytest.mark.parametrize(
    ("change", "reason"),
    [
        ({"settings": "{not json"}, "settings is not valid JSON"),
        ({"settings": "[1, 2]"}, "settings must be a JSON object"),
        ({"websocket_key": None}, "missing required fields: websocket_key"),
        ({"created_at": None, "name": ""}, "missing required fields: name, created_at"),
        ({"updated_at": "last tuesday"}, "updated_at is not an RFC 3339 timestamp"),
        ({"max_players": "five"}, "max_players must be an integer"),
        ({"deleted_at": "soon"}, "deleted_at is not an RFC 3339 timestamp"),
    ],
)
def test_bad_session_hash_is_kept_and_the_run_goes_on(
    services, redis_client, keys, pg_conn, change, reason
):
    sid = new_id()
    fields = session_fields(sid, **change)
    write_session(redis_client, keys, fields, [message(sid, i) for i in range(3)])
    other = _good_session(redis_client, keys)

    run = backup_run(services)

    assert run.status is RunStatus.PARTIAL
    results = results_by_session(services, run)
    assert results[sid].status is SessionStatus.PARTIAL
    assert "3 messages are not backed up" in results[sid].error
    assert results[other].status is SessionStatus.COMPLETED
    assert message_count(pg_conn, other) == 3
    assert rows(pg_conn, "SELECT id FROM client_sessions WHERE id = %s", sid) == []
    [kept] = kept_records(pg_conn)
    assert kept["kind"] == "session"
    assert kept["redis_key"] == keys.session(sid)
    assert kept["session_id"] == sid
    assert reason in kept["reason"]
    assert json.loads(bytes(kept["raw"])) == fields  # the whole hash, field by field
    assert kept["last_run"] == run.id

    # Once the application fixes the hash, the session and all its messages follow.
    redis_client.delete(keys.session(sid))
    redis_client.hset(keys.session(sid), mapping=session_fields(sid))
    fixed = backup_run(services)
    assert fixed.status is RunStatus.COMPLETED
    assert message_count(pg_conn, sid) == 3


def test_hash_gone_bad_after_a_backup_keeps_messages_flowing(services, redis_client, keys, pg_conn):
    sid = _good_session(redis_client, keys)
    backup_run(services)

    redis_client.hset(keys.session(sid), mapping={"settings": "{oops", "name": "New name"})
    add_messages(redis_client, keys, sid, [message(sid, i) for i in range(3, 6)])
    run = backup_run(services)

    assert run.status is RunStatus.PARTIAL
    assert results_by_session(services, run)[sid].messages == 3
    assert message_count(pg_conn, sid) == 6
    # The row keeps the last good hash rather than half of a bad one.
    assert rows(pg_conn, "SELECT name FROM client_sessions WHERE id = %s", sid) == [
        {"name": "The Sunless Citadel"}
    ]


@pytest.mark.parametrize(
    "member",
    [b"*", b"not-a-uuid", b"a:b", b"", b"\xff\xfe", b"5F3C1C9A-0D4B-4E1E-9F7A-1B2C3D4E5F60"],
)
def test_bad_session_id_in_the_set_is_kept(services, redis_client, keys, pg_conn, member):
    redis_client.sadd(keys.sessions, member)
    other = _good_session(redis_client, keys)

    run = backup_run(services)

    assert run.status is RunStatus.PARTIAL
    assert run.kept_count == 1
    assert set(results_by_session(services, run)) == {other}
    assert message_count(pg_conn, other) == 3
    [kept] = kept_records(pg_conn)
    assert kept["kind"] == "session_id"
    assert kept["redis_key"] == keys.sessions
    assert bytes(kept["raw"]) == member
    assert "session ID in the sessions set" in kept["reason"]
    assert kept["last_run"] == run.id
    # Nothing was read or written under a key built from the bad ID.
    assert redis_client.exists(keys.session(member.decode("utf-8", "replace"))) == 0


def test_session_id_in_the_set_with_no_hash_is_kept(services, redis_client, keys, pg_conn):
    sid = new_id()
    redis_client.sadd(keys.sessions, sid)
    add_messages(redis_client, keys, sid, [message(sid, 0)])
    other = _good_session(redis_client, keys)

    run = backup_run(services)

    assert run.status is RunStatus.PARTIAL
    results = results_by_session(services, run)
    assert results[sid].status is SessionStatus.PARTIAL
    assert results[other].status is SessionStatus.COMPLETED
    [kept] = kept_records(pg_conn)
    assert kept["kind"] == "session_id"
    assert kept["session_id"] == sid
    assert bytes(kept["raw"]) == sid.encode()
    assert "no session hash" in kept["reason"]
    assert kept["last_run"] == run.id


def test_same_message_id_twice_in_one_session(services, redis_client, keys, pg_conn):
    sid = new_id()
    first = message(sid, 1, content="first")
    twin = {**first, "content": "second, same id"}
    write_session(redis_client, keys, session_fields(sid), [message(sid, 0), first])
    add_messages(redis_client, keys, sid, [twin])  # same score as `first`

    run = backup_run(services)

    assert run.status is RunStatus.PARTIAL
    assert message_count(pg_conn, sid) == 2
    [kept] = kept_records(pg_conn)
    assert "same id" in kept["reason"]
    assert kept["message_id"] == first["id"]
    stored = rows(pg_conn, "SELECT content FROM client_messages WHERE id = %s", first["id"])
    assert len(stored) == 1
    # The kept one is the other one: between them, both are somewhere.
    assert {stored[0]["content"], json.loads(bytes(kept["raw"]))["content"]} == {
        "first",
        "second, same id",
    }
    _assert_all_accounted_for(redis_client, keys, pg_conn, sid)
    assert results_by_session(services, run)[sid].messages == 2


def test_same_message_id_in_two_sessions_in_one_run(services, redis_client, keys, pg_conn):
    owner, intruder = sorted([new_id(), new_id()])  # the engine reads sessions in ID order
    shared = message(owner, 0)
    write_session(redis_client, keys, session_fields(owner), [shared, message(owner, 1)])
    copy = {**shared, "session_id": intruder}
    write_session(redis_client, keys, session_fields(intruder), [copy, message(intruder, 1)])

    run = backup_run(services)

    assert run.status is RunStatus.PARTIAL
    assert run.message_count == 3
    stored = rows(
        pg_conn, "SELECT session_id::text FROM client_messages WHERE id = %s", shared["id"]
    )
    assert stored == [{"session_id": owner}]
    assert message_count(pg_conn, intruder) == 1
    [kept] = kept_records(pg_conn)
    assert kept["session_id"] == intruder
    assert kept["redis_key"] == keys.messages(intruder)
    assert f"already stored for session {owner}" in kept["reason"]
    assert bytes(kept["raw"]) == _member(copy)
    results = results_by_session(services, run)
    assert results[owner].status is SessionStatus.COMPLETED
    assert results[intruder].status is SessionStatus.PARTIAL


def test_same_message_id_in_a_session_backed_up_later(services, redis_client, keys, pg_conn):
    intruder, owner = sorted([new_id(), new_id()])  # the later session sorts first
    shared = message(owner, 0)
    write_session(redis_client, keys, session_fields(owner), [shared])
    backup_run(services)

    copy = {**shared, "session_id": intruder}
    write_session(redis_client, keys, session_fields(intruder), [copy, message(intruder, 2)])
    run = backup_run(services)

    assert run.status is RunStatus.PARTIAL
    assert run.message_count == 1
    assert rows(
        pg_conn, "SELECT session_id::text FROM client_messages WHERE id = %s", shared["id"]
    ) == [{"session_id": owner}]
    [kept] = kept_records(pg_conn)
    assert kept["session_id"] == intruder
    assert bytes(kept["raw"]) == _member(copy)


def test_bad_records_seen_again_update_their_kept_row(services, redis_client, keys, pg_conn):
    sid = new_id()
    bad_message = _member(message(sid, 5, role="wizard"))
    write_session(redis_client, keys, session_fields(sid), [message(sid, 0)])
    add_messages(redis_client, keys, sid, [bad_message], score=1)
    bad_hash = new_id()
    write_session(redis_client, keys, session_fields(bad_hash, settings="{"))
    redis_client.sadd(keys.sessions, b"not-a-uuid")

    first = backup_run(services)
    before = {r["kind"]: r for r in kept_records(pg_conn)}
    assert set(before) == {"message", "session", "session_id"}
    second = backup_run(services, full=True)  # full: the bad message is read again too

    assert second.status is RunStatus.PARTIAL
    after = {r["kind"]: r for r in kept_records(pg_conn)}
    assert len(kept_records(pg_conn)) == 3  # no new rows
    for kind, row in after.items():
        assert row["id"] == before[kind]["id"]
        assert row["times_seen"] == 2
        assert row["first_run"] == first.id
        assert row["last_run"] == second.id
    assert bytes(after["message"]["raw"]) == bad_message

    # Marked resolved, but still in Redis and still bad: the next run reopens it.
    services.pg.resolve_kept_records([after["message"]["id"]])
    backup_run(services, full=True)
    reopened = {r["kind"]: r for r in kept_records(pg_conn)}["message"]
    assert reopened["resolved_at"] is None


def test_session_hash_id_not_matching_its_key(services, redis_client, keys, pg_conn):
    sid = new_id()
    write_session(redis_client, keys, session_fields(sid), [message(sid, 0)])
    redis_client.hset(keys.session(sid), "id", new_id())

    run = backup_run(services)

    assert run.status is RunStatus.PARTIAL
    [kept] = kept_records(pg_conn)
    assert kept["kind"] == "session"
    assert "does not match its key" in kept["reason"]
    assert rows(pg_conn, "SELECT id FROM client_sessions") == []


def test_a_session_of_garbage_is_kept_whole(services, redis_client, keys, pg_conn):
    """Thousands of bad members (more than are buffered at once) and a few good ones."""
    sid = new_id()
    good = [message(sid, i) for i in range(10)]
    write_session(redis_client, keys, session_fields(sid), good)
    pipe = redis_client.pipeline(transaction=False)
    bad = [b'{"garbage": %d' % n for n in range(2500)]
    for n, raw in enumerate(bad):
        # Interleaved with the good ones, so the COPY is paused and resumed mid-stream.
        add_messages(pipe, keys, sid, [raw], score=score_of(good[0]["created_at"]) + n)
    pipe.execute()

    run = backup_run(services)

    assert run.status is RunStatus.PARTIAL
    assert run.kept_count == 2500
    assert run.message_count == 10
    assert message_count(pg_conn, sid) == 10
    kept = kept_records(pg_conn)
    assert len(kept) == 2500
    assert {bytes(r["raw"]) for r in kept} == set(bad)
    assert {r["last_run"] for r in kept} == {run.id}
    assert results_by_session(services, run)[sid].kept == 2500
    assert backup_run(services).message_count == 0


@pytest.mark.parametrize("which", ["hash", "messages"])
def test_key_of_the_wrong_type_fails_only_its_session(services, redis_client, keys, pg_conn, which):
    bad = new_id()
    write_session(redis_client, keys, session_fields(bad), [message(bad, 0)])
    key = keys.session(bad) if which == "hash" else keys.messages(bad)
    redis_client.delete(key)
    redis_client.rpush(key, b"not what the contract says")
    others = [_good_session(redis_client, keys) for _ in range(3)]  # in the same batch

    run = backup_run(services)

    results = results_by_session(services, run)
    assert results[bad].status is SessionStatus.FAILED
    assert "WRONGTYPE" in results[bad].error
    for sid in others:
        assert results[sid].status is SessionStatus.COMPLETED
        assert message_count(pg_conn, sid) == 3
    assert run.status is RunStatus.FAILED  # a session could not be backed up at all
    assert run.failed_count == 1
    assert run.message_count == 9
