"""Records of worker.records: identifiers, messages, digests."""

import json
from datetime import UTC, datetime

import pytest

from worker.errors import InvalidArgument
from worker.models import MESSAGE_COLUMNS
from worker.records import (
    RecordRejected,
    classify_set_member,
    encode_raw_hash,
    hash_digest,
    parse_message,
    parse_session_id,
    peek_message_id,
)

SID = "123e4567-e89b-12d3-a456-426614174000"
OTHER_SID = "9d5f6c1e-0b7a-4e52-8f3d-2a1b0c9d8e7f"
MID = "0f8fad5b-d9cb-469f-a165-70867728950e"


def message(**changes):
    """A valid message object; a change to None removes the key."""
    obj = {
        "id": MID,
        "session_id": SID,
        "created_at": "2026-02-12T10:00:00.123456789+08:00",
        "role": "user",
        "content": "hello",
        "tool_calls": None,
        "player_id": "player-1",
    }
    obj.update(changes)
    return {key: value for key, value in obj.items() if value is not None}


def raw(**changes):
    return json.dumps(message(**changes)).encode()


def rejection(raw_bytes, session_id=SID):
    with pytest.raises(RecordRejected) as info:
        parse_message(session_id, raw_bytes)
    return info.value.reason


# -- identifiers -----------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (SID, True),
        ("00000000-0000-0000-0000-000000000000", True),
        (SID.upper(), False),
        (SID.replace("-", ""), False),
        ("{" + SID + "}", False),
        ("urn:uuid:" + SID, False),
        (SID + "0", False),
        (SID[:-1], False),
        (" " + SID, False),
        (SID + "\n", False),
        ("123e4567-e89b-12d3-a456-42661417400g", False),
        ("", False),
        ("*", False),
    ],
)
def test_classify_set_member_accepts_only_canonical_uuids(value, expected):
    # The only form the sessions set may hold: a restore writes keys in this form.
    if expected:
        assert classify_set_member(value.encode()) == value
    else:
        with pytest.raises(RecordRejected):
            classify_set_member(value.encode())


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (SID, SID),
        (SID.upper(), SID),
        ("123E4567-e89b-12D3-A456-426614174000", SID),
        (f"  {SID}  ", SID),
        (f"\t{SID.upper()}\n", SID),
    ],
)
def test_parse_session_id_returns_the_canonical_form(value, expected):
    assert parse_session_id(value) == expected


@pytest.mark.parametrize(
    "value",
    [
        "*",
        "a:b",
        "",
        " ",
        "dnd:sessions",
        f"dnd:session:{SID}",
        SID + "0",
        SID + ":messages",
        SID + "*",
        "x" + SID,
        f"{SID} {SID}",
        SID.replace("-", ""),
        "{" + SID + "}",
        "urn:uuid:" + SID,
        "123e4567-e89b-12d3-a456-42661417400z",
        None,
        42,
    ],
)
def test_parse_session_id_refuses_anything_else(value):
    with pytest.raises(InvalidArgument, match="session ID must be a UUID"):
        parse_session_id(value)


def test_parse_session_id_error_shows_what_was_given():
    with pytest.raises(InvalidArgument) as info:
        parse_session_id("a:b")
    assert "'a:b'" in str(info.value)


def test_classify_set_member_returns_a_canonical_id():
    assert classify_set_member(SID.encode()) == SID


@pytest.mark.parametrize(
    ("member", "reason"),
    [
        (SID.upper().encode(), "upper-case UUID"),
        (b"not-a-uuid", "not a UUID"),
        (b"", "not a UUID"),
        (b"*", "not a UUID"),
        (f" {SID}".encode(), "not a UUID"),
        (SID.encode() + b"\x00", "not a UUID"),
        (b"\xff\xfe" + SID.encode(), "not valid UTF-8"),
    ],
)
def test_classify_set_member_rejects_members_that_are_not_canonical_ids(member, reason):
    with pytest.raises(RecordRejected, match=reason):
        classify_set_member(member)


# -- parse_message: good records ------------------------------------------------


def test_parse_message_returns_a_row_in_column_order():
    row, lossy = parse_message(SID, raw(tool_calls=[{"name": "roll", "args": {"dice": "2d6"}}]))
    assert lossy is None
    assert len(row) == len(MESSAGE_COLUMNS)
    assert dict(zip(MESSAGE_COLUMNS, row, strict=True)) == {
        "id": MID,
        "session_id": SID,
        # .123456789+08:00: nanoseconds truncated, not rounded (see test_timestamps.py).
        "created_at": datetime(2026, 2, 12, 2, 0, 0, 123456, tzinfo=UTC),
        "role": "user",
        "content": "hello",
        "tool_calls": '[{"name":"roll","args":{"dice":"2d6"}}]',
        "player_id": "player-1",
    }
    assert row[2].tzinfo is UTC


@pytest.mark.parametrize("role", ["system", "user", "assistant", "tool"])
def test_parse_message_accepts_every_role(role):
    row, _ = parse_message(SID, raw(role=role))
    assert row[3] == role


def test_parse_message_missing_optional_keys_are_none():
    data = {"id": MID, "session_id": SID, "created_at": "2026-02-12T10:00:00Z", "role": "tool"}
    row, lossy = parse_message(SID, json.dumps(data).encode())
    assert row[4:] == (None, None, None)
    assert lossy is None


def test_parse_message_explicit_nulls_are_none():
    data = {
        "id": MID,
        "session_id": SID,
        "created_at": "2026-02-12T10:00:00Z",
        "role": "assistant",
        "content": None,
        "tool_calls": None,
        "player_id": None,
    }
    row, lossy = parse_message(SID, json.dumps(data).encode())
    assert row[4:] == (None, None, None)
    assert lossy is None


def test_parse_message_keeps_an_empty_content_string():
    row, _ = parse_message(SID, raw(content=""))
    assert row[4] == ""


@pytest.mark.parametrize(
    "text",
    [
        "🎲 rolled a 20! 🐉",
        "中文内容,日本語のテキスト",
        "مرحبا بالعالم",  # right-to-left
        "שלום \u200f עולם",  # with a right-to-left mark
        "e\u0301 (combining accent)",
        'line one\nline two\ttab \\ backslash "quotes"',
        "\U0001f9d9\u200d\u2642\ufe0f zero-width joiner",
    ],
)
def test_parse_message_passes_unicode_through_intact(text):
    for encoded in (
        json.dumps(message(content=text, player_id=text), ensure_ascii=False).encode(),
        json.dumps(message(content=text, player_id=text), ensure_ascii=True).encode(),
    ):
        row, _ = parse_message(SID, encoded)
        assert row[4] == text
        assert row[6] == text


def test_parse_message_keeps_unicode_in_tool_calls():
    calls = {"say": "🐉 中文 مرحبا"}
    row, _ = parse_message(SID, raw(tool_calls=calls))
    assert json.loads(row[5]) == calls
    assert "🐉 中文 مرحبا" in row[5]


@pytest.mark.parametrize(
    "tool_calls",
    [
        [],
        {},
        "a string",
        0,
        -1.5,
        True,
        False,
        [{"id": "call_1", "function": {"name": "f", "arguments": '{"a": 1}'}}],
        {"nested": [[1, [2, [3]]], {"deep": {"deeper": None}}]},
    ],
)
def test_parse_message_stores_any_json_tool_calls_as_compact_json(tool_calls):
    row, _ = parse_message(SID, raw(tool_calls=tool_calls))
    assert row[5] is not None
    assert json.loads(row[5]) == tool_calls
    assert row[5] == json.dumps(tool_calls, separators=(",", ":"), ensure_ascii=False)


@pytest.mark.parametrize(
    "number",
    [
        "123456789012345678901234567890",
        "-9223372036854775809",  # just below int64
        "18446744073709551616",  # just above uint64
        "18446744073709551615",
        "-9223372036854775808",
    ],
)
def test_parse_message_keeps_big_integers_in_tool_calls_exact(number):
    raw_bytes = (
        b'{"id":"' + MID.encode() + b'","session_id":"' + SID.encode() + b'",'
        b'"created_at":"2026-02-12T10:00:00Z","role":"tool",'
        b'"tool_calls":{"n":' + number.encode() + b',"s":"x"}}'
    )
    row, _ = parse_message(SID, raw_bytes)
    assert row[5] == '{"n":' + number + ',"s":"x"}'


@pytest.mark.parametrize(
    "tool_calls",
    [
        {"q": "Le+Monde e+1"},  # "e+" in a string, not a number
        {"big": 1e16, "small": 1.5e-7, "n": -2.5e300},
        [9223372036854775807, "x", 1e20],
    ],
)
def test_parse_message_keeps_floats_and_strings_that_look_like_exponents(tool_calls):
    row, _ = parse_message(SID, raw(tool_calls=tool_calls))
    assert json.loads(row[5]) == tool_calls
    assert " " not in row[5].replace("Le+Monde e+1", "")


def test_parse_message_a_long_digit_run_in_content_changes_nothing():
    digits = "1234567890" * 5
    row, lossy = parse_message(SID, raw(content=digits, tool_calls={"x": 1.5}))
    assert row[4] == digits
    assert row[5] == '{"x":1.5}'
    assert lossy is None


def test_parse_message_allows_the_text_backslash_u0000_in_tool_calls():
    # The six characters \u0000 (an escaped backslash in JSON), not a NUL: jsonb holds them.
    calls = {"code": 's.replace("\\u0000", "")', "path": "C:\\\\u0000"}
    row, _ = parse_message(SID, raw(tool_calls=calls))
    assert json.loads(row[5]) == calls


def test_parse_message_unknown_keys_are_lossy_but_stored():
    row, lossy = parse_message(SID, raw(extra=1, emotion="happy"))
    assert row[0] == MID
    assert row[4] == "hello"
    assert lossy is not None
    assert "emotion" in lossy
    assert "extra" in lossy
    assert lossy.index("emotion") < lossy.index("extra")  # sorted, stable across runs


def test_parse_message_many_unknown_keys_are_all_named():
    data: dict[str, object] = {
        "id": MID,
        "session_id": SID,
        "created_at": "2026-02-12T10:00:00Z",
        "role": "user",
    }
    data.update({"a": 1, "b": 2, "c": 3, "d": 4})  # more than seven keys in all
    _, lossy = parse_message(SID, json.dumps(data).encode())
    assert lossy is not None
    assert "a, b, c, d" in lossy


def test_parse_message_compacts_whitespace_and_keeps_key_order_of_tool_calls():
    raw_bytes = json.dumps(message(tool_calls={"z": 1, "a": [1, 2]}), indent=4).encode()
    row, _ = parse_message(SID, raw_bytes)
    assert row[5] == '{"z":1,"a":[1,2]}'


# -- parse_message: rejected records -----------------------------------------------


@pytest.mark.parametrize(
    ("raw_bytes", "reason"),
    [
        (b"", "not valid JSON"),
        (b"{", "not valid JSON"),
        (b"not json", "not valid JSON"),
        (b"{'id': 1}", "not valid JSON"),
        (b'{"id": NaN}', "not valid JSON"),
        (b'{"id": 1e400}', "not valid JSON"),
        (b"[]", "must be a JSON object \\(got array\\)"),
        (b'"a string"', "must be a JSON object \\(got string\\)"),
        (b"42", "must be a JSON object \\(got number\\)"),
        (b"null", "must be a JSON object \\(got null\\)"),
        (b"true", "must be a JSON object \\(got boolean\\)"),
    ],
)
def test_parse_message_rejects_what_is_not_a_json_object(raw_bytes, reason):
    with pytest.raises(RecordRejected, match=reason):
        parse_message(SID, raw_bytes)


@pytest.mark.parametrize(
    ("changes", "reason"),
    [
        ({"id": None}, "message id is missing"),
        ({"id": "not-a-uuid"}, "message id is not a UUID"),
        ({"id": MID + "0"}, "message id is not a UUID"),
        ({"id": MID.replace("-", "")}, "message id is not a UUID"),
        ({"id": MID.upper()}, "message id must be a lower-case UUID"),
        ({"id": 42}, "message id must be a string UUID \\(got number\\)"),
        ({"id": [MID]}, "message id must be a string UUID \\(got array\\)"),
        ({"session_id": None}, "message has no session_id"),
        ({"session_id": OTHER_SID}, f"belongs to session '{OTHER_SID}'.*under session {SID}"),
        ({"session_id": SID.upper()}, "belongs to session"),
        ({"session_id": 7}, "belongs to session '7'"),
        ({"session_id": [SID]}, "belongs to session"),
        ({"created_at": None}, "message created_at must be a string \\(got null\\)"),
        ({"created_at": "2026-02-12"}, "message created_at is not an RFC 3339 timestamp"),
        ({"created_at": "2026-02-30T00:00:00Z"}, "message created_at is not a valid date/time"),
        ({"created_at": 1770861600123}, "message created_at must be a string \\(got number\\)"),
        ({"role": None}, "message has no role"),
        ({"role": "narrator"}, "role must be one of system, user, assistant, tool"),
        ({"role": "User"}, "role must be one of"),
        ({"role": ""}, "role must be one of"),
        ({"role": 1}, "role must be one of"),
        ({"role": True}, "role must be one of"),
        ({"role": ["user"]}, "role must be one of"),
        ({"role": {"name": "user"}}, "role must be one of"),
        ({"content": 42}, "content must be a string or null \\(got number\\)"),
        ({"content": {"text": "hi"}}, "content must be a string or null \\(got object\\)"),
        ({"content": ["hi"]}, "content must be a string or null \\(got array\\)"),
        ({"content": False}, "content must be a string or null \\(got boolean\\)"),
        ({"content": "a\u0000b"}, "content contains a NUL byte"),
        ({"player_id": 5}, "player_id must be a string or null \\(got number\\)"),
        ({"player_id": "p\u00001"}, "player_id contains a NUL byte"),
        ({"tool_calls": {"arg": "a\u0000b"}}, "tool_calls contains a NUL character"),
        ({"tool_calls": ["\u0000"]}, "tool_calls contains a NUL character"),
        ({"tool_calls": {"k\u0000": 1}}, "tool_calls contains a NUL character"),
        # an escaped backslash, then a real NUL
        ({"tool_calls": "\\\u0000"}, "tool_calls contains a NUL character"),
    ],
)
def test_parse_message_rejects_each_bad_field_with_a_clear_reason(changes, reason):
    with pytest.raises(RecordRejected, match=reason):
        parse_message(SID, raw(**changes))


def test_parse_message_nul_is_rejected_when_escaped_in_the_raw_json():
    raw_bytes = raw(content="PLACEHOLDER").replace(b"PLACEHOLDER", b"a\\u0000b")
    assert b"\\u0000" in raw_bytes
    assert "NUL" in rejection(raw_bytes)


@pytest.mark.parametrize(
    "bad",
    [
        b"\xff",
        b"\xc3\x28",  # invalid continuation
        b"\xed\xa0\x80",  # an encoded surrogate
        b"\xc0\xaf",  # overlong
    ],
)
def test_parse_message_rejects_invalid_utf8(bad):
    raw_bytes = raw(content="PLACEHOLDER").replace(b"PLACEHOLDER", bad)
    assert "not valid JSON" in rejection(raw_bytes)


@pytest.mark.parametrize("escape", [b"\\ud800", b"\\udfff", b"\\udc00x", b"\\ud83d\\u0041"])
def test_parse_message_rejects_lone_surrogate_escapes(escape):
    raw_bytes = raw(content="PLACEHOLDER").replace(b"PLACEHOLDER", escape)
    assert "not valid JSON" in rejection(raw_bytes)


def test_parse_message_accepts_a_surrogate_pair_escape():
    raw_bytes = raw(content="PLACEHOLDER").replace(b"PLACEHOLDER", b"\\ud83d\\udc09")
    row, _ = parse_message(SID, raw_bytes)
    assert row[4] == "🐉"


def test_parse_message_rejection_wins_over_lossy():
    with pytest.raises(RecordRejected, match="role"):
        parse_message(SID, raw(role="narrator", extra=1))


def test_parse_message_clips_a_huge_foreign_session_id_in_its_reason():
    reason = rejection(raw(session_id="x" * 10_000))
    assert len(reason) < 300


# -- peek_message_id ------------------------------------------------------------


def test_peek_message_id_names_a_rejected_message():
    raw_bytes = raw(role="narrator")
    assert "role" in rejection(raw_bytes)
    assert peek_message_id(raw_bytes) == MID


def test_peek_message_id_clips_a_huge_id_to_100_characters():
    assert peek_message_id(raw(id="x" * 10_000)) == "x" * 100


@pytest.mark.parametrize(
    "raw_bytes",
    [
        b"",
        b"{",
        b"\xff",
        b"[]",
        b'"0f8fad5b-d9cb-469f-a165-70867728950e"',
        b"{}",
        b'{"id": 42}',
        b'{"id": null}',
        b'{"id": ["a"]}',
        b'{"id": {"id": "a"}}',
    ],
)
def test_peek_message_id_is_none_without_a_string_id(raw_bytes):
    assert peek_message_id(raw_bytes) is None


# -- hash_digest ----------------------------------------------------------------

BASE_HASH = {b"id": SID.encode(), b"name": b"Dragon's Lair", b"status": b"active"}


def test_hash_digest_ignores_dict_order():
    reordered = dict(reversed(list(BASE_HASH.items())))
    assert list(reordered) != list(BASE_HASH)
    assert hash_digest(reordered) == hash_digest(BASE_HASH)


def test_hash_digest_is_deterministic_bytes():
    digest = hash_digest(BASE_HASH)
    assert isinstance(digest, bytes)
    assert len(digest) >= 16
    assert hash_digest(dict(BASE_HASH)) == digest


@pytest.mark.parametrize(
    "changed",
    [
        {**BASE_HASH, b"name": b"Dragon's Lair!"},
        {**BASE_HASH, b"name": b""},
        {**BASE_HASH, b"extra": b""},
        {**BASE_HASH, b"extra": b"x"},
        {key: value for key, value in BASE_HASH.items() if key != b"status"},
        {(b"Name" if key == b"name" else key): value for key, value in BASE_HASH.items()},
        {},
    ],
)
def test_hash_digest_changes_when_anything_changes(changed):
    assert hash_digest(changed) != hash_digest(BASE_HASH)


@pytest.mark.parametrize(
    ("left", "right"),
    [
        ({b"ab": b"c"}, {b"a": b"bc"}),
        ({b"a": b"b", b"c": b"d"}, {b"a": b"bcd"}),
        ({b"a": b""}, {}),
        ({b"": b"a"}, {b"a": b""}),
        ({b"a": b"\x00\x00\x00\x01b"}, {b"a": b"", b"b": b""}),
    ],
)
def test_hash_digest_is_unambiguous(left, right):
    assert hash_digest(left) != hash_digest(right)


# -- encode_raw_hash ------------------------------------------------------------


def decode_raw_hash(encoded):
    return {
        key.encode("utf-8", "surrogateescape"): value.encode("utf-8", "surrogateescape")
        for key, value in json.loads(encoded).items()
    }


@pytest.mark.parametrize(
    "fields",
    [
        BASE_HASH,
        {},
        {b"name": "🐉 中文 مرحبا".encode()},
        {b"name": b"\xff\xfe not utf-8 \x80"},
        {b"\xffkey": b"value", b"k": b"\xc3\x28"},
        {b"name": b"nul\x00inside", b"empty": b""},
        {b"surrogate": b"\xed\xa0\x80"},
        {b"quote": b'"\\ \n'},
    ],
)
def test_encode_raw_hash_recovers_the_exact_bytes(fields):
    encoded = encode_raw_hash(fields)
    assert isinstance(encoded, bytes)
    assert decode_raw_hash(encoded) == fields


def test_encode_raw_hash_is_plain_ascii_json_object():
    encoded = encode_raw_hash({b"b": "中".encode(), b"a": b"\xff"})
    encoded.decode("ascii")
    assert list(json.loads(encoded)) == ["a", "b"]  # sorted: same bytes for the same hash
