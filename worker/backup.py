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
   and commit: all of it or none of it.

If the COPY meets a message ID that is already stored (an ID reused across
sessions, or twice in one session), the batch is rolled back and redone with
every session on the merge path, which sorts such records out one by one.
"""

from __future__ import annotations

import enum
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

from worker.checksums import MessageChecksum, message_digest, session_digest
from worker.engine import Engine
from worker.errors import DndError, MessageConflict, TransientError
from worker.models import KeptRecord, Session, SessionResult, SessionStatus, Watermark
from worker.pg_store import MessageCopy
from worker.records import (
    RecordRejected,
    encode_raw_hash,
    hash_digest,
    parse_message,
    parse_session_hash,
    peek_message_id,
)
from worker.redis_store import Probe

# Kept records are buffered while a COPY streams; past this many the COPY is
# paused and they are written, so a session of garbage cannot fill memory.
KEPT_FLUSH_EVERY = 1000


class MessagePlan(enum.Enum):
    NONE = "none"  # no message to read
    NEW = "new"  # nothing in PostgreSQL yet: COPY everything
    APPEND = "append"  # only messages scored above the watermark: COPY them
    MERGE = "merge"  # rescan all messages and merge them


@dataclass(slots=True)
class _SessionWork:
    """One session's plan and what came of it."""

    session_id: str
    plan: MessagePlan
    mark: Watermark | None
    session: Session | None = None  # a changed, valid session row to upsert
    digest: bytes | None = None  # the hash digest to remember
    after_score: float | None = None
    kept: list[KeptRecord] = field(default_factory=list)
    kept_total: int = 0
    stored: int = 0
    read: int = 0  # distinct zset members read
    last_score: float | None = None
    notes: list[str] = field(default_factory=list)
    skipped: bool = False
    failed: str | None = None
    seconds: float = 0.0
    # Digests of the rows this run COPYed (new and append plans).
    written: MessageChecksum = field(default_factory=MessageChecksum)
    # What PostgreSQL holds for the session after this run, when it changed.
    checksum: MessageChecksum | None = None

    def keep(self, record: KeptRecord) -> None:
        self.kept.append(record)
        self.kept_total += 1


class BackupEngine(Engine):
    # -- one batch ----------------------------------------------------------

    def backup_batch(
        self,
        run_id: str | None,
        session_ids: Sequence[str],
        *,
        full: bool = False,
        explicit: bool = False,
    ) -> list[SessionResult]:
        """Back up sessions (canonical IDs) in one transaction; results are recorded too.

        ``explicit``: the IDs were asked for by name, so one that does not exist
        in Redis is a failure; in a run over the sessions set it merely vanished
        since the listing, and is skipped. ``full`` rescans every message.

        A failure worth retrying (TransientError: a server that cannot be
        reached, a session lock held too long) is raised, so that callers retry
        or stop; any other failure fails the batch's sessions, is recorded, and
        returns.
        """
        ids = sorted(set(session_ids))
        started = time.monotonic()
        try:
            try:
                works = self._attempt(run_id, ids, full=full, explicit=explicit, safe=False)
            except MessageConflict:
                works = self._attempt(run_id, ids, full=full, explicit=explicit, safe=True)
        except TransientError:
            raise
        except DndError as exc:
            failed = self.failed(ids, str(exc), time.monotonic() - started)
            if run_id is not None:
                self.pg.record_results(run_id, failed)
            return failed
        return [self._result(work) for work in works]

    def _attempt(
        self, run_id: str | None, ids: list[str], *, full: bool, explicit: bool, safe: bool
    ) -> list[_SessionWork]:
        with self.pg.transaction():
            batch_started = time.monotonic()
            self.pg.prefer_indexes()
            self.pg.lock_sessions(ids)
            marks = self.pg.watermarks(ids)
            probes = self.redis.probe(ids, marks)
            works = [
                self._plan(probes[sid], marks.get(sid), full=full, explicit=explicit, safe=safe)
                for sid in ids
            ]
            self.pg.upsert_sessions([w.session for w in works if w.session is not None])
            overhead = (time.monotonic() - batch_started) / max(len(works), 1)

            copy = self.pg.message_copy()
            copied = [w for w in works if w.plan in (MessagePlan.NEW, MessagePlan.APPEND)]
            requests = [(w.session_id, w.after_score) for w in copied]
            try:
                for index, page in self.redis.read_many(requests, self.chunk):
                    self._copy_page(copied[index], page, copy, run_id)
                copy.pause()
            except BaseException as exc:
                # End the COPY before the transaction rolls back: a connection
                # in the middle of a COPY accepts nothing else.
                copy.abort(exc)
                raise
            for work in works:
                if work.plan is MessagePlan.MERGE:
                    self._merge_messages(work)

            self.pg.save_watermarks(
                [m for m in (self._next_watermark(w) for w in works) if m is not None], run_id
            )
            self._record_checksums(works, run_id)
            self.pg.keep_records([r for w in works for r in w.kept], run_id)
            for work in works:
                work.seconds += overhead
            if run_id is not None:
                self.pg.record_results(run_id, [self._result(w) for w in works])
        return works

    # -- planning -----------------------------------------------------------

    def _plan(
        self, probe: Probe, mark: Watermark | None, *, full: bool, explicit: bool, safe: bool
    ) -> _SessionWork:
        sid = probe.session_id
        work = _SessionWork(session_id=sid, plan=MessagePlan.NONE, mark=mark)
        work.digest = mark.hash_digest if mark else None
        session_row_exists = mark is not None

        if probe.error is not None:
            work.failed = f"cannot read session {sid} from Redis: {probe.error}"
            return work
        if not probe.fields:
            if not probe.exists:
                if explicit:
                    work.failed = f"session {sid} not found in Redis"
                else:
                    work.skipped = True
                    work.notes.append("removed from Redis since the run listed it")
                return work
            reason = (
                "listed in the sessions set but has no session hash"
                if probe.listed
                else f"has {probe.message_count} messages but no session hash"
            )
            work.keep(
                KeptRecord(
                    kind="session_id",
                    redis_key=self.keys.session(sid),
                    raw=sid.encode(),
                    reason=reason,
                    session_id=sid,
                )
            )
        else:
            digest = hash_digest(probe.fields)
            if full or mark is None or mark.hash_digest != digest:
                try:
                    session, lossy = parse_session_hash(sid, probe.fields)
                except RecordRejected as rejected:
                    work.keep(self._kept_hash(sid, probe.fields, rejected.reason))
                else:
                    work.session = session
                    work.digest = digest
                    session_row_exists = True
                    if lossy:
                        work.keep(self._kept_hash(sid, probe.fields, lossy))

        if not session_row_exists:
            if probe.message_count:
                work.notes.append(
                    f"its {probe.message_count} messages are not backed up until the "
                    "session hash can be stored"
                )
            return work
        if mark is None:
            work.plan = MessagePlan.MERGE if safe else MessagePlan.NEW
        elif full:
            work.plan = MessagePlan.MERGE
        elif probe.count_to_watermark != mark.message_count:
            # Members at or below the watermark's score were added (a late
            # message with an old timestamp) or removed: rescan everything.
            work.plan = MessagePlan.MERGE
        elif probe.message_count > mark.message_count:
            work.plan = MessagePlan.MERGE if safe else MessagePlan.APPEND
            work.after_score = mark.max_score
        return work

    def _kept_hash(self, sid: str, fields: dict[bytes, bytes], reason: str) -> KeptRecord:
        return KeptRecord(
            kind="session",
            redis_key=self.keys.session(sid),
            raw=encode_raw_hash(fields),
            reason=reason,
            session_id=sid,
        )

    # -- moving messages ----------------------------------------------------

    def _copy_page(
        self,
        work: _SessionWork,
        page: list[tuple[bytes, float]],
        copy: MessageCopy,
        run_id: str | None,
    ) -> None:
        """One page of a session's messages into the COPY (pages come in score order)."""
        started = time.monotonic()
        sid = work.session_id
        key = self.keys.messages(sid)
        for raw, score in page:
            try:
                row, lossy = parse_message(sid, raw)
            except RecordRejected as rejected:
                work.keep(self._kept_message(sid, key, raw, score, rejected.reason))
            else:
                copy.write(row)
                work.stored += 1
                work.written.add(message_digest(row))
                if lossy:
                    work.keep(self._kept_message(sid, key, raw, score, lossy))
        work.read += len(page)
        work.last_score = page[-1][1]
        if len(work.kept) >= KEPT_FLUSH_EVERY:
            copy.pause()
            self.pg.keep_records(work.kept, run_id)
            work.kept.clear()
        work.seconds += time.monotonic() - started

    def _merge_messages(self, work: _SessionWork) -> None:
        started = time.monotonic()
        sid = work.session_id
        key = self.keys.messages(sid)
        self.pg.begin_merge()
        for page in self.redis.read_messages(sid, None, self.chunk):
            chunk: dict[str, tuple[tuple[object, ...], bytes, float]] = {}
            for raw, score in page:
                try:
                    row, lossy = parse_message(sid, raw)
                except RecordRejected as rejected:
                    work.keep(self._kept_message(sid, key, raw, score, rejected.reason))
                    continue
                if row[0] in chunk:
                    work.keep(self._kept_message(sid, key, raw, score, _DUPLICATE))
                    continue
                chunk[row[0]] = (row, raw, score)
                if lossy:
                    work.keep(self._kept_message(sid, key, raw, score, lossy))
            outcome = self.pg.merge_chunk([entry[0] for entry in chunk.values()])  # type: ignore[misc]
            work.stored += outcome.stored
            for message_id, owner in outcome.rejected.items():
                _row, raw, score = chunk[message_id]
                reason = (
                    _DUPLICATE
                    if owner == "duplicate"
                    else (f"message id {message_id} is already stored for session {owner}")
                )
                work.keep(self._kept_message(sid, key, raw, score, reason))
            work.read += len(page)
            work.last_score = page[-1][1]
        work.seconds += time.monotonic() - started

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

    # -- bookkeeping --------------------------------------------------------

    def _record_checksums(self, works: Sequence[_SessionWork], run_id: str | None) -> None:
        """Record, per session whose stored data changed, a checksum of what PostgreSQL holds.

        New and appended messages only add to the previous checksum (their
        digests were summed as they were written); after a merge, or when no
        checksum was recorded yet, the session's rows are read back and summed.
        """
        in_pg = [
            w
            for w in works
            if not w.failed and not w.skipped and (w.session is not None or w.mark is not None)
        ]
        if not in_pg:
            return
        recorded = self.pg.checksums([w.session_id for w in in_pg])
        updates: list[tuple[str, MessageChecksum, bytes]] = []
        recount: list[_SessionWork] = []
        for work in in_pg:
            old = recorded.get(work.session_id)
            if work.plan is MessagePlan.NEW and work.session is not None:
                # Nothing of it was in PostgreSQL: what was written is all it holds.
                work.checksum = work.written
                updates.append((work.session_id, work.written, session_digest(work.session)))
                continue
            if old is None or work.plan is MessagePlan.MERGE:
                recount.append(work)
                continue
            old_messages, old_session = old
            if work.plan is MessagePlan.NONE and work.session is None:
                continue  # nothing stored changed
            messages = old_messages.merge(work.written)
            digest = session_digest(work.session) if work.session else old_session
            work.checksum = messages
            updates.append((work.session_id, messages, digest))
        if recount:
            ids = [w.session_id for w in recount]
            sessions = self.pg.sessions(ids)
            sums = {sid: MessageChecksum() for sid in ids}
            for row in self.pg.stream_message_rows(ids):
                sums[row[1]].add(message_digest(row))
            for work in recount:
                if work.session_id in sessions:
                    work.checksum = sums[work.session_id]
                    updates.append(
                        (work.session_id, work.checksum, session_digest(sessions[work.session_id]))
                    )
        self.pg.save_checksums(updates, run_id)

    def _next_watermark(self, work: _SessionWork) -> Watermark | None:
        mark = work.mark
        if work.plan is MessagePlan.NONE:
            if mark is None:
                # A new session whose row could be written but has no messages
                # yet, or one that could not be written at all (no watermark:
                # it has no row to point at).
                if work.session is None:
                    return None
                return Watermark(work.session_id, work.digest, 0, None)
            if work.digest == mark.hash_digest:
                return None  # nothing to remember that is not remembered
            return Watermark(work.session_id, work.digest, mark.message_count, mark.max_score)
        if work.plan is MessagePlan.APPEND:
            assert mark is not None
            return Watermark(
                work.session_id,
                work.digest,
                mark.message_count + work.read,
                work.last_score if work.read else mark.max_score,
            )
        # NEW and MERGE read the whole zset: the count and top score are what was read.
        return Watermark(work.session_id, work.digest, work.read, work.last_score)

    def _result(self, work: _SessionWork) -> SessionResult:
        if work.failed:
            status = SessionStatus.FAILED
        elif work.kept_total:
            status = SessionStatus.PARTIAL
        elif work.skipped:
            status = SessionStatus.SKIPPED
        elif work.stored or work.session is not None:
            status = SessionStatus.COMPLETED
        else:
            status = SessionStatus.UNCHANGED
        error = work.failed
        if error is None and (work.kept_total or work.notes):
            parts = []
            if work.kept_total:
                parts.append(f"{work.kept_total} record(s) kept aside")
            error = "; ".join(parts + work.notes)
        return self.result(
            work.session_id,
            status,
            messages=work.stored,
            kept=work.kept_total,
            seconds=work.seconds,
            error=error,
            details={"checksum": work.checksum.hex()} if work.checksum else None,
        )


_DUPLICATE = "another message of this session has the same id (the first one read was stored)"
