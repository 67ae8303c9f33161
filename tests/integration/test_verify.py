"""Verify: Redis and PostgreSQL compared session by session, and every kind of difference."""

from __future__ import annotations

import json
from datetime import timedelta

import pytest

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
from tests.integration.helpers import backup_run, results_by_session, verify_run
from worker import verify
from worker.models import RunStatus, SessionStatus

# Every test here down both of verify's paths to the backup's side.
pytestmark = pytest.mark.usefixtures("verify_paths")


def _member(msg: dict) -> bytes:
    return json.dumps(msg, separators=(",", ":"), ensure_ascii=False).encode()


def _backed_up(services, redis_client, keys, count: int = 4, **fields) -> tuple[str, list]:
    sid = new_id()
    msgs = [message(sid, i) for i in range(count)]
    write_session(redis_client, keys, session_fields(sid, **fields), msgs)
    backup_run(services, session_id=sid)
    return sid, msgs


def _verify(services, session_id=None, quick=False):
    """The run, and each session's details (what verify found) by session ID."""
    run = verify_run(services, session_id=session_id, quick=quick)
    assert run.kind == "verify"
    results = results_by_session(services, run)
    return run, results, {sid: r.details for sid, r in results.items()}


def _assert_agrees(result, details, count):
    assert result.status is SessionStatus.COMPLETED, result.error
    assert result.error is None
    assert details["agrees"] is True
    assert details["messages_in_redis"] == details["messages_in_backup"] == count
    for kind in ("missing_from_backup", "missing_from_redis", "different", "kept_aside"):
        assert details[kind] == 0
    assert details["fields_differ"] == []
    assert details["backup_damaged"] is False


def _assert_one_difference(run, result, details, expected_error: str):
    assert run.status is RunStatus.FAILED
    assert run.failed_count == 1
    assert "1 session(s) differ" in run.error
    assert result.status is SessionStatus.DIFFERENT
    assert details["agrees"] is False
    assert result.error == expected_error


def test_everything_agrees_after_a_backup(services, redis_client, keys):
    plain, _ = _backed_up(services, redis_client, keys, 6)
    empty, _ = _backed_up(services, redis_client, keys, 0)
    odd = new_id()
    odd_messages = [
        message(odd, 0),
        message(odd, 1, tool_calls={"z": {"b": 1.0, "a": [0.1, 1e16, 2.5e-7]}, "a": None}),
        message(odd, 2, content=None, player_id=None, tool_calls=[]),
        message(odd, 3, content="caf\u00e9 \U0001f409 \u2028"),
    ]
    write_session(
        redis_client,
        keys,
        session_fields(odd, settings=json.dumps({"b": {"y": 1e16}, "a": 0.5})),
        odd_messages[:1],
    )
    backup_run(services)
    # The rest arrive later: the backup appends them, adding to its checksum.
    add_messages(redis_client, keys, odd, odd_messages[1:])
    backup_run(services)

    run, results, details = _verify(services)

    assert run.status is RunStatus.COMPLETED
    assert run.error is None
    assert (run.session_count, run.failed_count) == (3, 0)
    assert run.details["quick"] is False
    for sid, count in ((plain, 6), (empty, 0), (odd, 4)):
        _assert_agrees(results[sid], details[sid], count)
        assert details[sid]["checked_by"] == "messages"
        assert (details[sid]["in_redis"], details[sid]["in_backup"]) == (True, True)

    single, results, _ = _verify(services, session_id=odd)
    assert single.scope == "session"
    assert single.status is RunStatus.COMPLETED
    assert set(results) == {odd}


def test_quick_agrees_by_checksum_and_falls_back_on_a_mismatch(
    services, redis_client, keys, pg_conn
):
    same, _ = _backed_up(services, redis_client, keys, 5)
    grown, _ = _backed_up(services, redis_client, keys, 3)
    renamed, _ = _backed_up(services, redis_client, keys, 2)
    unrecorded, _ = _backed_up(services, redis_client, keys, 2)

    run, results, details = _verify(services, quick=True)
    assert run.status is RunStatus.COMPLETED
    assert run.details["quick"] is True
    for sid in (same, grown, renamed, unrecorded):
        assert details[sid]["checked_by"] == "checksum"
        assert results[sid].status is SessionStatus.COMPLETED

    extra = message(grown, 9)
    add_messages(redis_client, keys, grown, [extra])
    redis_client.hset(keys.session(renamed), "name", "Another name")
    pg_conn.execute("DELETE FROM backup_checksums WHERE session_id = %s", (unrecorded,))

    run, results, details = _verify(services, quick=True)

    assert run.status is RunStatus.FAILED
    assert details[same]["checked_by"] == "checksum"
    assert details[same]["messages_in_backup"] == 5
    # No match, or nothing to match: the full comparison, which says what differs.
    for sid in (grown, renamed, unrecorded):
        assert details[sid]["checked_by"] == "messages"
    assert details[grown]["missing_from_backup"] == 1
    assert details[grown]["examples"] == {"missing_from_backup": [extra["id"]]}
    assert details[renamed]["fields_differ"] == ["name"]
    assert results[unrecorded].status is SessionStatus.COMPLETED
    assert {sid for sid, r in results.items() if r.status is SessionStatus.DIFFERENT} == {
        grown,
        renamed,
    }


def test_message_added_in_redis_after_the_backup(services, redis_client, keys):
    sid, _ = _backed_up(services, redis_client, keys, 3)
    new = message(sid, 3)
    add_messages(redis_client, keys, sid, [new])

    run, results, details = _verify(services, session_id=sid)

    _assert_one_difference(run, results[sid], details[sid], "1 message(s) missing from the backup")
    assert details[sid]["missing_from_backup"] == 1
    assert details[sid]["examples"] == {"missing_from_backup": [new["id"]]}
    assert (details[sid]["messages_in_redis"], details[sid]["messages_in_backup"]) == (4, 3)
    assert details[sid]["backup_damaged"] is False
    assert results[sid].messages == 4


def test_message_removed_from_redis(services, redis_client, keys):
    sid, msgs = _backed_up(services, redis_client, keys, 3)
    redis_client.zrem(keys.messages(sid), _member(msgs[1]))

    run, results, details = _verify(services)

    _assert_one_difference(run, results[sid], details[sid], "1 message(s) missing from Redis")
    assert details[sid]["missing_from_redis"] == 1
    assert details[sid]["examples"] == {"missing_from_redis": [msgs[1]["id"]]}
    assert details[sid]["backup_damaged"] is False


def test_message_edited_in_redis(services, redis_client, keys):
    sid, msgs = _backed_up(services, redis_client, keys, 3)
    redis_client.zrem(keys.messages(sid), _member(msgs[0]))
    add_messages(redis_client, keys, sid, [{**msgs[0], "content": "rewritten"}])

    run, results, details = _verify(services)

    _assert_one_difference(run, results[sid], details[sid], "1 message(s) different")
    assert details[sid]["different"] == 1
    assert details[sid]["examples"] == {"different": [msgs[0]["id"]]}
    assert details[sid]["missing_from_backup"] == details[sid]["missing_from_redis"] == 0


def test_session_fields_that_differ_are_listed(services, redis_client, keys):
    sid, _ = _backed_up(services, redis_client, keys, 2)
    same_value, _ = _backed_up(services, redis_client, keys, 1)
    redis_client.hset(keys.session(sid), mapping={"name": "Renamed", "max_players": "6"})
    # The same values written another way are no difference: settings with
    # other key order and spacing, a timestamp with another offset.
    settings = json.loads(session_fields(same_value)["settings"])
    redis_client.hset(
        keys.session(same_value),
        mapping={
            "settings": json.dumps(dict(reversed(settings.items())), indent=4),
            "updated_at": (BASE_TIME + timedelta(minutes=5, hours=2)).isoformat()[:19] + "+02:00",
        },
    )

    run, results, details = _verify(services)

    _assert_one_difference(run, results[sid], details[sid], "fields differ: name, max_players")
    assert details[sid]["fields_differ"] == ["name", "max_players"]
    _assert_agrees(results[same_value], details[same_value], 1)


def test_session_only_in_redis_is_missing_from_the_backup(services, redis_client, keys):
    _backed_up(services, redis_client, keys, 1)
    sid = new_id()
    write_session(redis_client, keys, session_fields(sid), [message(sid, i) for i in range(3)])

    run, results, details = _verify(services)

    _assert_one_difference(run, results[sid], details[sid], "missing from the backup")
    assert (details[sid]["in_redis"], details[sid]["in_backup"]) == (True, False)
    assert details[sid]["messages_in_redis"] == 3


def test_session_only_in_postgres_is_missing_from_redis(services, redis_client, keys):
    _backed_up(services, redis_client, keys, 1)
    sid, _ = _backed_up(services, redis_client, keys, 3)
    redis_client.delete(keys.session(sid), keys.messages(sid))
    redis_client.srem(keys.sessions, sid)

    run, results, details = _verify(services)

    _assert_one_difference(run, results[sid], details[sid], "missing from Redis")
    assert (details[sid]["in_redis"], details[sid]["in_backup"]) == (False, True)
    assert details[sid]["missing_from_redis"] == 3
    assert details[sid]["messages_in_backup"] == 3


def test_session_hash_gone_from_redis_is_a_difference(services, redis_client, keys):
    listed, _ = _backed_up(services, redis_client, keys, 2)
    unlisted, _ = _backed_up(services, redis_client, keys, 3)
    redis_client.delete(keys.session(listed), keys.session(unlisted))
    redis_client.srem(keys.sessions, unlisted)  # only its messages are left

    run, results, details = _verify(services)

    assert run.status is RunStatus.FAILED
    assert run.failed_count == 2
    for sid, reason in (
        (listed, "listed in the sessions set but has no session hash"),
        (unlisted, "has 3 messages but no session hash"),
    ):
        assert results[sid].status is SessionStatus.DIFFERENT
        assert details[sid]["redis_unreadable"] == reason
        assert results[sid].error == f"session in Redis unreadable ({reason})"
        assert details[sid]["missing_from_backup"] == details[sid]["missing_from_redis"] == 0


def test_soft_deleted_session_not_in_redis_agrees(services, redis_client, keys):
    live, _ = _backed_up(services, redis_client, keys, 1)
    gone, _ = _backed_up(services, redis_client, keys, 2, deleted_at=iso(BASE_TIME))
    redis_client.delete(keys.session(gone), keys.messages(gone))
    redis_client.srem(keys.sessions, gone)

    every, results, _ = _verify(services)
    single, single_results, details = _verify(services, session_id=gone)

    assert every.status is RunStatus.COMPLETED
    assert set(results) == {live}  # a soft-deleted session is not one to look for
    assert single.status is RunStatus.COMPLETED
    assert single_results[gone].status is SessionStatus.COMPLETED
    assert details[gone]["soft_deleted"] is True
    assert details[gone]["agrees"] is True


def test_bad_record_in_redis_shows_as_kept_aside(services, redis_client, keys):
    sid, msgs = _backed_up(services, redis_client, keys, 2)
    add_messages(redis_client, keys, sid, [b"{not json"], score=score_of(msgs[0]["created_at"]))
    add_messages(
        redis_client, keys, sid, [_member({**message(sid, 5), "session_id": new_id()})], score=1
    )
    backup_run(services)  # keeps them aside; they still are not in the backup

    run, results, details = _verify(services)

    _assert_one_difference(
        run, results[sid], details[sid], "2 message(s) kept aside (cannot be stored)"
    )
    assert details[sid]["kept_aside"] == 2
    assert details[sid]["messages_in_redis"] == details[sid]["messages_in_backup"] == 2
    assert details[sid]["missing_from_backup"] == 0


def test_backup_changed_behind_its_back_is_damaged_until_a_full_backup(
    services, redis_client, keys, pg_conn
):
    sid, msgs = _backed_up(services, redis_client, keys, 4)
    other, _ = _backed_up(services, redis_client, keys, 2)
    pg_conn.execute(
        "UPDATE client_messages SET content = 'tampered' WHERE id = %s", (msgs[2]["id"],)
    )

    run, results, details = _verify(services)

    result = results[sid]
    assert result.status is SessionStatus.DIFFERENT
    assert details[sid]["backup_damaged"] is True
    assert details[sid]["different"] == 1
    assert details[sid]["examples"] == {"different": [msgs[2]["id"]]}
    assert "backup damaged" in result.error
    assert results[other].status is SessionStatus.COMPLETED
    assert run.status is RunStatus.FAILED

    # An ordinary backup sees nothing new in Redis and leaves it damaged ...
    backup_run(services)
    assert _verify(services)[2][sid]["backup_damaged"] is True
    # ... a full one rewrites it from Redis and records its checksum again.
    backup_run(services, full=True)
    run, results, details = _verify(services)
    assert run.status is RunStatus.COMPLETED
    _assert_agrees(results[sid], details[sid], 4)


def test_message_deleted_from_postgres_behind_the_backups_back(
    services, redis_client, keys, pg_conn
):
    sid, msgs = _backed_up(services, redis_client, keys, 3)
    pg_conn.execute("DELETE FROM client_messages WHERE id = %s", (msgs[0]["id"],))

    _run, _results, details = _verify(services, session_id=sid)

    assert details[sid]["backup_damaged"] is True
    assert details[sid]["missing_from_backup"] == 1
    assert details[sid]["examples"] == {"missing_from_backup": [msgs[0]["id"]]}


def test_a_session_that_cannot_be_read_fails_alone(services, redis_client, keys):
    good, _ = _backed_up(services, redis_client, keys, 2)
    bad, _ = _backed_up(services, redis_client, keys, 2)
    differs, _ = _backed_up(services, redis_client, keys, 1)
    redis_client.delete(keys.messages(bad))
    redis_client.set(keys.messages(bad), "not a zset")  # WRONGTYPE on every read
    redis_client.hset(keys.session(differs), "name", "changed")

    run, results, details = _verify(services)  # all three in one batch

    assert run.status is RunStatus.FAILED
    assert results[bad].status is SessionStatus.FAILED
    assert "WRONGTYPE" in results[bad].error
    assert results[good].status is SessionStatus.COMPLETED
    assert results[differs].status is SessionStatus.DIFFERENT
    assert details[differs]["fields_differ"] == ["name"]


def _odd_messages(sid: str) -> list[dict]:
    """Messages without tool_calls whose canonical form PostgreSQL must build as Python does."""
    odd_texts = [
        'quotes " and \\ backslashes \\" and a solidus /',
        "lines\nand\ttabs\r\x08\x0c and controls \x01\x1f\x7f",
        "caf\u00e9 \U0001f409 \u2028\u2029 <>&'",
        "",
        "\\u0000 as text, not a NUL",
    ]
    msgs = [message(sid, i, content=text, tool_calls=None) for i, text in enumerate(odd_texts)]
    msgs += [
        message(sid, 10, content=None, player_id=None, tool_calls=None),
        message(sid, 11, player_id='p"1\\\n', tool_calls=None),
        # Before 1970, and a writer's offset and nanoseconds (truncated to microseconds).
        message(sid, 12, created_at=BASE_TIME.replace(year=1969), tool_calls=None),
        message(sid, 13, tool_calls=None, created_at=None)
        | {"created_at": "2026-02-12T11:00:00.123456789+01:00"},
    ]
    return msgs


def test_stored_rows_that_match_redis_are_not_read_back(services, redis_client, keys, pg_conn):
    """PostgreSQL's fingerprint of a row without tool_calls equals Python's (odd text too)."""
    sid = new_id()
    odd = _odd_messages(sid)
    with_tools = message(sid, 20, tool_calls=[{"name": "roll", "arguments": {"n": 1.50}}])
    write_session(redis_client, keys, session_fields(sid), [*odd, with_tools])
    backup_run(services)

    run, results, details = _verify(services, session_id=sid)

    assert run.status is RunStatus.COMPLETED
    _assert_agrees(results[sid], details[sid], len(odd) + 1)
    # Only the message with tool_calls came back from PostgreSQL to be digested.
    pg = services.pg
    pg.prepare_verify()
    with pg.transaction(read_only=True):
        with pg.verify_staging(sid, None, with_backup=False) as staging:
            staged, _total = verify._digest_page(
                sid, list(_members(redis_client, keys, sid)), _diff(sid), 0
            )
            staging.add(staged)
        back = list(pg.compare_staged(sid, None, backup_staged=False))
    assert [(redis_id, row[0]) for redis_id, _digest, row in back] == [
        (with_tools["id"], with_tools["id"])
    ]


def _members(redis_client, keys, sid: str):
    return redis_client.zrange(keys.messages(sid), 0, -1)


def _diff(sid: str) -> verify.SessionDiff:
    return verify.SessionDiff(session_id=sid)


def test_edits_and_damage_of_messages_without_tool_calls(services, redis_client, keys, pg_conn):
    sid = new_id()
    msgs = [message(sid, i, tool_calls=None) for i in range(4)]
    write_session(redis_client, keys, session_fields(sid), msgs)
    backup_run(services, session_id=sid)
    redis_client.zrem(keys.messages(sid), _member(msgs[0]))
    add_messages(redis_client, keys, sid, [{**msgs[0], "content": "rewritten"}])
    pg_conn.execute("UPDATE client_messages SET player_id = NULL WHERE id = %s", (msgs[1]["id"],))
    pg_conn.execute(
        "UPDATE client_messages SET created_at = created_at + interval '1 microsecond' "
        "WHERE id = %s",
        (msgs[2]["id"],),
    )

    _run, results, details = _verify(services, session_id=sid)

    assert results[sid].status is SessionStatus.DIFFERENT
    assert details[sid]["different"] == 3
    assert sorted(details[sid]["examples"]["different"]) == sorted(m["id"] for m in msgs[:3])
    assert details[sid]["backup_damaged"] is True
    assert details[sid]["messages_in_redis"] == details[sid]["messages_in_backup"] == 4


@pytest.mark.parametrize("remembered", [verify.REMEMBERED_IDS, 1])
def test_same_id_twice_in_redis_is_kept_aside(
    services, redis_client, keys, monkeypatch, remembered
):
    """Found by the remembered IDs, or by PostgreSQL past REMEMBERED_IDS: the same details."""
    monkeypatch.setattr(verify, "REMEMBERED_IDS", remembered)
    sid, msgs = _backed_up(services, redis_client, keys, 3)
    twin = {**msgs[2], "content": "second, same id"}
    add_messages(redis_client, keys, sid, [twin])

    run, results, details = _verify(services, session_id=sid)

    _assert_one_difference(
        run, results[sid], details[sid], "1 message(s) kept aside (cannot be stored)"
    )
    assert details[sid]["kept_aside"] == 1
    assert details[sid]["examples"] == {"kept_aside": [msgs[2]["id"]]}
    assert details[sid]["messages_in_redis"] == details[sid]["messages_in_backup"] == 3
    assert details[sid]["different"] == 0
    assert details[sid]["backup_damaged"] is False
