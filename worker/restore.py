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
   it was, or as restored; never half of it.

``as_of``: the state history holds for that moment is restored instead of the
latest (worker/pg_history.py). A forced restore into the live data keeps the
session it replaces (the swap renames it aside, in the same script) and backs
it up into history, then backs up what it restored: the replaced state, with
every write the application made before the swap, stays restorable (the
restore's undo), and writes after the swap are in the live session.
"""

from __future__ import annotations

import contextlib
import time
import uuid
from collections.abc import Iterator
from datetime import datetime

from worker.backup import BackupEngine
from worker.engine import Coverage, Engine
from worker.errors import DndError
from worker.models import BackupOptions, RestoreOptions, Session, SessionResult, SessionStatus
from worker.records import session_hash
from worker.redis_store import RedisStore, SessionCommit

EXISTS_IN_REDIS = "exists in Redis (use --force to replace it)"
INCOMPLETE_STAGING = (
    "staged messages were incomplete when swapping in (another restore of this session, "
    "or the staging key expired); nothing was changed"
)


class RestoreEngine(Engine[RestoreOptions]):
    def coverage(self) -> Coverage:
        """Every live (not soft-deleted) session in PostgreSQL (as of the moment, if given)."""
        moment = self.options.moment
        if moment is not None:
            ids, deleted = self.pg.session_ids_as_of(moment)
            return Coverage(ids, details={"soft_deleted_not_restored": deleted})
        ids = [sid for page in self.pg.live_session_ids() for sid in page]
        return Coverage(ids, details={"soft_deleted_not_restored": self.pg.count_soft_deleted()})

    def work(self, run_id: str | None, ids: list[str], *, explicit: bool) -> list[SessionResult]:
        staging_run = run_id or str(uuid.uuid4())
        results = self._restore(staging_run, ids, explicit=explicit)
        replaced = [r for r in results if r.details and r.details.get("replaced")]
        if replaced:
            self._capture_replaced(staging_run, replaced)
        self.record(run_id, results)
        return results

    def _capture_replaced(self, staging_run: str, results: list[SessionResult]) -> None:
        """Back up the sessions this batch replaced into history, then what it restored.

        The replaced state is captured first (its moment is the undo point,
        in each result's details), the restored state right after: history
        then holds both, in order.
        """
        ids = [r.session_id for r in results]
        try:
            # The replaced zset is the one the watermarks describe (renamed): an
            # incremental backup reads only what was written since the last one.
            before = self._history_backup(
                self.redis.with_keys(self.keys.restore_replaced(staging_run)), ids,
                f"replaced by restore {staging_run}", full=False,
            )  # fmt: skip
            # What was restored may differ from the stored rows by content only
            # (an edit undone): read it all.
            self._history_backup(self.redis, ids, f"restored by {staging_run}", full=True)
        finally:
            with contextlib.suppress(DndError):
                self.redis.discard_replaced(staging_run, ids)
        for result in results:
            assert result.details is not None
            result.details["undo_as_of"] = before.isoformat() if before else None

    def _history_backup(
        self, store: RedisStore, ids: list[str], note: str, *, full: bool
    ) -> datetime | None:
        engine = BackupEngine(
            store, self.pg, BackupOptions(full=full), chunk_messages=self.chunk,
            shard_of=self.shard_of, worker_name=self.worker_name,
        )  # fmt: skip
        engine.history_note = note
        engine.run_batch(None, ids, explicit=True)
        return engine.captured_at

    def _restore(self, staging_run: str, ids: list[str], *, explicit: bool) -> list[SessionResult]:
        started = time.monotonic()
        moment = self.options.moment
        with self.pg.transaction(read_only=True):
            self.pg.lock_sessions(ids)
            sessions = (
                self.pg.sessions(ids) if moment is None else self.pg.sessions_as_of(ids, moment)
            )
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
            if session is None and self.options.as_of is not None:
                error = f"did not exist at {self.options.as_of} (no backup had captured it)"
                results[sid] = self.result(sid, SessionStatus.SKIPPED, error=error)
            elif session is None:
                status = SessionStatus.FAILED if explicit else SessionStatus.SKIPPED
                error = f"session {sid} not found in PostgreSQL"
                results[sid] = self.result(sid, status, error=error)
            elif session.deleted_at is not None:
                error = "soft-deleted: never restored"
                if self.options.as_of is not None:
                    error = f"soft-deleted at {self.options.as_of}: never restored"
                results[sid] = self.result(sid, SessionStatus.SKIPPED, error=error)
            elif sid in existing:
                results[sid] = self.result(sid, SessionStatus.SKIPPED, error=EXISTS_IN_REDIS)
        return results

    def _stage(self, staging_run: str, todo: list[str]) -> dict[str, int]:
        """Stream the sessions' messages into their staging zsets; members staged per session."""
        staged = dict.fromkeys(todo, 0)
        buffer: dict[str, dict[bytes, int]] = {}
        buffered = 0
        moment = self.options.moment
        members = (
            self.pg.stream_members(todo)
            if moment is None
            else self.pg.stream_members_as_of(todo, moment)
        )
        with self._discard_staging_on_error(staging_run, todo):
            for sid, member, score in members:
                buffer.setdefault(sid, {})[member] = score
                buffered += 1
                if buffered >= self.chunk:
                    self._flush(staging_run, buffer, staged)
                    buffered = 0
            self._flush(staging_run, buffer, staged)
        return staged

    def _swap_in(self, staging_run: str, commits: list[SessionCommit]) -> list[int]:
        with self._discard_staging_on_error(staging_run, [c.session_id for c in commits]):
            return self.redis.commit(
                staging_run, commits, force=self.options.force,
                keep_replaced=self.options.keep_replaced,
            )  # fmt: skip

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
        if answer in (1, 2):
            return self.result(
                sid, SessionStatus.COMPLETED, messages=commit.staged_members, seconds=seconds,
                details={"replaced": True} if answer == 2 else None,
            )  # fmt: skip
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
