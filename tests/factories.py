"""Test data in the application's Redis layout (docs/contract.md §1), written as the app would."""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterable, Mapping
from datetime import UTC, datetime, timedelta
from typing import Any

import redis

from worker.keys import RedisKeys

BASE_TIME = datetime(2026, 2, 12, 10, 0, 0, tzinfo=UTC)


def new_id() -> str:
    return str(uuid.uuid4())


def iso(value: datetime) -> str:
    return value.isoformat().replace("+00:00", "Z")


def session_fields(session_id: str | None = None, **overrides: Any) -> dict[str, str]:
    """A valid session hash; overrides replace fields (None removes one)."""
    sid = session_id or new_id()
    fields: dict[str, Any] = {
        "id": sid,
        "name": "The Sunless Citadel",
        "creator_id": "user-1",
        "mcp_server_url": "http://mcp.local:9000",
        "websocket_key": "ws-key-1",
        "max_players": "5",
        "settings": json.dumps({"dice": "d20", "house_rules": ["flanking"]}),
        "created_at": iso(BASE_TIME),
        "updated_at": iso(BASE_TIME + timedelta(minutes=5)),
        "status": "active",
    }
    for name, value in overrides.items():
        if value is None:
            fields.pop(name, None)
        else:
            fields[name] = value
    return fields


def message(
    session_id: str, index: int = 0, *, created_at: datetime | None = None, **overrides: Any
) -> dict[str, Any]:
    """A valid message object; overrides replace keys."""
    when = created_at or BASE_TIME + timedelta(seconds=index, microseconds=index * 7 % 1000)
    data: dict[str, Any] = {
        "id": new_id(),
        "session_id": session_id,
        "created_at": iso(when),
        "role": ("user", "assistant", "system", "tool")[index % 4],
        "content": f"message {index}: the party enters the citadel",
        "tool_calls": None if index % 3 else [{"name": "roll", "arguments": {"dice": "1d20"}}],
        "player_id": f"player-{index % 3}",
    }
    data.update(overrides)
    return data


def score_of(created_at: str) -> int:
    """Epoch milliseconds of a timestamp, as the application scores messages."""
    when = datetime.fromisoformat(created_at.replace("Z", "+00:00"))
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    return (when - datetime(1970, 1, 1, tzinfo=UTC)) // timedelta(milliseconds=1)


def write_session(
    client: redis.Redis,
    keys: RedisKeys,
    fields: Mapping[str, str],
    messages: Iterable[Mapping[str, Any] | bytes] = (),
    *,
    listed: bool = True,
) -> str:
    """Write a session hash, its messages and its set membership; returns its ID."""
    sid = fields["id"]
    pipe = client.pipeline(transaction=False)
    if listed:
        pipe.sadd(keys.sessions, sid)
    if fields:
        pipe.hset(keys.session(sid), mapping=dict(fields))  # type: ignore[arg-type]
    add_messages(pipe, keys, sid, messages)
    pipe.execute()
    return sid


def add_messages(
    client: Any,
    keys: RedisKeys,
    session_id: str,
    messages: Iterable[Mapping[str, Any] | bytes],
    *,
    score: float | None = None,
) -> None:
    """ZADD messages (dicts are JSON-encoded; bytes go in as they are)."""
    members: dict[bytes, float] = {}
    for item in messages:
        if isinstance(item, bytes):
            members[item] = score if score is not None else 0
        else:
            member = json.dumps(item, separators=(",", ":"), ensure_ascii=False).encode()
            created = item.get("created_at")
            members[member] = (
                score
                if score is not None
                else (score_of(created) if isinstance(created, str) else 0)
            )
    if members:
        client.zadd(keys.messages(session_id), members)


def make_sessions(
    client: redis.Redis, keys: RedisKeys, count: int, messages_each: int
) -> list[str]:
    ids = []
    for _ in range(count):
        sid = new_id()
        write_session(
            client, keys, session_fields(sid), [message(sid, i) for i in range(messages_each)]
        )
        ids.append(sid)
    return ids
