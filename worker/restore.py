"""Restore: PostgreSQL -> Redis. Plain Python over the two stores; no Celery here.

A batch of sessions is restored inside one read-only PostgreSQL transaction
that first takes the sessions' locks (no backup of them runs meanwhile, so what
it reads of them cannot change under it):

1. read the session rows; a soft-deleted session is never restored, and one
   that exists in Redis is left alone unless ``force``;
2. stream every message of the sessions with one COPY (PostgreSQL builds each
   zset member's JSON) into per-session *staging* zsets, a bounded number of
   members per Redis round trip;
3. swap each session in with one Lua script: check again that it does not exist
   (unless ``force``), replace the hash, rename the staging zset over the
   messages key, add the ID to the sessions set. A reader sees the session as
   it was, or as restored; never half of it. (In a Redis Cluster the keys are
   in different slots: they are written one by one in a reader-safe order,
   see worker/cluster_swap.py and docs/cluster.md.)
"""

from __future__ import annotations

import contextlib
import time
import uuid
from collections.abc import Iterator

from worker.engine import Coverage, Engine
from worker.errors import DndError
from worker.models import RestoreOptions, Session, SessionResult, SessionStatus
from worker.records import session_hash
from worker.redis_store import SessionCommit

EXISTS_IN_REDIS = "exists in Redis (use --force to replace it)"
INCOMPLETE_STAGING = (
    "staged messages were incomplete when swapping in (another restore of this session, "
    "or the staging key expired); nothing was changed"
)


class RestoreEngine(Engine[RestoreOptions]):
    def coverage(self) -> Coverage:
        """Every live (not soft-deleted) session in PostgreSQL."""
        ids = [sid for page in self.pg.live_session_ids() for sid in page]
        return Coverage(ids, details={"soft_deleted_not_restored": self.pg.count_soft_deleted()})

    def work(self, run_id: str | None, ids: list[str], *, explicit: bool) -> list[SessionResult]:
        results = self._restore(run_id, ids, explicit=explicit)
        self.record(run_id, results)
        return results

    def _restore(
        self, run_id: str | None, ids: list[str], *, explicit: bool
    ) -> list[SessionResult]:
        staging_run = run_id or str(uuid.uuid4())
        started = time.monotonic()
        with self.pg.transaction(read_only=True):
            self.pg.lock_sessions(ids)
            sessions = self.pg.sessions(ids)
            results = self._not_restored(ids, sessions, explicit=explicit)
            todo = [sid for sid in ids if sid not in results]
            if todo:
                staged = self._stage(staging_run, todo)
                commits = [
                    SessionCommit(sid, session_hash(sessions[sid]), staged[sid]) for sid in todo
                ]
                answers = self._swap_in(staging_run, commits)
                each = (time.monotonic() - started) / len(todo)
                for commit, answer in zip(commits, answers, strict=True):
                    results[commit.session_id] = self._swap_result(commit, answer, each)
        return [results[sid] for sid in ids]

    def _not_restored(
        self, ids: list[str], sessions: dict[str, Session], *, explicit: bool
    ) -> dict[str, SessionResult]:
        """Results of the sessions this batch leaves alone: missing, soft-deleted, existing."""
        existing = set() if self.options.force else self.redis.existing(ids)
        results: dict[str, SessionResult] = {}
        for sid in ids:
            session = sessions.get(sid)
            if session is None:
                status = SessionStatus.FAILED if explicit else SessionStatus.SKIPPED
                error = f"session {sid} not found in PostgreSQL"
                results[sid] = self.result(sid, status, error=error)
            elif session.deleted_at is not None:
                error = "soft-deleted: never restored"
                results[sid] = self.result(sid, SessionStatus.SKIPPED, error=error)
            elif sid in existing:
                results[sid] = self.result(sid, SessionStatus.SKIPPED, error=EXISTS_IN_REDIS)
        return results

    def _stage(self, staging_run: str, todo: list[str]) -> dict[str, int]:
        """Stream the sessions' messages into their staging zsets; members staged per session."""
        staged = dict.fromkeys(todo, 0)
        buffer: dict[str, dict[bytes, int]] = {}
        buffered = 0
        with self._discard_staging_on_error(staging_run, todo):
            for sid, member, score in self.pg.stream_members(todo):
                buffer.setdefault(sid, {})[member] = score
                buffered += 1
                if buffered >= self.chunk:
                    self._flush(staging_run, buffer, staged)
                    buffered = 0
            self._flush(staging_run, buffer, staged)
        return staged

    def _swap_in(self, staging_run: str, commits: list[SessionCommit]) -> list[int]:
        with self._discard_staging_on_error(staging_run, [c.session_id for c in commits]):
            return self.redis.commit(staging_run, commits, force=self.options.force)

    @contextlib.contextmanager
    def _discard_staging_on_error(self, staging_run: str, ids: list[str]) -> Iterator[None]:
        try:
            yield
        except BaseException:
            # Staging keys expire anyway; removing them now keeps Redis tidy.
            with contextlib.suppress(DndError):
                self.redis.discard_staging(staging_run, ids)
            raise

    def _swap_result(self, commit: SessionCommit, answer: int, seconds: float) -> SessionResult:
        sid = commit.session_id
        if answer == 1:
            return self.result(
                sid, SessionStatus.COMPLETED, messages=commit.staged_members, seconds=seconds
            )
        if answer == 0:
            return self.result(sid, SessionStatus.SKIPPED, seconds=seconds, error=EXISTS_IN_REDIS)
        return self.result(sid, SessionStatus.FAILED, seconds=seconds, error=INCOMPLETE_STAGING)

    def _flush(
        self, run_id: str, buffer: dict[str, dict[bytes, int]], staged: dict[str, int]
    ) -> None:
        if not buffer:
            return
        self.redis.stage(run_id, buffer)
        for sid, members in buffer.items():
            staged[sid] += len(members)
        buffer.clear()
