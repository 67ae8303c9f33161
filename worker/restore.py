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
"""

from __future__ import annotations

import contextlib
import time
import uuid
from collections.abc import Sequence

from worker.engine import Engine
from worker.errors import DndError, TransientError
from worker.models import SessionResult, SessionStatus
from worker.records import session_hash
from worker.redis_store import SessionCommit

EXISTS_IN_REDIS = "exists in Redis (use --force to replace it)"


class RestoreEngine(Engine):
    def restore_batch(
        self,
        run_id: str | None,
        session_ids: Sequence[str],
        *,
        force: bool = False,
        explicit: bool = False,
    ) -> list[SessionResult]:
        """Restore sessions (canonical IDs); results are recorded when ``run_id`` is set.

        ``explicit``: the IDs were asked for by name, so one missing from
        PostgreSQL is a failure rather than a skip. A failure worth retrying
        (TransientError) is raised; other failures fail the batch's sessions,
        are recorded, and return.
        """
        ids = sorted(set(session_ids))
        started = time.monotonic()
        try:
            results = self._attempt(run_id, ids, force=force, explicit=explicit)
        except TransientError:
            raise
        except DndError as exc:
            results = self.failed(ids, str(exc), time.monotonic() - started)
        if run_id is not None:
            self.pg.record_results(run_id, results)
        return results

    def _attempt(
        self, run_id: str | None, ids: list[str], *, force: bool, explicit: bool
    ) -> list[SessionResult]:
        staging_run = run_id or str(uuid.uuid4())
        started = time.monotonic()
        results: dict[str, SessionResult] = {}
        with self.pg.transaction(read_only=True):
            self.pg.lock_sessions(ids)
            sessions = self.pg.sessions(ids)
            existing = set() if force else self.redis.existing(ids)
            todo = []
            for sid in ids:
                session = sessions.get(sid)
                if session is None:
                    status = SessionStatus.FAILED if explicit else SessionStatus.SKIPPED
                    results[sid] = self.result(
                        sid, status, error=f"session {sid} not found in PostgreSQL"
                    )
                elif session.deleted_at is not None:
                    results[sid] = self.result(
                        sid, SessionStatus.SKIPPED, error="soft-deleted: never restored"
                    )
                elif sid in existing:
                    results[sid] = self.result(sid, SessionStatus.SKIPPED, error=EXISTS_IN_REDIS)
                else:
                    todo.append(sid)
            if not todo:
                return [results[sid] for sid in ids]

            staged = dict.fromkeys(todo, 0)
            try:
                buffer: dict[str, dict[bytes, int]] = {}
                buffered = 0
                for sid, member, score in self.pg.stream_members(todo):
                    buffer.setdefault(sid, {})[member] = score
                    buffered += 1
                    if buffered >= self.chunk:
                        self._flush(staging_run, buffer, staged)
                        buffered = 0
                self._flush(staging_run, buffer, staged)
                commits = [
                    SessionCommit(sid, session_hash(sessions[sid]), staged[sid]) for sid in todo
                ]
                answers = self.redis.commit(staging_run, commits, force=force)
            except BaseException:
                # Staging keys expire anyway; removing them now keeps Redis tidy.
                with contextlib.suppress(DndError):
                    self.redis.discard_staging(staging_run, todo)
                raise
        each = (time.monotonic() - started) / len(todo)
        for sid, answer in zip(todo, answers, strict=True):
            if answer == 1:
                results[sid] = self.result(
                    sid, SessionStatus.COMPLETED, messages=staged[sid], seconds=each
                )
            elif answer == 0:
                results[sid] = self.result(
                    sid, SessionStatus.SKIPPED, seconds=each, error=EXISTS_IN_REDIS
                )
            else:
                results[sid] = self.result(
                    sid,
                    SessionStatus.FAILED,
                    seconds=each,
                    error="staged messages were incomplete when swapping in (another restore of "
                    "this session, or the staging key expired); nothing was changed",
                )
        return [results[sid] for sid in ids]

    def _flush(
        self, run_id: str, buffer: dict[str, dict[bytes, int]], staged: dict[str, int]
    ) -> None:
        if not buffer:
            return
        self.redis.stage(run_id, buffer)
        for sid, members in buffer.items():
            staged[sid] += len(members)
        buffer.clear()
