"""Backup: Redis -> PostgreSQL. Plain Python over the two stores; no Celery here.

A batch of sessions is backed up in one PostgreSQL transaction:

1. lock the sessions (no other backup or restore of them runs meanwhile) and
   read their watermarks: what the last backup saw;
2. probe Redis for all of them in one round trip (hash, ZCARD, and ZCOUNT up to
   the watermark's score);
3. plan each session: unchanged, append (only messages newer than the
   watermark), new (all messages, nothing in PostgreSQL yet), or merge (rescan
   everything and merge: a message arrived late with an old timestamp, or
   ``full`` was asked for);
4. upsert changed session rows, stream new and appended messages with one COPY
   straight into client_messages, then merge the rest through a staging table;
5. store the new watermarks, the kept-aside records and the per-session results,
   and commit: all of it or none of it;
6. record history in the same transaction (docs/architecture.md, "History"):
   one capture row per session that changed (when, what it saw), the session
   rows it replaced, and only the exceptional messages: late, removed, edited.

If the COPY meets a message ID that is already stored (an ID reused across
sessions, or twice in one session), the batch is rolled back and redone with
every session on the merge path, which sorts such records out one by one.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime

from worker.backup_plan import MessagePlan, SessionPlan, plan_session
from worker.checksums import MessageChecksum, message_digest, session_digest
from worker.engine import Coverage, Engine
from worker.errors import MessageConflict
from worker.models import (
    BackupOptions,
    KeptRecord,
    MessageRow,
    SessionResult,
    SessionStatus,
    Watermark,
)
from worker.pg_history import Capture, HistoryContext
from worker.pg_store import MessageCopy
from worker.records import RecordRejected, parse_message, peek_message_id

# Kept records are buffered while a COPY streams; past this many the COPY is
# paused and they are written, so a session of garbage cannot fill memory.
KEPT_FLUSH_EVERY = 1000


@dataclass(slots=True)
class SessionProgress:
    """What came of one session's plan so far: counters and the records kept aside."""

    plan: SessionPlan
    kept: list[KeptRecord] = field(default_factory=list)  # not written yet
    kept_total: int = 0
    stored: int = 0  # messages this run stored
    read: int = 0  # distinct zset members read
    last_score: float | None = None  # the highest score read
    seconds: float = 0.0
    # Digests of the rows this run COPYed (new and append plans).
    written: MessageChecksum = field(default_factory=MessageChecksum)
    # What PostgreSQL holds for the session after this run, when it changed.
    checksum: MessageChecksum | None = None
    # History: whether the session was captured before, the highest score
    # captured so far, and what this capture changed.
    captured_before: bool = False
    top: float | None = None
    hash_changed: bool = False
    edited: int = 0
    late: int = 0
    removed: int = 0
    late_ids: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        for record in self.plan.kept:
            self.keep(record)

    @property
    def session_id(self) -> str:
        return self.plan.session_id

    def keep(self, record: KeptRecord) -> None:
        self.kept.append(record)
        self.kept_total += 1

    def pages_read(self, count: int, last_score: float) -> None:
        self.read += count
        self.last_score = last_score


class BackupEngine(Engine[BackupOptions]):
    # Record history (docs/architecture.md, "History"). Off only in
    # bench/history.py, to measure what history costs.
    record_history = True
    # The moment of the last batch's capture (the restore's undo point).
    captured_at: datetime | None = None

    def coverage(self) -> Coverage:
        ids, bad = self.listed_sessions()
        return Coverage(ids, bad)

    def work(self, run_id: str | None, ids: list[str], *, explicit: bool) -> list[SessionResult]:
        try:
            done = self._attempt(run_id, ids, explicit=explicit, safe=False)
        except MessageConflict:
            done = self._attempt(run_id, ids, explicit=explicit, safe=True)
        return [self._result(progress) for progress in done]

    def _attempt(
        self, run_id: str | None, ids: list[str], *, explicit: bool, safe: bool
    ) -> list[SessionProgress]:
        with self.pg.transaction():
            batch_started = time.monotonic()
            self.pg.prefer_indexes()
            self.pg.lock_sessions(ids)
            marks = self.pg.watermarks(ids)
            probes = self.redis.probe(ids, marks)
            # The moment of this capture: when the backup looked at Redis.
            at = self.captured_at = datetime.now(UTC)
            full = self.options.full
            sessions = [
                SessionProgress(
                    plan_session(
                        probes[sid], marks.get(sid), self.keys,
                        full=full, explicit=explicit, safe=safe,
                    )
                )
                for sid in ids
            ]  # fmt: skip
            history = self._history_before(sessions, at, run_id) if self.record_history else None
            self.pg.upsert_sessions([s.plan.session for s in sessions if s.plan.session])
            overhead = (time.monotonic() - batch_started) / max(len(sessions), 1)

            self._copy_new_messages([s for s in sessions if s.plan.messages.copies], run_id)
            for progress in sessions:
                if progress.plan.messages is MessagePlan.MERGE:
                    self._merge_messages(progress, history, run_id)

            watermarks = {s.session_id: _next_watermark(s) for s in sessions}
            self.pg.save_watermarks([m for m in watermarks.values() if m is not None], run_id)
            if history is not None:
                self._record_captures(sessions, watermarks, at, run_id)
            self._record_checksums(sessions, run_id)
            self.pg.keep_records([r for s in sessions for r in s.kept], run_id)
            for progress in sessions:
                progress.seconds += overhead
            # Results commit with the data they describe.
            self.record(run_id, [self._result(s) for s in sessions])
        return sessions

    # -- moving messages ----------------------------------------------------

    def _copy_new_messages(self, sessions: list[SessionProgress], run_id: str | None) -> None:
        """Stream new and appended messages with one COPY straight into client_messages."""
        copy = self.pg.message_copy()
        requests = [(s.session_id, s.plan.after_score) for s in sessions]
        try:
            for index, page in self.redis.read_many(requests, self.chunk):
                self._copy_page(sessions[index], page, copy, run_id)
            copy.pause()
        except BaseException as exc:
            # End the COPY before the transaction rolls back: a connection
            # in the middle of a COPY accepts nothing else.
            copy.abort(exc)
            raise

    def _copy_page(
        self,
        progress: SessionProgress,
        page: list[tuple[bytes, float]],
        copy: MessageCopy,
        run_id: str | None,
    ) -> None:
        """One page of a session's messages into the COPY (pages come in score order)."""
        started = time.monotonic()
        sid = progress.session_id
        key = self.keys.messages(sid)
        for raw, score in page:
            try:
                row, lossy = parse_message(sid, raw)
            except RecordRejected as rejected:
                progress.keep(self._kept_message(sid, key, raw, score, rejected.reason))
            else:
                copy.write(row)
                progress.stored += 1
                progress.written.add(message_digest(row))
                if progress.top is not None and score <= progress.top:
                    progress.late_ids.append(row[0])
                if lossy:
                    progress.keep(self._kept_message(sid, key, raw, score, lossy))
        progress.pages_read(len(page), page[-1][1])
        if len(progress.kept) >= KEPT_FLUSH_EVERY:
            copy.pause()
            self.pg.keep_records(progress.kept, run_id)
            progress.kept.clear()
        progress.seconds += time.monotonic() - started

    def _merge_messages(
        self, progress: SessionProgress, history: datetime | None, run_id: str | None
    ) -> None:
        started = time.monotonic()
        sid = progress.session_id
        self.pg.begin_merge()
        context = None if history is None else HistoryContext(progress.top, history, run_id)
        for page in self.redis.read_messages(sid, None, self.chunk):
            chunk = self._merge_chunk_rows(progress, page)
            rows = [row for row, _raw, _score in chunk.values()]
            outcome = self.pg.merge_chunk(rows, context)
            progress.stored += outcome.stored
            if outcome.history is not None:
                progress.edited += outcome.history.edited
                progress.late += outcome.history.late
            for message_id, owner in outcome.rejected.items():
                _row, raw, score = chunk[message_id]
                reason = (
                    DUPLICATE_REASON
                    if owner == "duplicate"
                    else f"message id {message_id} is already stored for session {owner}"
                )
                progress.keep(self._kept_message(sid, self.keys.messages(sid), raw, score, reason))
            progress.pages_read(len(page), page[-1][1])
        if history is not None and progress.captured_before:
            progress.removed = self.pg.history_removed(sid, history, run_id)
        progress.seconds += time.monotonic() - started

    def _merge_chunk_rows(
        self, progress: SessionProgress, page: list[tuple[bytes, float]]
    ) -> dict[str, tuple[MessageRow, bytes, float]]:
        """A page's valid rows by message ID; the rest kept aside (the first of an ID wins)."""
        sid = progress.session_id
        key = self.keys.messages(sid)
        chunk: dict[str, tuple[MessageRow, bytes, float]] = {}
        for raw, score in page:
            try:
                row, lossy = parse_message(sid, raw)
            except RecordRejected as rejected:
                progress.keep(self._kept_message(sid, key, raw, score, rejected.reason))
                continue
            if row[0] in chunk:
                progress.keep(self._kept_message(sid, key, raw, score, DUPLICATE_REASON))
                continue
            chunk[row[0]] = (row, raw, score)
            if lossy:
                progress.keep(self._kept_message(sid, key, raw, score, lossy))
        return chunk

    def _kept_message(
        self, sid: str, key: str, raw: bytes, score: float, reason: str
    ) -> KeptRecord:
        return KeptRecord(
            kind="message",
            redis_key=key,
            raw=raw,
            reason=reason,
            session_id=sid,
            message_id=peek_message_id(raw),
            score=score,
        )

    # -- history --------------------------------------------------------------

    def _history_before(
        self, sessions: Sequence[SessionProgress], at: datetime, run_id: str | None
    ) -> datetime:
        """Before anything is written: what history saw so far, and the rows about to change.

        Returns the capture's moment (the merge path records with it).
        """
        # A session never backed up (no watermark) was never captured either: a
        # cold backup asks nothing here.
        stored = [s for s in sessions if s.plan.mark is not None and not s.plan.failed]
        if not stored:
            return at
        tops = self.pg.last_captures([s.session_id for s in stored])
        for progress in stored:
            if progress.session_id in tops:
                progress.captured_before = True
                progress.top = tops[progress.session_id]
        changing = [s for s in stored if s.plan.session is not None and s.plan.mark is not None]
        if changing:
            rows = self.pg.sessions([s.session_id for s in changing])
            replaced = []
            for progress in changing:
                old = rows.get(progress.session_id)
                new = progress.plan.session
                assert new is not None
                if old is not None and session_digest(old) != session_digest(new):
                    progress.hash_changed = True
                    replaced.append(progress.session_id)
            self.pg.save_session_versions(replaced, at, run_id)
        return at

    def _record_captures(
        self,
        sessions: Sequence[SessionProgress],
        watermarks: dict[str, Watermark | None],
        at: datetime,
        run_id: str | None,
    ) -> None:
        """One capture row per session this backup found changed (or saw first)."""
        captures = []
        for progress in sessions:
            plan = progress.plan
            if plan.failed or plan.skipped or not plan.row_stored:
                continue
            self.pg.record_late(progress.session_id, progress.late_ids, at, run_id)
            added = progress.stored - progress.edited
            changed = added or progress.hash_changed or progress.removed or progress.edited
            if progress.captured_before and not changed:
                continue
            mark = watermarks.get(progress.session_id) or plan.mark
            read_top = progress.last_score if progress.read else None
            top = max(
                (v for v in (progress.top, read_top, mark.max_score if mark else None)
                 if v is not None),
                default=None,
            )  # fmt: skip
            captures.append(
                Capture(
                    session_id=progress.session_id,
                    message_count=mark.message_count if mark else 0,
                    max_score=top,
                    hash_changed=progress.hash_changed or not progress.captured_before,
                    added=added,
                    removed=progress.removed,
                    edited=progress.edited,
                    late=progress.late + len(progress.late_ids),
                )
            )
        self.pg.record_captures(captures, at, run_id, self.history_note)

    # Why this backup captures (a note in history_captures; the restore's undo sets it).
    history_note: str | None = None

    # -- bookkeeping --------------------------------------------------------

    def _record_checksums(self, sessions: Sequence[SessionProgress], run_id: str | None) -> None:
        """Record, per session whose stored data changed, a checksum of what PostgreSQL holds.

        New and appended messages only add to the previous checksum (their
        digests were summed as they were written); after a merge, or when no
        checksum was recorded yet, the session's rows are read back and summed.
        """
        in_pg = [
            s for s in sessions if not s.plan.failed and not s.plan.skipped and s.plan.row_stored
        ]
        if not in_pg:
            return
        recorded = self.pg.checksums([s.session_id for s in in_pg])
        updates: list[tuple[str, MessageChecksum, bytes]] = []
        recount: list[SessionProgress] = []
        for progress in in_pg:
            plan = progress.plan
            old = recorded.get(progress.session_id)
            if plan.messages is MessagePlan.NEW and plan.session is not None:
                # Nothing of it was in PostgreSQL: what was written is all it holds.
                progress.checksum = progress.written
                updates.append(
                    (progress.session_id, progress.written, session_digest(plan.session))
                )
            elif old is None or plan.messages is MessagePlan.MERGE:
                recount.append(progress)
            elif plan.messages is not MessagePlan.NONE or plan.session is not None:
                old_messages, old_session = old
                progress.checksum = old_messages.merge(progress.written)
                digest = session_digest(plan.session) if plan.session else old_session
                updates.append((progress.session_id, progress.checksum, digest))
        updates += self._recount_checksums(recount)
        self.pg.save_checksums(updates, run_id)

    def _recount_checksums(
        self, recount: list[SessionProgress]
    ) -> list[tuple[str, MessageChecksum, bytes]]:
        """Checksums of sessions summed from their stored rows."""
        if not recount:
            return []
        ids = [s.session_id for s in recount]
        stored = self.pg.sessions(ids)
        sums = {sid: MessageChecksum() for sid in ids}
        for row in self.pg.stream_message_rows(ids):
            sums[row[1]].add(message_digest(row))
        updates = []
        for progress in recount:
            session = stored.get(progress.session_id)
            if session is not None:
                progress.checksum = sums[progress.session_id]
                updates.append((progress.session_id, progress.checksum, session_digest(session)))
        return updates

    def _result(self, progress: SessionProgress) -> SessionResult:
        plan = progress.plan
        if plan.failed:
            status = SessionStatus.FAILED
        elif progress.kept_total:
            status = SessionStatus.PARTIAL
        elif plan.skipped:
            status = SessionStatus.SKIPPED
        elif progress.stored or plan.session is not None:
            status = SessionStatus.COMPLETED
        else:
            status = SessionStatus.UNCHANGED
        return self.result(
            progress.session_id,
            status,
            messages=progress.stored,
            kept=progress.kept_total,
            seconds=progress.seconds,
            error=plan.failed or _explanation(progress),
            details={"checksum": progress.checksum.hex()} if progress.checksum else None,
        )


def _explanation(progress: SessionProgress) -> str | None:
    """What the operator should know about a session that was not simply stored."""
    parts = []
    if progress.kept_total:
        parts.append(f"{progress.kept_total} record(s) kept aside")
    parts += progress.plan.notes
    return "; ".join(parts) or None


def _next_watermark(progress: SessionProgress) -> Watermark | None:
    """What to remember of the session for the next run (None: nothing new)."""
    plan, mark = progress.plan, progress.plan.mark
    sid = progress.session_id
    if plan.messages is MessagePlan.NONE:
        if mark is None:
            # A new session whose row could be written but has no messages yet,
            # or one that could not be written at all (no watermark: it has no
            # row to point at).
            return None if plan.session is None else Watermark(sid, plan.digest, 0, None)
        if plan.digest == mark.hash_digest:
            return None  # nothing to remember that is not remembered
        return Watermark(sid, plan.digest, mark.message_count, mark.max_score)
    if plan.messages is MessagePlan.APPEND:
        assert mark is not None
        top = progress.last_score if progress.read else mark.max_score
        return Watermark(sid, plan.digest, mark.message_count + progress.read, top)
    # NEW and MERGE read the whole zset: the count and top score are what was read.
    return Watermark(sid, plan.digest, progress.read, progress.last_score)


DUPLICATE_REASON = "another message of this session has the same id (the first one read was stored)"
