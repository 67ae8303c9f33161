"""Backup, delete from Redis, restore: the same sessions and messages come back."""

from __future__ import annotations

import json
import re
from datetime import UTC, datetime, timedelta
from decimal import Decimal

from tests.factories import (
    add_messages,
    message,
    new_id,
    score_of,
    session_fields,
    write_session,
)
from tests.integration.helpers import backup_run, message_count, restore_run
from worker.models import RunStatus

UNICODE_TEXTS = [
    "dragons \U0001f409 and dice \U0001f3b2",
    "\U0001f468\u200d\U0001f469\u200d\U0001f467 family, \U0001f44d\U0001f3fd toned",
    "\u9f8d\u3068\u5730\u4e0b\u8ff7\u5bae \ub358\uc804 \u0627\u0644\u062a\u0646\u064a\u0646",
    "cafe\u0301 vs caf\u00e9, Z\u0351\u0352\u0353a\u0334l\u0335g\u0336o",
    'quotes " and \\ backslashes, \n newlines, \t tabs, \u2028 separators',
    "\u0001 control and \u007f delete",
    "",
]
TOOL_CALLS = [
    None,
    [],
    {},
    [{"name": "roll", "arguments": {"dice": "2d6+3", "advantage": True, "seed": None}}],
    {
        "calls": [{"id": "call_1", "fn": "cast", "args": {"spell": "Feuerball \U0001f525"}}],
        "numbers": [0, -1, 2**53 + 1, 9_007_199_254_740_993, 1.5, -0.25, 1e-07, 6.02e23],
        "nested": {"\u540d\u524d": ["\u00e9", {"deep": [[[]]]}]},
        "empty": "",
    },
    "a bare string",
    42,
]


def _instant(text: str) -> datetime:
    """An RFC 3339 timestamp as a UTC instant, nanoseconds truncated to the microsecond."""
    match = re.fullmatch(r"(.{19})(?:\.(\d+))?(Z|[+-]\d\d:\d\d)?", text)
    assert match is not None, text
    base, fraction, offset = match.groups()
    nanos = int((fraction or "0").ljust(9, "0")[:9])
    when = datetime.fromisoformat(base + ("+00:00" if offset in (None, "Z") else offset))
    return (when + timedelta(microseconds=nanos // 1000)).astimezone(UTC)


def _json(text: str | bytes):
    """Parsed JSON, numbers as Decimal: 6.02e23 and 602000000000000000000000 are one value."""
    return json.loads(text, parse_float=Decimal, parse_int=Decimal)


def _message_json(raw: bytes) -> dict:
    obj = _json(raw)
    obj["created_at"] = _instant(obj["created_at"])
    return obj


def _zset(redis_client, keys, sid):
    return {
        json.loads(member)["id"]: (_message_json(member), score)
        for member, score in redis_client.zrange(keys.messages(sid), 0, -1, withscores=True)
    }


def _session(redis_client, keys, sid):
    fields = {k.decode(): v.decode() for k, v in redis_client.hgetall(keys.session(sid)).items()}
    for name in ("created_at", "updated_at", "deleted_at"):
        if fields.get(name):
            fields[name] = _instant(fields[name])
    if "settings" in fields:
        fields["settings"] = _json(fields["settings"])
    return fields


def _write_varied_sessions(redis_client, keys):
    sids = []
    for n in range(3):
        sid = new_id()
        fields = session_fields(
            sid,
            name=f"{UNICODE_TEXTS[n]} #{n}",
            settings=json.dumps(
                {"langue": "fran\u00e7ais", "emoji": "\U0001f3f0", "n": n, "list": [1, "2", None]},
                ensure_ascii=n % 2 == 0,
            ),
            created_at=(
                "2026-02-12T10:00:00.123456789+08:00",
                "2026-02-12T10:00:00Z",
                "2026-02-12T05:00:00-05:00",
            )[n],
            max_players=None if n == 1 else str(n + 2),
        )
        msgs = []
        for i in range(20):
            msg = message(sid, i)
            msg["content"] = UNICODE_TEXTS[i % len(UNICODE_TEXTS)] if i % 9 else None
            msg["tool_calls"] = TOOL_CALLS[i % len(TOOL_CALLS)]
            msg["player_id"] = None if i % 5 == 0 else f"\u30d7\u30ec\u30a4\u30e4\u30fc-{i}"
            msgs.append(msg)
        write_session(redis_client, keys, fields, msgs)
        sids.append(sid)
    # Messages from a writer with offsets and nanoseconds, scored as it would score them.
    go_msg = message(sids[0], 50)
    go_msg["created_at"] = "2026-02-12T18:00:00.987654321+08:00"
    add_messages(
        redis_client,
        keys,
        sids[0],
        [json.dumps(go_msg).encode()],
        score=score_of("2026-02-12T10:00:00.987654+00:00"),
    )
    return sids


def test_round_trip_gives_back_the_same_sessions_and_messages(
    services, redis_client, keys, pg_conn
):
    sids = _write_varied_sessions(redis_client, keys)
    before_sessions = {sid: _session(redis_client, keys, sid) for sid in sids}
    before_messages = {sid: _zset(redis_client, keys, sid) for sid in sids}
    backup = backup_run(services)
    assert backup.status is RunStatus.COMPLETED
    assert backup.message_count == 61

    redis_client.delete(*(k for sid in sids for k in (keys.session(sid), keys.messages(sid))))
    redis_client.delete(keys.sessions)
    restore = restore_run(services)

    assert restore.status is RunStatus.COMPLETED
    assert restore.session_count == 3
    assert restore.message_count == 61
    assert redis_client.smembers(keys.sessions) == {sid.encode() for sid in sids}
    for sid in sids:
        after = _session(redis_client, keys, sid)
        assert after == before_sessions[sid]
        assert _zset(redis_client, keys, sid) == before_messages[sid]


def test_round_trip_preserves_exact_text(services, redis_client, keys):
    sid = new_id()
    msgs = []
    for i, text in enumerate(UNICODE_TEXTS):
        msg = message(sid, i, content=text, player_id=text or None)
        msg["tool_calls"] = {"text": text}
        msgs.append(msg)
    write_session(redis_client, keys, session_fields(sid, name=UNICODE_TEXTS[2]), msgs)
    backup_run(services)
    redis_client.delete(keys.session(sid), keys.messages(sid))

    restore_run(services, session_id=sid)

    assert redis_client.hget(keys.session(sid), "name").decode() == UNICODE_TEXTS[2]
    restored = _zset(redis_client, keys, sid)
    for msg in msgs:
        obj, _score = restored[msg["id"]]
        # Code point for code point: no normalisation, no replacement characters.
        assert obj["content"] == msg["content"]
        assert obj["player_id"] == msg["player_id"]
        assert obj["tool_calls"]["text"] == msg["content"]


def test_restored_sessions_back_up_as_unchanged_data(services, redis_client, keys, pg_conn):
    """What a restore writes is valid contract data, identical to what PostgreSQL holds."""
    sids = _write_varied_sessions(redis_client, keys)
    backup_run(services)
    redis_client.delete(*(k for sid in sids for k in (keys.session(sid), keys.messages(sid))))
    restore_run(services)

    again = backup_run(services, full=True)

    assert again.status is RunStatus.COMPLETED
    assert again.kept_count == 0
    assert again.message_count == 0
    assert message_count(pg_conn) == 61


# (created_at as a Go writer sends it, its truncated epoch milliseconds as the
# application scores it). Rounding nanoseconds would carry each into the next
# millisecond: .999999999 into the next second, .0009996 to .001.
NANOSECOND_TIMES = [
    ("2026-02-12T10:00:00.999999999+08:00", 1_770_861_600_999),
    ("2026-02-12T10:00:05.000999600Z", 1_770_890_405_000),
]


def test_round_trip_keeps_the_score_of_a_nanosecond_timestamp(services, redis_client, keys):
    sid = new_id()
    write_session(redis_client, keys, session_fields(sid))
    sent = {}
    for index, (created_at, score) in enumerate(NANOSECOND_TIMES):
        msg = message(sid, index)
        msg["created_at"] = created_at
        add_messages(redis_client, keys, sid, [json.dumps(msg).encode()], score=score)
        sent[msg["id"]] = score
    assert backup_run(services).status is RunStatus.COMPLETED
    redis_client.delete(keys.session(sid), keys.messages(sid))
    redis_client.srem(keys.sessions, sid)
    assert redis_client.exists(keys.session(sid), keys.messages(sid)) == 0

    restore = restore_run(services, session_id=sid)

    assert restore.status is RunStatus.COMPLETED
    restored = {
        json.loads(member)["id"]: (json.loads(member)["created_at"], score)
        for member, score in redis_client.zrange(keys.messages(sid), 0, -1, withscores=True)
    }
    assert {mid: score for mid, (_, score) in restored.items()} == sent
    # The restored created_at is the truncated instant, in the same millisecond.
    assert sorted(text for text, _ in restored.values()) == [
        "2026-02-12T02:00:00.999999Z",
        "2026-02-12T10:00:05.000999Z",
    ]
