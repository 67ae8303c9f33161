"""Reading and writing the application's records (CONTRACT §1).

Pure functions, no I/O: a session hash or a zset member goes in, a validated
value comes out, or :class:`RecordRejected` says why the record cannot be stored
faithfully. The backup engine turns a rejection into a kept-aside record; it
never drops one.

``parse_message`` runs once per message of every backup, so it is written for
speed: orjson, precompiled regexes, ``type(x) is str`` rather than isinstance.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Mapping
from datetime import UTC, datetime, timedelta, timezone

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
_offsets: dict[str, timezone] = {}


class RecordRejected(ValueError):
    """A record cannot be stored faithfully; ``reason`` says why, for an operator."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


# -- identifiers ------------------------------------------------------------


def is_session_id(value: str) -> bool:
    """True for a canonical (lowercase, hyphenated) UUID, the only form we key on."""
    return _UUID_RE.fullmatch(value) is not None


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

    Fractions beyond microseconds (Go writes nanoseconds) are rounded to the
    nearest microsecond, as PostgreSQL itself does; no offset means UTC.
    """
    if type(text) is not str:
        raise RecordRejected(f"{what} must be a string (got {_json_type(text)})")
    if _COMMON_TIMESTAMP_RE.fullmatch(text):
        try:
            value = datetime.fromisoformat(text)
        except ValueError as exc:
            raise RecordRejected(f"{what} is not a valid date/time: {text!r} ({exc})") from None
        if value.tzinfo is None:
            return value.replace(tzinfo=UTC)
        if value.tzinfo is not UTC:
            try:
                value = value.astimezone(UTC)
            except OverflowError:
                raise RecordRejected(f"{what} is out of range: {text!r}") from None
        return value
    match = _TIMESTAMP_RE.fullmatch(text)
    if match is None:
        raise RecordRejected(f"{what} is not an RFC 3339 timestamp: {_clip(text)!r}")
    year, month, day, hour, minute, second, fraction, zulu, sign, off_h, off_m = match.groups()
    micro = 0
    carry = False
    if fraction:
        micro = int(fraction[:6].ljust(6, "0"))
        if len(fraction) > 6 and fraction[6] >= "5":
            micro += 1
            if micro == 1_000_000:
                micro, carry = 0, True
    if zulu or sign is None:
        tz: timezone = UTC
    else:
        key = sign + off_h + off_m
        tz_cached = _offsets.get(key)
        if tz_cached is None:
            minutes = int(off_h) * 60 + int(off_m)
            if int(off_m) >= 60 or minutes >= 24 * 60:
                raise RecordRejected(f"{what} has an impossible UTC offset: {_clip(text)!r}")
            tz_cached = timezone(timedelta(minutes=-minutes if sign == "-" else minutes))
            _offsets[key] = tz_cached
        tz = tz_cached
    try:
        value = datetime(
            int(year), int(month), int(day), int(hour), int(minute), int(second), micro, tz
        )
    except ValueError as exc:
        raise RecordRejected(f"{what} is not a valid date/time: {_clip(text)!r} ({exc})") from None
    try:
        if carry:
            value += timedelta(seconds=1)
        if tz is not UTC:
            value = value.astimezone(UTC)
    except OverflowError:
        raise RecordRejected(f"{what} is out of range: {_clip(text)!r}") from None
    return value


def format_timestamp(value: datetime) -> str:
    """RFC 3339 in UTC with microseconds, the form restores write back."""
    # Not strftime: its %Y does not zero-pad years before 1000 on glibc.
    return value.astimezone(UTC).replace(tzinfo=None).isoformat(timespec="microseconds") + "Z"


def epoch_ms(value: datetime) -> int:
    """The zset score of a message created at ``value`` (CONTRACT §1)."""
    delta = value - _EPOCH
    return (delta.days * 86_400 + delta.seconds) * 1000 + delta.microseconds // 1000


_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


# -- messages ---------------------------------------------------------------


def parse_message(session_id: str, raw: bytes) -> tuple[MessageRow, str | None]:
    """One zset member as a row for client_messages.

    Returns ``(row, lossy_reason)``: ``lossy_reason`` is set when the row could be
    stored but not every part of the record fits a column (unknown keys), so the
    caller keeps the raw record aside as well. Raises RecordRejected when the
    record cannot be stored at all.
    """
    try:
        obj = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise RecordRejected(f"message is not valid JSON: {exc}") from None
    if type(obj) is not dict:
        raise RecordRejected(f"message must be a JSON object (got {_json_type(obj)})")
    lossy = None
    if len(obj) > 7 or not obj.keys() <= MESSAGE_KEYS:
        unknown = sorted(set(obj) - MESSAGE_KEYS)
        if unknown:
            lossy = f"message has keys with no column, not stored: {', '.join(unknown)}"
    message_id = obj.get("id")
    if type(message_id) is not str or _UUID_RE.fullmatch(message_id) is None:
        raise RecordRejected(_bad_id("message id", message_id))
    owner = obj.get("session_id")
    if owner != session_id:
        if owner is None:
            raise RecordRejected("message has no session_id")
        raise RecordRejected(
            f"message belongs to session {_clip(str(owner))!r}, "
            f"but is stored under session {session_id}"
        )
    created_at = parse_timestamp(obj.get("created_at"), "message created_at")
    role = obj.get("role")
    if type(role) is not str or role not in _ROLES:
        if role is None:
            raise RecordRejected("message has no role")
        raise RecordRejected(
            f"message role must be one of system, user, assistant, tool (got {_clip(str(role))!r})"
        )
    content = obj.get("content")
    if content is not None:
        if type(content) is not str:
            raise RecordRejected(
                f"message content must be a string or null (got {_json_type(content)})"
            )
        if "\x00" in content:
            raise RecordRejected(
                "message content contains a NUL byte, which PostgreSQL text cannot hold"
            )
    player_id = obj.get("player_id")
    if player_id is not None:
        if type(player_id) is not str:
            raise RecordRejected(
                f"message player_id must be a string or null (got {_json_type(player_id)})"
            )
        if "\x00" in player_id:
            raise RecordRejected("message player_id contains a NUL byte")
    tool_calls = obj.get("tool_calls")
    tool_calls_json = None
    if tool_calls is not None:
        tool_calls_json = orjson.dumps(tool_calls).decode()
        if "e+" in tool_calls_json:
            tool_calls_json = _exact_json(raw, "tool_calls")
        if "\\u0000" in tool_calls_json and _JSON_NUL_RE.search(tool_calls_json):
            raise RecordRejected(
                "message tool_calls contains a NUL character, which PostgreSQL jsonb cannot hold"
            )
    row = (message_id, session_id, created_at, role, content, tool_calls_json, player_id)
    return row, lossy


def message_member(
    message_id: str,
    session_id: str,
    created_at: str,
    role: str,
    content: str | None,
    tool_calls_json: str | None,
    player_id: str | None,
) -> bytes:
    """A message as the zset member a restore writes: compact JSON, contract key order."""
    return orjson.dumps(
        {
            "id": message_id,
            "session_id": session_id,
            "created_at": created_at,
            "role": role,
            "content": content,
            # jsonb text is already valid JSON; a Fragment embeds it unparsed.
            "tool_calls": None if tool_calls_json is None else orjson.Fragment(tool_calls_json),
            "player_id": player_id,
        }
    )


# -- sessions ---------------------------------------------------------------


def parse_session_hash(
    session_id: str, fields: Mapping[bytes, bytes]
) -> tuple[Session, str | None]:
    """A session hash (raw bytes from HGETALL) as a Session.

    Returns ``(session, lossy_reason)`` like :func:`parse_message`.
    """
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
    max_players = None
    if text.get("max_players"):
        raw_max = text["max_players"]
        if not _MAX_PLAYERS_RE.fullmatch(raw_max) or not _INT4[0] <= int(raw_max) <= _INT4[1]:
            raise RecordRejected(f"session max_players must be an integer (got {_clip(raw_max)!r})")
        max_players = int(raw_max)
    settings_json = None
    if text.get("settings"):
        try:
            settings_obj = orjson.loads(text["settings"])
        except orjson.JSONDecodeError as exc:
            raise RecordRejected(f"session settings is not valid JSON: {exc}") from None
        if type(settings_obj) is not dict:
            raise RecordRejected(
                f"session settings must be a JSON object (got {_json_type(settings_obj)})"
            )
        settings_json = orjson.dumps(settings_obj).decode()
        if "e+" in settings_json:
            settings_json = _exact_json(text["settings"])
        if "\\u0000" in settings_json and _JSON_NUL_RE.search(settings_json):
            raise RecordRejected(
                "session settings contains a NUL character, which PostgreSQL jsonb cannot hold"
            )
    deleted_at = None
    if text.get("deleted_at"):
        deleted_at = parse_timestamp(text["deleted_at"], "session deleted_at")
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
