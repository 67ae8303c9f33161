"""Which shard a session belongs to: a pure, stable function of its ID.

Stable means the same in every process, on every host, in every Python
version (so not ``hash()``, which is salted per process), and unchanged for as
long as ``BACKUP_SHARDS`` is unchanged.
"""

from __future__ import annotations

import uuid
import zlib

QUEUE_PREFIX = "dnd.shard."


def shard_of(session_id: str, shards: int) -> int:
    """The shard (0 .. shards-1) of a session ID (a canonical UUID)."""
    if shards < 1:
        raise ValueError("shards must be at least 1")
    return zlib.crc32(uuid.UUID(session_id).bytes) % shards


def queue_name(shard: int) -> str:
    return f"{QUEUE_PREFIX}{shard}"


def all_queues(shards: int) -> list[str]:
    return [queue_name(n) for n in range(shards)]
