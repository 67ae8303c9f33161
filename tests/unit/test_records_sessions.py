"""Session hashes of worker.records: parse_session_hash and session_hash."""

import json
from dataclasses import replace
from datetime import UTC, datetime

import pytest

from worker.models import Session
from worker.records import RecordRejected, parse_session_hash, session_hash

SID = "123e4567-e89b-12d3-a456-426614174000"
OTHER_SID = "9d5f6c1e-0b7a-4e52-8f3d-2a1b0c9d8e7f"

REQUIRED = (
    "id",
    "name",
    "creator_id",
    "mcp_server_url",
    "websocket_key",
    "created_at",
    "updated_at",
)


def fields(**changes):
    """A valid session hash as HGETALL returns it; a change to None removes the field."""
    text = {
        "id": SID,
        "name": "The Dragon's Lair",
        "creator_id": "user-42",
        "mcp_server_url": "http://mcp.example:8080/sse",
        "websocket_key": "ws-key-abc",
        "created_at": "2026-02-12T10:00:00.123456789+08:00",
        "updated_at": "2026-02-12T11:30:00Z",
    }
    text.update(changes)
    return {
        key.encode(): value if isinstance(value, bytes) else value.encode()
        for key, value in text.items()
        if value is not None
    }


def parse(**changes):
    return parse_session_hash(SID, fields(**changes))


def rejection(raw_fields, session_id=SID):
    with pytest.raises(RecordRejected) as info:
        parse_session_hash(session_id, raw_fields)
    return info.value.reason


# -- good hashes --------------------------------------------------------------------


def test_parse_session_hash_reads_required_fields_and_defaults():
    session, lossy = parse()
    assert lossy is None
    assert session == Session(
        id=SID,
        name="The Dragon's Lair",
        creator_id="user-42",
        mcp_server_url="http://mcp.example:8080/sse",
        websocket_key="ws-key-abc",
        # .123456789: nanoseconds truncated, not rounded (see test_timestamps.py).
        created_at=datetime(2026, 2, 12, 2, 0, 0, 123456, tzinfo=UTC),
        updated_at=datetime(2026, 2, 12, 11, 30, tzinfo=UTC),
        max_players=None,
        settings=None,
        status="active",
        deleted_at=None,
    )
    assert session.created_at.tzinfo is UTC
    assert session.updated_at.tzinfo is UTC


def test_parse_session_hash_reads_every_optional_field():
    session, lossy = parse(
        max_players="6",
        settings='{"theme": "dark", "dice": [4, 6, 20]}',
        status="archived",
        deleted_at="2026-03-01 12:00:00+0100",
    )
    assert lossy is None
    assert session.max_players == 6
    assert session.settings == '{"theme":"dark","dice":[4,6,20]}'  # compact
    assert session.status == "archived"
    assert session.deleted_at == datetime(2026, 3, 1, 11, 0, tzinfo=UTC)
    assert session.deleted_at.tzinfo is UTC


@pytest.mark.parametrize(
    ("changes", "attribute", "expected"),
    [
        ({"max_players": ""}, "max_players", None),
        ({"settings": ""}, "settings", None),
        ({"status": ""}, "status", "active"),
        ({"deleted_at": ""}, "deleted_at", None),
    ],
)
def test_parse_session_hash_empty_optional_fields_mean_unset(changes, attribute, expected):
    session, lossy = parse(**changes)
    assert getattr(session, attribute) == expected
    assert lossy is None


@pytest.mark.parametrize(
    ("value", "expected"),
    [("0", 0), ("1", 1), ("-1", -1), ("2147483647", 2147483647), ("-2147483648", -2147483648)],
)
def test_parse_session_hash_max_players_is_an_int32(value, expected):
    session, _ = parse(max_players=value)
    assert session.max_players == expected


@pytest.mark.parametrize(
    ("settings", "stored"),
    [
        ("{}", "{}"),
        ('{ "a" : 1 ,\n "b" : { "c" : [ true , null ] } }', '{"a":1,"b":{"c":[true,null]}}'),
        ('{"z": 1, "a": 2}', '{"z":1,"a":2}'),  # key order kept
        ('{"say": "🐉 中文"}', '{"say":"🐉 中文"}'),
        ('{"say": "\\ud83d\\udc09"}', '{"say":"🐉"}'),
        ('{"id": 123456789012345678901234567890}', '{"id":123456789012345678901234567890}'),
        ('{"code": "\\\\u0000"}', '{"code":"\\\\u0000"}'),  # the text \u0000, not a NUL
        ('{"q": "a e+1", "f": 1e+16}', '{"q":"a e+1","f":1e+16}'),
    ],
)
def test_parse_session_hash_stores_settings_as_compact_json(settings, stored):
    session, _ = parse(settings=settings)
    assert session.settings == stored
    assert json.loads(session.settings) == json.loads(settings)


@pytest.mark.parametrize(
    "text",
    [
        "The Dragon's Lair 🐉",
        "龍の巣",
        "عرين التنين",
        "line\nbreak",
    ],
)
def test_parse_session_hash_passes_unicode_through(text):
    session, _ = parse(name=text, creator_id=text)
    assert session.name == text
    assert session.creator_id == text


def test_parse_session_hash_unknown_fields_are_lossy_but_stored():
    session, lossy = parse(theme="dark", owner_email="a@b.c")
    assert session.id == SID
    assert lossy is not None
    assert "owner_email" in lossy
    assert "theme" in lossy
    assert lossy.index("owner_email") < lossy.index("theme")


def test_parse_session_hash_accepts_a_mapping_in_any_order():
    forward = fields(max_players="4")
    backward = dict(reversed(list(forward.items())))
    assert parse_session_hash(SID, backward) == parse_session_hash(SID, forward)


# -- rejected hashes ----------------------------------------------------------------


@pytest.mark.parametrize("name", REQUIRED)
def test_parse_session_hash_rejects_a_missing_required_field(name):
    reason = rejection(fields(**{name: None}))
    assert "missing required fields" in reason
    assert name in reason


@pytest.mark.parametrize("name", REQUIRED)
def test_parse_session_hash_rejects_an_empty_required_field(name):
    assert name in rejection(fields(**{name: ""}))


def test_parse_session_hash_names_every_missing_field():
    reason = rejection({b"id": SID.encode(), b"name": b"x"})
    for name in ("creator_id", "mcp_server_url", "websocket_key", "created_at", "updated_at"):
        assert name in reason


def test_parse_session_hash_rejects_an_empty_hash():
    assert "missing required fields" in rejection({})


@pytest.mark.parametrize("hash_id", [OTHER_SID, SID.upper(), SID + " "])
def test_parse_session_hash_rejects_an_id_that_does_not_match_the_key(hash_id):
    reason = rejection(fields(id=hash_id))
    assert "does not match its key" in reason
    assert SID in reason


@pytest.mark.parametrize(
    ("changes", "reason"),
    [
        ({"name": b"\xff\xfe"}, "session field 'name' is not valid UTF-8"),
        ({"status": b"\xed\xa0\x80"}, "session field 'status' is not valid UTF-8"),
        ({"name": "a\x00b"}, "session field 'name' contains a NUL byte"),
        ({"extra": "a\x00b"}, "session field 'extra' contains a NUL byte"),
        ({"max_players": "five"}, "max_players must be an integer \\(got 'five'\\)"),
        ({"max_players": "1.5"}, "max_players must be an integer"),
        ({"max_players": "99999999999"}, "max_players must be an integer"),
        ({"max_players": "2147483648"}, "max_players must be an integer"),
        ({"max_players": "-2147483649"}, "max_players must be an integer"),
        ({"max_players": " 5"}, "max_players must be an integer"),
        ({"max_players": "+5"}, "max_players must be an integer"),
        ({"max_players": "0x10"}, "max_players must be an integer"),
        ({"max_players": "1_000"}, "max_players must be an integer"),
        ({"max_players": "\u0665"}, "max_players must be an integer"),  # Arabic-Indic five
        ({"max_players": "\uff15"}, "max_players must be an integer"),  # full-width five
        ({"settings": "{not json"}, "settings is not valid JSON"),
        ({"settings": '{"a": NaN}'}, "settings is not valid JSON"),
        ({"settings": '{"a": "\\ud800"}'}, "settings is not valid JSON"),
        ({"settings": "[1, 2]"}, "settings must be a JSON object \\(got array\\)"),
        ({"settings": '"text"'}, "settings must be a JSON object \\(got string\\)"),
        ({"settings": "null"}, "settings must be a JSON object \\(got null\\)"),
        ({"settings": "3"}, "settings must be a JSON object \\(got number\\)"),
        ({"settings": '{"a": "x\\u0000y"}'}, "settings contains a NUL character"),
        ({"settings": '{"a\\u0000": 1}'}, "settings contains a NUL character"),
        ({"created_at": "2026-02-12"}, "session created_at is not an RFC 3339 timestamp"),
        ({"updated_at": "2026-02-30T00:00:00Z"}, "session updated_at is not a valid date/time"),
        ({"updated_at": "yesterday"}, "session updated_at"),
        ({"deleted_at": "soon"}, "session deleted_at is not an RFC 3339 timestamp"),
        ({"deleted_at": "2026-02-12T10:00:00+25:00"}, "session deleted_at"),
    ],
)
def test_parse_session_hash_rejects_bad_values_with_a_clear_reason(changes, reason):
    with pytest.raises(RecordRejected, match=reason):
        parse(**changes)


def test_parse_session_hash_rejects_a_field_name_that_is_not_utf8():
    raw_fields = fields()
    raw_fields[b"\xffname"] = b"x"
    assert "field name that is not valid UTF-8" in rejection(raw_fields)


def test_parse_session_hash_rejection_wins_over_lossy():
    with pytest.raises(RecordRejected, match="max_players"):
        parse(max_players="five", unknown="x")


# -- session_hash (what restore writes) ----------------------------------------------

FULL = Session(
    id=SID,
    name="The Dragon's Lair 🐉",
    creator_id="user-42",
    mcp_server_url="http://mcp.example:8080/sse",
    websocket_key="ws-key-abc",
    created_at=datetime(2026, 2, 12, 2, 0, 0, 123457, tzinfo=UTC),
    updated_at=datetime(2026, 2, 12, 11, 30, tzinfo=UTC),
    max_players=6,
    settings='{"theme":"dark","dice":[4,6,20]}',
    status="archived",
    deleted_at=datetime(2026, 3, 1, 11, 0, tzinfo=UTC),
)
MINIMAL = Session(
    id=SID,
    name="n",
    creator_id="c",
    mcp_server_url="u",
    websocket_key="k",
    created_at=datetime(1999, 12, 31, 23, 59, 59, 999999, tzinfo=UTC),
    updated_at=datetime(2000, 1, 1, tzinfo=UTC),
)


def test_session_hash_writes_strings_with_utc_microsecond_timestamps():
    assert session_hash(FULL) == {
        "id": SID,
        "name": "The Dragon's Lair 🐉",
        "creator_id": "user-42",
        "mcp_server_url": "http://mcp.example:8080/sse",
        "websocket_key": "ws-key-abc",
        "created_at": "2026-02-12T02:00:00.123457Z",
        "updated_at": "2026-02-12T11:30:00.000000Z",
        "max_players": "6",
        "settings": '{"theme":"dark","dice":[4,6,20]}',
        "status": "archived",
        "deleted_at": "2026-03-01T11:00:00.000000Z",
    }


def test_session_hash_omits_optional_fields_that_are_none():
    assert session_hash(MINIMAL) == {
        "id": SID,
        "name": "n",
        "creator_id": "c",
        "mcp_server_url": "u",
        "websocket_key": "k",
        "created_at": "1999-12-31T23:59:59.999999Z",
        "updated_at": "2000-01-01T00:00:00.000000Z",
        "status": "active",
    }


def test_session_hash_writes_max_players_zero():
    hash_ = session_hash(replace(MINIMAL, max_players=0))
    assert hash_["max_players"] == "0"


def test_session_hash_compacts_settings_as_jsonb_returns_them():
    jsonb_text = '{"dice": [4, 6, 20], "theme": "dark", "n": 123456789012345678901234567890}'
    session = replace(MINIMAL, settings=jsonb_text)
    assert session_hash(session)["settings"] == (
        '{"dice":[4,6,20],"theme":"dark","n":123456789012345678901234567890}'
    )


@pytest.mark.parametrize("session", [FULL, MINIMAL], ids=["full", "minimal"])
def test_session_hash_parses_back_to_the_same_session(session):
    written = {key.encode(): value.encode() for key, value in session_hash(session).items()}
    again, lossy = parse_session_hash(session.id, written)
    assert again == session
    assert lossy is None


@pytest.mark.parametrize(
    "changes",
    [
        {},
        {"max_players": "12", "settings": '{"a": {"b": [1, "x"]}}', "status": "ended"},
        {"deleted_at": "2026-02-12T10:00:00.5-03:00", "created_at": "2026-02-12 10:00:00"},
    ],
)
def test_a_parsed_session_survives_a_restore_and_a_second_backup(changes):
    first, _ = parse(**changes)
    written = {key.encode(): value.encode() for key, value in session_hash(first).items()}
    second, _ = parse_session_hash(SID, written)
    assert second == first
    assert session_hash(second) == session_hash(first)
