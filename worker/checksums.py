"""Checksums of sessions and messages, the same whichever side computes them.

A message's digest is blake2b-128 over a canonical form of its stored values
(ID, created_at in epoch microseconds, role, content, tool_calls with sorted
keys and numbers as jsonb writes them, player_id). A session's message
checksum is the count of its messages and the sum of their digests modulo
2**128: the order of messages does not matter, and a backup that only adds
messages updates it by adding theirs.

The canonical form is computed in Python from parsed values, so a message read
from Redis and the same message read back from PostgreSQL give the same
digest: that is what lets `verify` compare the two sides message by message,
and compare a recorded checksum with either side.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from datetime import datetime
from decimal import Decimal

import orjson

from worker.models import MessageRow, Session
from worker.records import EPOCH

MODULUS = 1 << 128


def _micros(value: datetime) -> int:
    # Exact integer arithmetic: timestamp() is a float, which cannot hold every microsecond.
    delta = value - EPOCH
    return (delta.days * 86_400 + delta.seconds) * 1_000_000 + delta.microseconds


def _json_value(text: str | None) -> object:
    # jsonb gives the value back with its keys reordered and other spacing:
    # parse, so that both sides hash the value, not the text.
    if text is None:
        return None
    value = orjson.loads(text)
    if _has_number(value):
        # Rare, and slower: numbers as jsonb writes them (see _number).
        return json.loads(text, parse_float=_number, parse_int=_number)
    return value


def _has_number(value: object) -> bool:
    if isinstance(value, dict):
        return any(_has_number(item) for item in value.values())
    if isinstance(value, list):
        return any(_has_number(item) for item in value)
    return isinstance(value, int | float) and not isinstance(value, bool)


def _number(text: str) -> orjson.Fragment:
    # jsonb keeps numbers as numeric and writes them back in plain decimal
    # notation (1e+16 -> 10000000000000000, -0.0 -> 0.0), which orjson would
    # read back as another type than the float Redis held: hash every number
    # as jsonb writes it.
    value = Decimal(text)
    if value.is_zero():
        value = value.copy_abs()
    return orjson.Fragment(format(value, "f"))


def message_canonical(row: MessageRow) -> bytes:
    """The canonical form of one message row (as stored: see models.MESSAGE_COLUMNS).

    A JSON array: ``[id, created_at in epoch microseconds, role, content,
    tool_calls (keys sorted, numbers as jsonb writes them), player_id]``.
    """
    message_id, _session_id, created_at, role, content, tool_calls, player_id = row
    return orjson.dumps(
        (
            message_id,
            _micros(created_at),
            role,
            content,
            None if tool_calls is None else _json_value(tool_calls),
            player_id,
        ),
        option=orjson.OPT_SORT_KEYS,
    )


def canonical_digest(canonical: bytes) -> bytes:
    """The digest of a message's canonical form, as 16 bytes (big-endian)."""
    return hashlib.blake2b(canonical, digest_size=16).digest()


def message_digest(row: MessageRow) -> int:
    """The digest of one message row (as stored: see models.MESSAGE_COLUMNS)."""
    return int.from_bytes(canonical_digest(message_canonical(row)), "big")


def canonical_fingerprint(canonical: bytes) -> bytes:
    """SHA-256 of a message's canonical form, which PostgreSQL can compute too.

    Only for a message without tool_calls: then the canonical form is plain
    JSON that PostgreSQL builds the same way (``verify_compare`` in
    sql/queries.sql), so a stored row whose fingerprint equals a Redis
    member's has the same canonical form, hence the same digest, and need not
    be read back to be digested again. A form PostgreSQL writes differently
    only makes the fingerprints differ: the row is then read and digested.
    """
    return hashlib.sha256(canonical).digest()


def session_digest(session: Session) -> bytes:
    """The digest of a session's own fields (as stored)."""
    canonical = orjson.dumps(
        (
            session.id,
            session.name,
            session.creator_id,
            session.mcp_server_url,
            session.websocket_key,
            _micros(session.created_at),
            _micros(session.updated_at),
            session.max_players,
            _json_value(session.settings),
            session.status,
            None if session.deleted_at is None else _micros(session.deleted_at),
        ),
        option=orjson.OPT_SORT_KEYS,
    )
    return hashlib.blake2b(canonical, digest_size=16).digest()


@dataclass(slots=True)
class MessageChecksum:
    """Count and sum (mod 2**128) of message digests: order-free, additive."""

    count: int = 0
    total: int = 0

    def add(self, digest: int) -> None:
        self.count += 1
        self.total = (self.total + digest) % MODULUS

    def remove(self, digest: int) -> None:
        """Undo an add of ``digest``."""
        self.count -= 1
        self.total = (self.total - digest) % MODULUS

    def merge(self, other: MessageChecksum) -> MessageChecksum:
        return MessageChecksum(self.count + other.count, (self.total + other.total) % MODULUS)

    def to_bytes(self) -> bytes:
        return self.total.to_bytes(16, "big")

    @classmethod
    def from_stored(cls, count: int, total: bytes) -> MessageChecksum:
        return cls(count, int.from_bytes(total, "big"))

    def hex(self) -> str:
        return f"{self.count}:{self.to_bytes().hex()}"
