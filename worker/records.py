"""Reading and writing the application's records (docs/contract.md §1).

Pure functions, no I/O: a session hash or a zset member goes in, a validated
value comes out, or :class:`RecordRejected` says why the record cannot be stored
faithfully. The backup engine turns a rejection into a kept-aside record; it
never drops one. Going back, a restore writes the hash from :func:`session_hash`;
its zset members are built by PostgreSQL (``restore_members`` in sql/queries.sql).

``parse_message`` runs once per message of every backup, so it is written for
speed: orjson, precompiled regexes, ``type(x) is str`` rather than isinstance,
and its checks inline: the helpers that word a rejection's reason are called
only for a record that fails, as a call per field would cost more than the
checks themselves.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Mapping
from datetime import UTC, datetime, timedelta, timezone
from typing import Any

import orjson

from worker.errors import InvalidArgument
from worker.models import MessageRow, Session

_UUID_RE = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}")
_UUID_ANY_CASE_RE = re.compile(r"[0-9a-fA-F]{8}(?:-[0-9a-fA-F]{4}){3}-[0-9a-fA-F]{12}")
# RFC 3339 date-time, plus what real writers send: a space instead of "T", no
# offset (= UTC), an offset without a colon, and any number of fraction digits.
# ASCII: \d would also match other scripts' digits, which int() reads happily.
_TIMESTAMP_RE = re.compile(
    r"(\d{4})-(\d{2})-(\d{2})[Tt ](\d{2}):(\d{2}):(\d{2})(?:\.(\d+))?"
    r"(?:([Zz])|([+-])(\d{2}):?(\d{2}))?",
    re.ASCII,
)
# The shape nearly every writer sends, which datetime.fromisoformat parses in C.
# Anything else (nanoseconds, a space, "+0800", lower-case "z") takes the slow path,
# and so do offset minutes of 60 or more (fromisoformat reads "+08:60" as +09:00).
_COMMON_TIMESTAMP_RE = re.compile(
    r"\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}(?:\.\d{1,6})?(?:Z|[+-]\d{2}:[0-5]\d)?",
    re.ASCII,
)
# A "\u0000" escape in compact JSON text, but not an escaped backslash followed
# by the text "u0000" (an odd number of backslashes before the "u").
_JSON_NUL_RE = re.compile(r"(?<!\\)(?:\\\\)*\\u0000")
_MAX_PLAYERS_RE = re.compile(r"-?\d{1,10}", re.ASCII)
_ROLES = frozenset({"system", "user", "assistant", "tool"})
MESSAGE_KEYS = frozenset(
    {"id", "session_id", "created_at", "role", "content", "tool_calls", "player_id"}
)
SESSION_REQUIRED = (
    "id",
    "name",
    "creator_id",
    "mcp_server_url",
    "websocket_key",
    "created_at",
    "updated_at",
)
SESSION_OPTIONAL = ("max_players", "settings", "status", "deleted_at")
SESSION_FIELDS = frozenset(SESSION_REQUIRED + SESSION_OPTIONAL)
_INT4 = (-(2**31), 2**31 - 1)
# The Unix epoch, for zset scores (epoch_ms) and checksums (epoch microseconds).
EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
# peek_message_id's limit: the id of a rejected message only labels it, and any
# text may be there.
_PEEKED_ID_LIMIT = 100
_offsets: dict[str, timezone] = {}


class RecordRejected(ValueError):
    """A record cannot be stored faithfully; ``reason`` says why, for an operator."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


# -- identifiers ------------------------------------------------------------


def parse_session_id(value: str) -> str:
    """Validate a session ID given by a person or a caller; return its canonical form.

    Upper case is accepted and lowered (the application writes lowercase). Anything
    else is refused here, before a Redis key could be built from it.
    """
    text = value.strip() if isinstance(value, str) else ""
    if not _UUID_ANY_CASE_RE.fullmatch(text):
        raise InvalidArgument(
            f"session ID must be a UUID like 123e4567-e89b-12d3-a456-426614174000 (got {value!r})"
        )
    return text.lower()


def classify_set_member(member: bytes) -> str:
    """The session ID held by a member of the sessions set, or RecordRejected."""
    try:
        text = member.decode("utf-8")
    except UnicodeDecodeError:
        raise RecordRejected("session ID in the sessions set is not valid UTF-8") from None
    if not _UUID_RE.fullmatch(text):
        if _UUID_ANY_CASE_RE.fullmatch(text):
            raise RecordRejected(
                "session ID in the sessions set is an upper-case UUID; a restore would "
                "write it back under a different (lower-case) key"
            )
        raise RecordRejected("session ID in the sessions set is not a UUID")
    return text


# -- timestamps -------------------------------------------------------------


def parse_timestamp(text: object, what: str = "timestamp") -> datetime:
    """An RFC 3339 timestamp from any writer, as an aware datetime in UTC.

    Fractions beyond microseconds (Go writes nanoseconds) are truncated to the
    microsecond, never rounded: Go's UnixMilli, pgx and the application's zset
    scores all truncate, and rounding could carry a message into the next
    millisecond (or second), so that a restore would score it differently from
    the application. No offset means UTC.
    """
    if type(text) is not str:
        raise RecordRejected(f"{what} must be a string (got {_json_type(text)})")
    if _COMMON_TIMESTAMP_RE.fullmatch(text) is None:
        return _parse_rfc3339(text, what)
    try:
        value = datetime.fromisoformat(text)
    except ValueError as exc:
        raise RecordRejected(f"{what} is not a valid date/time: {text!r} ({exc})") from None
    if value.tzinfo is UTC:
        return value
    if value.tzinfo is None:
        return value.replace(tzinfo=UTC)
    return _to_utc(value, text, what)


def _parse_rfc3339(text: str, what: str) -> datetime:
    """The slow path of parse_timestamp: whatever fromisoformat must not be trusted with."""
    match = _TIMESTAMP_RE.fullmatch(text)
    if match is None:
        raise RecordRejected(f"{what} is not an RFC 3339 timestamp: {_clip(text)!r}")
    year, month, day, hour, minute, second, fraction, zulu, sign, off_h, off_m = match.groups()
    tz = UTC if zulu or sign is None else _parse_offset(sign, off_h, off_m, text, what)
    try:
        value = datetime(
            int(year),
            int(month),
            int(day),
            int(hour),
            int(minute),
            int(second),
            _parse_fraction(fraction),
            tz,
        )
    except ValueError as exc:
        raise RecordRejected(f"{what} is not a valid date/time: {_clip(text)!r} ({exc})") from None
    return _to_utc(value, text, what)


def _parse_fraction(fraction: str | None) -> int:
    """Fractional seconds as microseconds, digits beyond the sixth cut off (not rounded)."""
    return int(fraction[:6].ljust(6, "0")) if fraction else 0


def _parse_offset(sign: str, hours: str, minutes: str, text: str, what: str) -> timezone:
    """A UTC offset such as +08:00, checked once and then cached: writers use a few."""
    key = sign + hours + minutes
    tz = _offsets.get(key)
    if tz is None:
        total = int(hours) * 60 + int(minutes)
        if int(minutes) >= 60 or total >= 24 * 60:
            raise RecordRejected(f"{what} has an impossible UTC offset: {_clip(text)!r}")
        tz = timezone(timedelta(minutes=-total if sign == "-" else total))
        _offsets[key] = tz
    return tz


def _to_utc(value: datetime, text: str, what: str) -> datetime:
    """``value`` (aware) in UTC; near the ends of the calendar there may be no such instant."""
    if value.tzinfo is UTC:
        return value
    try:
        return value.astimezone(UTC)
    except OverflowError:
        raise RecordRejected(f"{what} is out of range: {_clip(text)!r}") from None


def format_timestamp(value: datetime) -> str:
    """RFC 3339 in UTC with microseconds, the form restores write back."""
    # Not strftime: its %Y does not zero-pad years before 1000 on glibc.
    return value.astimezone(UTC).replace(tzinfo=None).isoformat(timespec="microseconds") + "Z"


def epoch_ms(value: datetime) -> int:
    """The zset score of a message created at ``value`` (docs/contract.md §1).

    Floored like Go's UnixMilli, also before 1970.
    """
    delta = value - EPOCH
    return (delta.days * 86_400 + delta.seconds) * 1000 + delta.microseconds // 1000


# -- messages ---------------------------------------------------------------

_CONTENT_NUL = "message content contains a NUL byte, which PostgreSQL text cannot hold"
_PLAYER_ID_NUL = "message player_id contains a NUL byte"


def parse_message(session_id: str, raw: bytes) -> tuple[MessageRow, str | None]:
    """One zset member as a row for client_messages.

    Returns ``(row, lossy_reason)``: ``lossy_reason`` is set when the row could be
    stored but not every part of the record fits a column (unknown keys), so the
    caller keeps the raw record aside as well. Raises RecordRejected when the
    record cannot be stored at all.
    """
    # Checks inline, helpers only for the reasons: see the module docstring.
    obj = _load_message(raw)
    lossy = None if len(obj) <= 7 and obj.keys() <= MESSAGE_KEYS else _unknown_keys(obj)
    message_id = obj.get("id")
    if type(message_id) is not str or _UUID_RE.fullmatch(message_id) is None:
        raise RecordRejected(_bad_id("message id", message_id))
    owner = obj.get("session_id")
    if owner != session_id:
        raise RecordRejected(_bad_owner(owner, session_id))
    created_at = parse_timestamp(obj.get("created_at"), "message created_at")
    role = obj.get("role")
    if type(role) is not str or role not in _ROLES:
        raise RecordRejected(_bad_role(role))
    content = obj.get("content")
    if content is not None and (type(content) is not str or "\x00" in content):
        raise RecordRejected(_bad_text_field("content", content, _CONTENT_NUL))
    player_id = obj.get("player_id")
    if player_id is not None and (type(player_id) is not str or "\x00" in player_id):
        raise RecordRejected(_bad_text_field("player_id", player_id, _PLAYER_ID_NUL))
    tool_calls = obj.get("tool_calls")
    tool_calls_json = None if tool_calls is None else _tool_calls_json(tool_calls, raw)
    row = (message_id, session_id, created_at, role, content, tool_calls_json, player_id)
    return row, lossy


def _load_message(raw: bytes) -> dict[str, Any]:
    """A zset member's JSON object, or RecordRejected."""
    try:
        obj = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise RecordRejected(f"message is not valid JSON: {exc}") from None
    if type(obj) is not dict:
        raise RecordRejected(f"message must be a JSON object (got {_json_type(obj)})")
    return obj


def _unknown_keys(obj: Mapping[str, object]) -> str | None:
    """The lossy reason for a message with keys that have no column, if it has any."""
    unknown = sorted(set(obj) - MESSAGE_KEYS)
    if not unknown:
        return None
    return f"message has keys with no column, not stored: {', '.join(unknown)}"


def _bad_owner(owner: object, session_id: str) -> str:
    if owner is None:
        return "message has no session_id"
    return (
        f"message belongs to session {_clip(str(owner))!r}, "
        f"but is stored under session {session_id}"
    )


def _bad_role(role: object) -> str:
    if role is None:
        return "message has no role"
    return f"message role must be one of system, user, assistant, tool (got {_clip(str(role))!r})"


def _bad_text_field(name: str, value: object, nul_reason: str) -> str:
    """Why a text column's value was refused: not a string, or a NUL PostgreSQL cannot hold."""
    if type(value) is not str:
        return f"message {name} must be a string or null (got {_json_type(value)})"
    return nul_reason


def _tool_calls_json(tool_calls: object, raw: bytes) -> str:
    """tool_calls as compact JSON text for jsonb, big integers exact, NULs refused."""
    text = orjson.dumps(tool_calls).decode()
    if "e+" in text:
        text = _exact_json(raw, "tool_calls")
    if "\\u0000" in text and _JSON_NUL_RE.search(text):
        raise RecordRejected(
            "message tool_calls contains a NUL character, which PostgreSQL jsonb cannot hold"
        )
    return text


def peek_message_id(raw: bytes) -> str | None:
    """The id of a message that failed validation, to name it, if it can be read at all.

    Only a string id is returned, clipped to 100 characters; anything else is None.
    """
    try:
        value = orjson.loads(raw)
    except orjson.JSONDecodeError:
        return None
    message_id = value.get("id") if type(value) is dict else None
    return message_id[:_PEEKED_ID_LIMIT] if type(message_id) is str else None


# -- sessions ---------------------------------------------------------------


def parse_session_hash(
    session_id: str, fields: Mapping[bytes, bytes]
) -> tuple[Session, str | None]:
    """A session hash (raw bytes from HGETALL) as a Session.

    Returns ``(session, lossy_reason)`` like :func:`parse_message`.
    """
    text = _decode_hash_fields(fields)
    missing = [name for name in SESSION_REQUIRED if not text.get(name)]
    if missing:
        raise RecordRejected(f"session hash is missing required fields: {', '.join(missing)}")
    if text["id"] != session_id:
        raise RecordRejected(
            f"session hash id {_clip(text['id'])!r} does not match its key ({session_id})"
        )
    unknown = sorted(set(text) - SESSION_FIELDS)
    lossy = (
        f"session hash has fields with no column, not stored: {', '.join(unknown)}"
        if unknown
        else None
    )
    max_players = _parse_max_players(text.get("max_players"))
    settings_json = _parse_settings(text.get("settings"))
    deleted_at = (
        parse_timestamp(text["deleted_at"], "session deleted_at")
        if text.get("deleted_at")
        else None
    )
    session = Session(
        id=session_id,
        name=text["name"],
        creator_id=text["creator_id"],
        mcp_server_url=text["mcp_server_url"],
        websocket_key=text["websocket_key"],
        created_at=parse_timestamp(text["created_at"], "session created_at"),
        updated_at=parse_timestamp(text["updated_at"], "session updated_at"),
        max_players=max_players,
        settings=settings_json,
        status=text.get("status") or "active",
        deleted_at=deleted_at,
    )
    return session, lossy


def _decode_hash_fields(fields: Mapping[bytes, bytes]) -> dict[str, str]:
    """A session hash's fields and values as text, or RecordRejected (not UTF-8, NUL)."""
    text: dict[str, str] = {}
    for raw_key, raw_value in fields.items():
        try:
            key = raw_key.decode("utf-8")
        except UnicodeDecodeError:
            raise RecordRejected("session hash has a field name that is not valid UTF-8") from None
        try:
            value = raw_value.decode("utf-8")
        except UnicodeDecodeError:
            raise RecordRejected(f"session field {key!r} is not valid UTF-8") from None
        if "\x00" in value:
            raise RecordRejected(
                f"session field {key!r} contains a NUL byte, which PostgreSQL text cannot hold"
            )
        text[key] = value
    return text


def _parse_max_players(raw: str | None) -> int | None:
    """max_players as an int4 (an empty or absent field is None)."""
    if not raw:
        return None
    if not _MAX_PLAYERS_RE.fullmatch(raw) or not _INT4[0] <= int(raw) <= _INT4[1]:
        raise RecordRejected(f"session max_players must be an integer (got {_clip(raw)!r})")
    return int(raw)


def _parse_settings(raw: str | None) -> str | None:
    """settings as compact JSON text for jsonb: an object, big integers exact, NULs refused."""
    if not raw:
        return None
    try:
        settings = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise RecordRejected(f"session settings is not valid JSON: {exc}") from None
    if type(settings) is not dict:
        raise RecordRejected(f"session settings must be a JSON object (got {_json_type(settings)})")
    text = orjson.dumps(settings).decode()
    if "e+" in text:
        text = _exact_json(raw)
    if "\\u0000" in text and _JSON_NUL_RE.search(text):
        raise RecordRejected(
            "session settings contains a NUL character, which PostgreSQL jsonb cannot hold"
        )
    return text


def session_hash(session: Session) -> dict[str, str]:
    """A session as the hash a restore writes (all values strings, UTC timestamps)."""
    fields = {
        "id": session.id,
        "name": session.name,
        "creator_id": session.creator_id,
        "mcp_server_url": session.mcp_server_url,
        "websocket_key": session.websocket_key,
        "created_at": format_timestamp(session.created_at),
        "updated_at": format_timestamp(session.updated_at),
        "status": session.status,
    }
    if session.max_players is not None:
        fields["max_players"] = str(session.max_players)
    if session.settings is not None:
        # Compact, as the application would write it (jsonb text has spaces).
        settings = orjson.dumps(orjson.loads(session.settings)).decode()
        if "e+" in settings:
            settings = _exact_json(session.settings)
        fields["settings"] = settings
    if session.deleted_at is not None:
        fields["deleted_at"] = format_timestamp(session.deleted_at)
    return fields


def hash_digest(fields: Mapping[bytes, bytes]) -> bytes:
    """A digest of a session hash's exact contents, to notice any change cheaply."""
    digest = hashlib.blake2b(digest_size=16)
    for key in sorted(fields):
        value = fields[key]
        # Length prefixes make the encoding unambiguous whatever the bytes are.
        digest.update(len(key).to_bytes(4, "big") + key + len(value).to_bytes(4, "big") + value)
    return digest.digest()


def encode_raw_hash(fields: Mapping[bytes, bytes]) -> bytes:
    """A session hash as bytes for a kept-aside record, reversibly.

    A JSON object of field -> value; bytes that are not UTF-8 survive as
    ``\\udcXX`` escapes (Python's surrogateescape), so the exact bytes can be
    recovered with ``json.loads(raw)`` and ``.encode('utf-8', 'surrogateescape')``.
    """
    decoded = {
        key.decode("utf-8", "surrogateescape"): value.decode("utf-8", "surrogateescape")
        for key, value in sorted(fields.items())
    }
    return json.dumps(decoded, ensure_ascii=True).encode()


# -- helpers ----------------------------------------------------------------


def _exact_json(source: bytes | str, key: str | None = None) -> str:
    """``source`` (or its ``key``) as compact JSON text, big integers and all.

    orjson reads an integer beyond 64 bits as a float, dropping digits, and writes
    such a float with an exponent ("1.2345678901234568e+29"); only then is
    ``source`` read again by the stdlib, which keeps every digit. orjson has
    already vetted it (UTF-8, lone surrogates, NaN).
    """
    value = json.loads(source)
    if key is not None:
        value = value[key]
    return json.dumps(value, ensure_ascii=False, separators=(",", ":"))


def _bad_id(what: str, value: object) -> str:
    if value is None:
        return f"{what} is missing"
    if type(value) is not str:
        return f"{what} must be a string UUID (got {_json_type(value)})"
    if _UUID_ANY_CASE_RE.fullmatch(value):
        return f"{what} must be a lower-case UUID (got {value!r})"
    return f"{what} is not a UUID (got {_clip(value)!r})"


def _json_type(value: object) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, int | float):
        return "number"
    if isinstance(value, str):
        return "string"
    if isinstance(value, list):
        return "array"
    if isinstance(value, dict):
        return "object"
    return type(value).__name__


def _clip(text: str, limit: int = 80) -> str:
    return text if len(text) <= limit else text[: limit - 3] + "..."
