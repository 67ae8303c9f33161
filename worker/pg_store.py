"""The PostgreSQL store: the only code that runs SQL.

It takes one connection (autocommit; transactions are explicit) and speaks in
the dataclasses of :mod:`worker.models`. Every psycopg error leaves it as one of
:mod:`worker.errors` (see :func:`worker.connections.postgres_errors`).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import uuid
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import psycopg
import psycopg.errors

from worker.checksums import MessageChecksum
from worker.connections import one_line, postgres_errors
from worker.errors import MessageConflict, RunInProgress
from worker.models import (
    KeptRecord,
    MessageRow,
    Run,
    RunStatus,
    Session,
    SessionResult,
    SessionStatus,
    Watermark,
)
from worker.settings import Settings
from worker.sql import QUERIES

PREVIEW_LIMIT = 2000


@dataclass(frozen=True, slots=True)
class MergeOutcome:
    """What merging one chunk of a session's messages did."""

    stored: int
    # message ID -> why it was not merged ("duplicate", or the owning session's ID)
    rejected: dict[str, str]


class MessageCopy:
    """A COPY of message rows straight into client_messages.

    The fast path: used only for messages that cannot be in the table yet (a
    session never backed up, or messages newer than everything backed up). If
    one is there after all, PostgreSQL raises a unique violation and the caller
    retries through the merge path.

    ``pause()`` ends the current COPY so that other statements can run on the
    connection; the next ``write`` starts a new one, in the same transaction.
    """

    def __init__(self, conn: psycopg.Connection[Any]) -> None:
        self._conn = conn
        self._stack: contextlib.ExitStack | None = None
        self._copy: psycopg.Copy | None = None
        self.rows = 0

    def write(self, row: MessageRow) -> None:
        try:
            if self._copy is None:
                self._copy = self._open()
            self._copy.write_row(row)
        except psycopg.errors.UniqueViolation as exc:
            self.abort(exc)
            raise MessageConflict(one_line(str(exc))) from exc
        except BaseException as exc:
            self.abort(exc)
            raise
        self.rows += 1

    def _open(self) -> psycopg.Copy:
        self._stack = contextlib.ExitStack()
        cursor = self._stack.enter_context(self._conn.cursor())
        return self._stack.enter_context(cursor.copy(QUERIES["copy_messages"]))

    def pause(self) -> None:
        """End the COPY in progress, if any; the rows so far reach the server."""
        if self._stack is not None:
            stack, self._stack, self._copy = self._stack, None, None
            try:
                stack.close()
            except psycopg.errors.UniqueViolation as exc:
                raise MessageConflict(one_line(str(exc))) from exc

    def abort(self, exc: BaseException) -> None:
        """End the COPY in progress after an error, telling the server it failed."""
        if self._stack is not None:
            stack, self._stack, self._copy = self._stack, None, None
            with contextlib.suppress(Exception):
                stack.__exit__(type(exc), exc, exc.__traceback__)


class PostgresStore:
    def __init__(self, conn: psycopg.Connection[Any], settings: Settings) -> None:
        self.conn = conn
        self.settings = settings
        self._merge_tables_ready = False

    # -- plumbing -----------------------------------------------------------

    def errors(self) -> contextlib.AbstractContextManager[None]:
        """Translate driver errors raised in the block (public for the engine's COPY loops)."""
        return postgres_errors(self.settings)

    @contextlib.contextmanager
    def transaction(self, *, read_only: bool = False) -> Iterator[None]:
        try:
            with postgres_errors(self.settings), self.conn.transaction():
                if read_only:
                    # Read committed, not repeatable read: that snapshot would be
                    # taken by the statement that waits for the session locks,
                    # before the backup holding them commits. The locks, taken
                    # before the first read, keep the batch's sessions unchanged.
                    self.conn.execute("SET TRANSACTION READ ONLY")
                yield
        except BaseException:
            # A rolled-back transaction takes the temporary merge tables it
            # created with it: create them again (IF NOT EXISTS) on next use.
            self._merge_tables_ready = False
            raise

    def ping(self) -> None:
        with postgres_errors(self.settings):
            self.conn.execute("SELECT 1")

    # -- backup -------------------------------------------------------------

    def lock_sessions(self, session_ids: Sequence[str]) -> None:
        """Take the per-session locks for the current transaction (see queries.sql)."""
        with postgres_errors(self.settings):
            self.conn.execute(QUERIES["lock_sessions"], {"ids": list(session_ids)})

    def prefer_indexes(self) -> None:
        """For the current transaction: look rows up by index (see queries.sql)."""
        with postgres_errors(self.settings):
            self.conn.execute(QUERIES["prefer_indexes"])

    def watermarks(self, session_ids: Sequence[str]) -> dict[str, Watermark]:
        with postgres_errors(self.settings):
            rows = self.conn.execute(QUERIES["watermarks"], {"ids": list(session_ids)}).fetchall()
        return {
            row[0]: Watermark(
                session_id=row[0], hash_digest=row[1], message_count=row[2], max_score=row[3]
            )
            for row in rows
        }

    def upsert_sessions(self, sessions: Sequence[Session]) -> None:
        if not sessions:
            return
        params = [
            {
                "id": s.id,
                "created_at": s.created_at,
                "updated_at": s.updated_at,
                "deleted_at": s.deleted_at,
                "name": s.name,
                "creator_id": s.creator_id,
                "mcp_server_url": s.mcp_server_url,
                "websocket_key": s.websocket_key,
                "max_players": s.max_players,
                "settings": s.settings,
                "status": s.status,
            }
            for s in sessions
        ]
        with postgres_errors(self.settings), self.conn.cursor() as cur:
            cur.executemany(QUERIES["upsert_session"], params)

    def message_copy(self) -> MessageCopy:
        return MessageCopy(self.conn)

    def begin_merge(self) -> None:
        """Prepare to merge one session's messages (call once per session)."""
        with postgres_errors(self.settings):
            if not self._merge_tables_ready:
                self.conn.execute(QUERIES["create_merge_tables"])
                self._merge_tables_ready = True
            self.conn.execute(QUERIES["reset_merge_seen"])

    def merge_chunk(self, rows: Sequence[MessageRow]) -> MergeOutcome:
        """Merge rows of one session: insert new, update edited, reject conflicts.

        The slow, safe path: staged with COPY, then merged with one INSERT ...
        ON CONFLICT. Duplicate IDs inside ``rows`` must have been removed by the
        caller; duplicates of earlier chunks of the same session (since
        ``begin_merge``) and IDs owned by another session come back as rejected.
        """
        if not rows:
            return MergeOutcome(0, {})
        with postgres_errors(self.settings), self.conn.cursor() as cur:
            with cur.copy(QUERIES["copy_merge_staging"]) as copy:
                for row in rows:
                    copy.write_row(row)
            rejected = dict(cur.execute(QUERIES["merge_rejects"]).fetchall())
            if rejected:
                cur.execute(QUERIES["drop_merge_rejects"], {"ids": list(rejected)})
            cur.execute(QUERIES["merge_messages"])
            stored = cur.rowcount
            # Another session's backup may have committed one of these IDs after
            # merge_rejects looked; ON CONFLICT then skipped the row: reject it too.
            rejected.update(cur.execute(QUERIES["merge_late_rejects"]).fetchall())
            cur.execute(QUERIES["clear_merge_staging"])
        return MergeOutcome(stored, rejected)

    def save_watermarks(self, watermarks: Sequence[Watermark], run_id: str | None) -> None:
        if not watermarks:
            return
        params = [
            {
                "session_id": w.session_id,
                "hash_digest": w.hash_digest,
                "message_count": w.message_count,
                "max_score": w.max_score,
                "snapshot_id": run_id,
            }
            for w in watermarks
        ]
        with postgres_errors(self.settings), self.conn.cursor() as cur:
            cur.executemany(QUERIES["save_watermark"], params)

    def keep_records(self, records: Sequence[KeptRecord], run_id: str | None) -> None:
        """Store bad records (upserted: a record seen again updates its row)."""
        if not records:
            return
        params = [
            {
                "kind": r.kind,
                "redis_key": _safe_text(r.redis_key),
                "session_id": None if r.session_id is None else _safe_text(r.session_id),
                "message_id": None if r.message_id is None else _safe_text(r.message_id),
                "score": r.score,
                "reason": _safe_text(r.reason),
                "raw": r.raw,
                "preview": preview(r.raw),
                "snapshot_id": run_id,
            }
            for r in _unique_records(records)
        ]
        with postgres_errors(self.settings), self.conn.cursor() as cur:
            cur.executemany(QUERIES["keep_record"], params)

    def kept_records(
        self, *, limit: int = 50, include_resolved: bool = False, run_id: str | None = None
    ) -> list[dict[str, Any]]:
        with postgres_errors(self.settings), self.conn.cursor() as cur:
            cur.execute(
                QUERIES["list_kept_records"],
                {"limit": limit, "include_resolved": include_resolved, "snapshot_id": run_id},
            )
            columns = [c.name for c in cur.description or ()]
            return [dict(zip(columns, row, strict=True)) for row in cur.fetchall()]

    def kept_record(self, record_id: int) -> dict[str, Any] | None:
        """One kept record, with its raw bytes."""
        with postgres_errors(self.settings), self.conn.cursor() as cur:
            cur.execute(QUERIES["get_kept_record"], {"id": record_id})
            row = cur.fetchone()
            if row is None:
                return None
            columns = [c.name for c in cur.description or ()]
            return dict(zip(columns, row, strict=True))

    def resolve_kept_records(self, ids: Sequence[int]) -> int:
        with postgres_errors(self.settings), self.conn.cursor() as cur:
            cur.execute(QUERIES["resolve_kept_records"], {"ids": list(ids)})
            return cur.rowcount

    # -- checksums ----------------------------------------------------------

    def checksums(self, session_ids: Sequence[str]) -> dict[str, tuple[MessageChecksum, bytes]]:
        """Recorded checksums: session ID -> (message checksum, session digest)."""
        with postgres_errors(self.settings):
            rows = self.conn.execute(QUERIES["checksums"], {"ids": list(session_ids)})
            return {
                row[0]: (MessageChecksum.from_stored(row[1], row[2]), bytes(row[3])) for row in rows
            }

    def save_checksums(
        self, checksums: Sequence[tuple[str, MessageChecksum, bytes]], run_id: str | None
    ) -> None:
        if not checksums:
            return
        params = [
            {
                "session_id": sid,
                "message_count": messages.count,
                "messages_digest": messages.to_bytes(),
                "session_digest": digest,
                "snapshot_id": run_id,
            }
            for sid, messages, digest in checksums
        ]
        with postgres_errors(self.settings), self.conn.cursor() as cur:
            cur.executemany(QUERIES["save_checksum"], params)

    def stream_message_rows(self, session_ids: Sequence[str]) -> Iterator[MessageRow]:
        """Every stored message of the sessions, as rows (COPY: flat memory, no order)."""
        with (
            postgres_errors(self.settings),
            self.conn.cursor() as cur,
            cur.copy(QUERIES["message_rows"], {"ids": list(session_ids)}) as copy,
        ):
            copy.set_types(["text", "text", "timestamptz", "text", "text", "text", "text"])
            yield from copy.rows()

    # -- restore ------------------------------------------------------------

    def sessions(self, session_ids: Sequence[str]) -> dict[str, Session]:
        with postgres_errors(self.settings):
            rows = self.conn.execute(QUERIES["sessions"], {"ids": list(session_ids)}).fetchall()
        # The query selects the columns in the order of Session's fields.
        return {row[0]: Session(*row) for row in rows}

    def live_session_ids(self, page_size: int = 5000) -> Iterator[list[str]]:
        """IDs of the sessions a restore may bring back, in pages, in ID order."""
        after: str | None = None
        while True:
            with postgres_errors(self.settings):
                rows = self.conn.execute(
                    QUERIES["live_session_ids_page"], {"after": after, "limit": page_size}
                ).fetchall()
            if not rows:
                return
            page = [row[0] for row in rows]
            yield page
            after = page[-1]

    def count_soft_deleted(self) -> int:
        """Sessions in PostgreSQL that are soft-deleted (restores never bring them back)."""
        with postgres_errors(self.settings):
            row = self.conn.execute(QUERIES["count_soft_deleted"]).fetchone()
        assert row is not None
        return int(row[0])

    def message_counts(self, session_ids: Sequence[str]) -> dict[str, int]:
        with postgres_errors(self.settings):
            rows = self.conn.execute(QUERIES["message_counts"], {"ids": list(session_ids)})
            return {row[0]: int(row[1]) for row in rows}

    def stream_members(self, session_ids: Sequence[str]) -> Iterator[tuple[str, bytes, int]]:
        """(session ID, zset member, score) for every message of the sessions.

        Streamed with COPY: memory stays flat whatever the sessions' size. The
        order is not defined (grouping would cost PostgreSQL a sort).
        """
        with (
            postgres_errors(self.settings),
            self.conn.cursor() as cur,
            cur.copy(QUERIES["restore_members"], {"ids": list(session_ids)}) as copy,
        ):
            copy.set_types(["text", "bytea", "int8"])
            yield from copy.rows()

    # -- runs ---------------------------------------------------------------

    def start_run(
        self,
        kind: str,
        scope: str,
        *,
        run_id: str | None = None,
        forced: bool = False,
        expected_sessions: int | None = None,
        kept: int = 0,
        details: dict[str, Any] | None = None,
    ) -> Run:
        """Insert a `running` run row (see ensure_run); returns it."""
        run, _created = self.ensure_run(
            kind,
            scope,
            run_id=run_id or str(uuid.uuid4()),
            forced=forced,
            expected_sessions=expected_sessions,
            kept=kept,
            details=details,
        )
        return run

    def ensure_run(
        self,
        kind: str,
        scope: str,
        *,
        run_id: str,
        forced: bool = False,
        expected_sessions: int | None = None,
        kept: int = 0,
        details: dict[str, Any] | None = None,
    ) -> tuple[Run, bool]:
        """The run ``run_id``, inserted `running` unless it exists: (run, created).

        Raises RunInProgress when this is a full run and another full run of
        the same kind is running (a unique index guarantees at most one).
        """
        params = {
            "id": run_id,
            "kind": kind,
            "scope": scope,
            "forced": forced,
            "expected_sessions": expected_sessions,
            "kept_count": kept,
            "details": json.dumps(details or {}),
        }
        with postgres_errors(self.settings):
            try:
                row = self.conn.execute(QUERIES["start_run"], params).fetchone()
            except psycopg.errors.UniqueViolation:
                running = self.conn.execute(QUERIES["running_full_run"], {"kind": kind}).fetchone()
                raise RunInProgress(kind, running[0] if running else "?") from None
        if row is not None:
            return _run(row), True
        existing = self.get_run(run_id)
        assert existing is not None
        return existing, False

    def mark_run_dispatched(self, run_id: str) -> None:
        with postgres_errors(self.settings):
            self.conn.execute(QUERIES["mark_run_dispatched"], {"id": run_id})

    def stale_runs(self, seconds: int) -> list[str]:
        """Running runs with no sign of life for ``seconds``."""
        with postgres_errors(self.settings):
            rows = self.conn.execute(QUERIES["stale_runs"], {"seconds": seconds}).fetchall()
        return [row[0] for row in rows]

    def set_run_expected(self, run_id: str, expected_sessions: int, kept: int = 0) -> None:
        with postgres_errors(self.settings):
            self.conn.execute(
                QUERIES["set_run_expected"],
                {"id": run_id, "expected_sessions": expected_sessions, "kept": kept},
            )

    def record_results(self, run_id: str, results: Sequence[SessionResult]) -> None:
        if not results:
            return
        params = {
            "snapshot_id": run_id,
            "session_ids": [r.session_id for r in results],
            "statuses": [r.status.value for r in results],
            "messages": [r.messages for r in results],
            "kept": [r.kept for r in results],
            "durations": [r.duration_ms for r in results],
            "errors": [None if r.error is None else _safe_text(r.error) for r in results],
            "shards": [r.shard for r in results],
            "workers": [r.worker for r in results],
            "finished": [r.finished_at for r in results],
            "details": [None if r.details is None else json.dumps(r.details) for r in results],
        }
        with postgres_errors(self.settings):
            self.conn.execute(QUERIES["record_results"], params)

    def finish_run(self, run_id: str, error: str | None = None) -> Run:
        """Complete a running run from its results; a finished run is returned as is."""
        with postgres_errors(self.settings):
            row = self.conn.execute(
                QUERIES["finish_run"],
                {"id": run_id, "error": None if error is None else _safe_text(error)},
            ).fetchone()
        if row is not None:
            return _run(row)
        run = self.get_run(run_id)
        if run is None:
            raise LookupError(f"no run {run_id}")
        return run

    def get_run(self, run_id: str) -> Run | None:
        with postgres_errors(self.settings):
            row = self.conn.execute(QUERIES["get_run"], {"id": run_id}).fetchone()
        return None if row is None else _run(row)

    def list_runs(self, *, limit: int = 20, kind: str | None = None) -> list[Run]:
        with postgres_errors(self.settings):
            rows = self.conn.execute(QUERIES["list_runs"], {"limit": limit, "kind": kind})
            return [_run(row) for row in rows]

    def run_progress(self, run_id: str) -> tuple[int, int, int, int]:
        """(sessions reported, messages, kept, failed) of a run so far."""
        with postgres_errors(self.settings):
            row = self.conn.execute(QUERIES["run_progress"], {"id": run_id}).fetchone()
        assert row is not None
        return int(row[0]), int(row[1]), int(row[2]), int(row[3])

    def run_results(self, run_id: str) -> list[SessionResult]:
        with postgres_errors(self.settings):
            rows = self.conn.execute(QUERIES["run_results"], {"id": run_id}).fetchall()
        return [
            SessionResult(
                session_id=row[0],
                status=SessionStatus(row[1]),
                messages=row[2],
                kept=row[3],
                duration_ms=row[4],
                error=row[5],
                shard=row[6],
                worker=row[7],
                finished_at=row[8],
                details=row[9],
            )
            for row in rows
        ]

    def prune(
        self, *, keep: int | None, before: datetime | None, dry_run: bool = False
    ) -> dict[str, int]:
        """Remove old run records (see queries.sql); counts of what went (or would go)."""
        if keep is None and before is None:
            raise ValueError("prune needs keep or before")
        params = {"keep": keep, "before": before}
        # A dry run does it all and rolls back: the counts are exactly what
        # a real run would remove at this moment.
        with postgres_errors(self.settings), self.conn.transaction(force_rollback=dry_run):
            row = self.conn.execute(QUERIES["prune_runs"], params).fetchone()
            assert row is not None
            with self.conn.cursor() as cur:
                cur.execute(QUERIES["prune_resolved_kept"], params)
                kept = cur.rowcount
            return {
                "runs": int(row[0]),
                "session_results": int(row[1]),
                "resolved_kept_records": kept,
            }


def _run(row: Sequence[Any]) -> Run:
    return Run(
        id=row[0],
        kind=row[1],
        scope=row[2],
        status=RunStatus(row[3]),
        created_at=row[4],
        finished_at=row[5],
        session_count=row[6],
        message_count=row[7],
        kept_count=row[8],
        failed_count=row[9],
        duration_ms=row[10],
        error=row[11],
        forced=row[12],
        expected_sessions=row[13],
        details=row[14] or {},
    )


def preview(raw: bytes) -> str:
    """A readable, text-safe copy of raw bytes (invalid UTF-8 and NUL escaped)."""
    text = _safe_text(raw.decode("utf-8", "backslashreplace"))
    return text if len(text) <= PREVIEW_LIMIT else text[:PREVIEW_LIMIT] + "..."


def _safe_text(text: str) -> str:
    """PostgreSQL text cannot hold NUL (or lone surrogates): escape them."""
    if "\x00" in text:
        text = text.replace("\x00", "\\x00")
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        text = text.encode("utf-8", "backslashreplace").decode("utf-8")
    return text


def _unique_records(records: Iterable[KeptRecord]) -> list[KeptRecord]:
    # One upsert statement batch must not touch the same row twice.
    seen: dict[tuple[str, bytes], KeptRecord] = {}
    for record in records:
        seen[(record.redis_key, hashlib.sha256(record.raw).digest())] = record
    return list(seen.values())
