"""What the backup, restore and verify engines share: the two stores, and results.

Every per-session result of every run is stamped here (its shard, the worker
that made it, when it finished), so that a backup's, a restore's and a
verify's results read alike.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from typing import Any

from worker.keys import RedisKeys
from worker.models import KeptRecord, SessionResult, SessionStatus
from worker.pg_store import PostgresStore
from worker.records import RecordRejected, classify_set_member
from worker.redis_store import RedisStore


class Engine:
    def __init__(
        self,
        redis_store: RedisStore,
        pg: PostgresStore,
        *,
        chunk_messages: int = 5000,
        shard_of: Callable[[str], int] | None = None,
        worker_name: str | None = None,
    ) -> None:
        self.redis = redis_store
        self.pg = pg
        self.keys: RedisKeys = redis_store.keys
        self.chunk = chunk_messages
        self.shard_of = shard_of
        self.worker_name = worker_name

    def listed_sessions(self) -> tuple[list[str], list[KeptRecord]]:
        """The sessions set: valid IDs (sorted), and a kept record per bad member."""
        ids: set[str] = set()
        bad: dict[bytes, KeptRecord] = {}
        for member in self.redis.session_members():
            try:
                ids.add(classify_set_member(member))
            except RecordRejected as rejected:
                bad[member] = KeptRecord(
                    kind="session_id",
                    redis_key=self.keys.sessions,
                    raw=member,
                    reason=rejected.reason,
                    session_id=member.decode("utf-8", "backslashreplace"),
                )
        return sorted(ids), list(bad.values())

    def result(
        self,
        session_id: str,
        status: SessionStatus,
        *,
        messages: int = 0,
        kept: int = 0,
        seconds: float = 0.0,
        error: str | None = None,
        details: dict[str, Any] | None = None,
    ) -> SessionResult:
        return SessionResult(
            session_id=session_id,
            status=status,
            messages=messages,
            kept=kept,
            duration_ms=round(seconds * 1000),
            error=error,
            shard=self.shard_of(session_id) if self.shard_of else None,
            worker=self.worker_name,
            finished_at=datetime.now(UTC),
            details=details,
        )

    def failed(
        self, session_ids: Sequence[str], error: str, seconds: float = 0.0
    ) -> list[SessionResult]:
        """The results of a batch that failed as a whole (its time shared out)."""
        each = seconds / max(len(session_ids), 1)
        return [
            self.result(sid, SessionStatus.FAILED, seconds=each, error=error) for sid in session_ids
        ]
