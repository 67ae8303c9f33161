"""What the backup, restore and verify engines share: the batch method, and results.

An engine is made for one kind of run, with that run's options (worker.models
RunOptions: ``full``, ``force``, ``quick``...). It exposes one method,
:meth:`Engine.run_batch`, with the same signature for every kind: a batch of
session IDs in, one result per session out (also recorded in the run's
per-session results when a run ID is given). The run layer (worker.runs)
makes engines and cuts runs into batches; engines know nothing of runs'
records, of threads, or of Celery.

Every per-session result is stamped here (its shard, the worker that made it,
when it finished), so that a backup's, a restore's and a verify's results read
alike.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Generic, TypeVar

from worker.errors import DndError, TransientError
from worker.keys import RedisKeys
from worker.models import KeptRecord, RunOptions, SessionResult, SessionStatus
from worker.pg_store import PostgresStore
from worker.records import RecordRejected, classify_set_member
from worker.redis_store import RedisStore

OptionsT = TypeVar("OptionsT", bound=RunOptions)


@dataclass(frozen=True, slots=True)
class Coverage:
    """What a run over every session covers, as listed when it starts."""

    session_ids: list[str]
    # Records that name no session (bad members of the sessions set).
    kept: list[KeptRecord] = field(default_factory=list)
    # What the run's record should say about the listing.
    details: dict[str, Any] = field(default_factory=dict)


class Engine(Generic[OptionsT]):
    def __init__(
        self,
        redis_store: RedisStore,
        pg: PostgresStore,
        options: OptionsT,
        *,
        chunk_messages: int = 5000,
        shard_of: Callable[[str], int] | None = None,
        worker_name: str | None = None,
    ) -> None:
        self.redis = redis_store
        self.pg = pg
        self.options = options
        self.keys: RedisKeys = redis_store.keys
        self.chunk = chunk_messages
        self.shard_of = shard_of
        self.worker_name = worker_name

    # -- what each engine provides --------------------------------------------

    def coverage(self) -> Coverage:
        """The sessions a run over all of them covers."""
        raise NotImplementedError

    def work(self, run_id: str | None, ids: list[str], *, explicit: bool) -> list[SessionResult]:
        """Do one batch (sorted, distinct IDs) and record its results under ``run_id``."""
        raise NotImplementedError

    # -- the batch method -----------------------------------------------------

    def run_batch(
        self, run_id: str | None, session_ids: Sequence[str], *, explicit: bool = False
    ) -> list[SessionResult]:
        """Work on a batch of sessions (canonical IDs); one result per session.

        ``explicit``: the IDs were asked for by name, so one that does not exist
        is a failure; in a run over all sessions it merely vanished since the
        listing, and is skipped. Results are recorded when ``run_id`` is set.

        A failure worth retrying (TransientError: a server that cannot be
        reached, a session lock held too long) is raised, so that callers retry
        or stop; any other failure fails the batch's sessions, is recorded, and
        returns.
        """
        ids = sorted(set(session_ids))
        started = time.monotonic()
        try:
            return self.work(run_id, ids, explicit=explicit)
        except TransientError:
            raise
        except DndError as exc:
            failed = self.failed(ids, str(exc), time.monotonic() - started)
            self.record(run_id, failed)
            return failed

    # -- shared pieces ----------------------------------------------------------

    def record(self, run_id: str | None, results: Sequence[SessionResult]) -> None:
        if run_id is not None:
            self.pg.record_results(run_id, results)

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
        return failed_results(
            session_ids, error, shard_of=self.shard_of, worker=self.worker_name, seconds=seconds
        )


def failed_results(
    session_ids: Sequence[str],
    error: str,
    *,
    shard_of: Callable[[str], int] | None,
    worker: str | None,
    seconds: float = 0.0,
) -> list[SessionResult]:
    """Failed results of sessions, stamped like every result (their time shared out)."""
    each_ms = round(seconds * 1000 / max(len(session_ids), 1))
    now = datetime.now(UTC)
    return [
        SessionResult(
            session_id=sid,
            status=SessionStatus.FAILED,
            duration_ms=each_ms,
            error=error,
            shard=shard_of(sid) if shard_of else None,
            worker=worker,
            finished_at=now,
        )
        for sid in session_ids
    ]
