"""The PostgreSQL store: the only code that runs SQL.

It takes one connection (autocommit; transactions are explicit) and speaks in
the dataclasses of :mod:`worker.models`, built from rows by column name (see
:class:`Rows`). Every psycopg error leaves it as one of :mod:`worker.errors`:
both classes are wrapped whole by :func:`worker.connections.postgres_boundary`.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import uuid
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, fields
from datetime import datetime
from typing import Any, Generic, TypeVar, cast

import psycopg
import psycopg.errors
from psycopg.rows import RowFactory, class_row, dict_row, kwargs_row, scalar_row

from worker.checksums import MessageChecksum
from worker.connections import (
    postgres_boundary,
    postgres_error,
    postgres_reason,
    translates_own_errors,
)
from worker.errors import MessageConflict, RunInProgress
from worker.models import (
    KeptRecord,
    MessageRow,
    Run,
    RunBatch,
    RunCount,
    Session,
    SessionResult,
    ShardActivity,
    ShardPending,
    StatusFigures,
    WatcherState,
    Watermark,
)
from worker.pg_history import ChunkHistory, HistoryContext, HistoryQueries
from worker.settings import Settings
from worker.sql import QUERIES

PREVIEW_LIMIT = 2000

R = TypeVar("R")
Params = Mapping[str, Any] | None


@dataclass(frozen=True, slots=True)
class Rows(Generic[R]):
    """A query whose rows become ``cls`` objects, built by column name.

    The query names its columns after the fields of ``cls`` (aliases where a
    column is cast); a column that needs converting goes through
    ``cls.from_row`` when the class has one. tests/integration/test_row_names.py
    checks every ``Rows`` of this module against its query.
    """

    query: str
    cls: type[R]

    def factory(self) -> RowFactory[R]:
        from_row = getattr(self.cls, "from_row", None)
        return class_row(self.cls) if from_row is None else kwargs_row(from_row)


WATERMARKS = Rows("watermarks", Watermark)
SESSIONS = Rows("sessions", Session)
STARTED_RUN = Rows("start_run", Run)
FINISHED_RUN = Rows("finish_run", Run)
RUN = Rows("get_run", Run)
RUNS = Rows("list_runs", Run)
RUN_RESULTS = Rows("run_results", SessionResult)
RUNNING_RUNS = Rows("running_runs", Run)
BATCH = Rows("batch", RunBatch)
UNFINISHED_BATCHES = Rows("unfinished_batches", RunBatch)
PENDING = Rows("status_pending", ShardPending)
WATCHER = Rows("status_watcher", WatcherState)
ACTIVITY = Rows("status_activity", ShardActivity)
RUN_COUNTS = Rows("status_run_counts", RunCount)
LAST_FULL_BACKUP = Rows("last_full_backup", Run)

# The class of every owner lock (pg_advisory_lock's first key): "dnd" + 1.
OWNER_LOCK_CLASS = 1684956268


@dataclass(frozen=True, slots=True)
class MergeOutcome:
    """What merging one chunk of a session's messages did."""

    stored: int
    # message ID -> why it was not merged ("duplicate", or the owning session's ID)
    rejected: dict[str, str]
    # What history recorded of the chunk (None: history not recorded).
    history: ChunkHistory | None = None


@postgres_boundary
class MessageCopy:
    """A COPY of message rows straight into client_messages.

    The fast path: used only for messages that cannot be in the table yet (a
    session never backed up, or messages newer than everything backed up). If
    one is there after all, PostgreSQL raises a unique violation and the caller
    retries through the merge path.

    ``pause()`` ends the current COPY so that other statements can run on the
    connection; the next ``write`` starts a new one, in the same transaction.
    """

    def __init__(self, conn: psycopg.Connection[Any], settings: Settings) -> None:
        self._conn = conn
        self.settings = settings
        self._stack: contextlib.ExitStack | None = None
        self._copy: psycopg.Copy | None = None
        self.rows = 0

    @translates_own_errors  # once per message: the boundary's wrapper would show
    def write(self, row: MessageRow) -> None:
        try:
            if self._copy is None:
                self._copy = self._open()
            self._copy.write_row(row)
        except psycopg.errors.UniqueViolation as exc:
            self.abort(exc)
            raise self._conflict(exc) from exc
        except psycopg.Error as exc:
            self.abort(exc)
            raise postgres_error(exc, self.settings) from exc
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
                raise self._conflict(exc) from exc

    def _conflict(self, exc: psycopg.errors.UniqueViolation) -> MessageConflict:
        # The primary message only: the DETAIL names the message ID, and the
        # CONTEXT quotes the COPY line.
        return MessageConflict(f"PostgreSQL: {postgres_reason(exc, self.settings)}")

    def abort(self, exc: BaseException) -> None:
        """End the COPY in progress after an error, telling the server it failed."""
        if self._stack is not None:
            stack, self._stack, self._copy = self._stack, None, None
            with contextlib.suppress(Exception):
                stack.__exit__(type(exc), exc, exc.__traceback__)


@postgres_boundary
class VerifyStaging:
    """One session's sides, staged for the comparison (verify_compare in sql/queries.sql).

    Made by PostgresStore.verify_staging. ``add`` stages Redis's side, the
    digests the caller computes page by page, through one COPY.

    ``with_backup`` (for a big session) also stages the backup's side into
    verify_stored, at once: ``start`` sends, in pipeline mode and without
    waiting, the statements that empty the scratch tables and copy the
    backup's messages there with their fingerprints, which PostgreSQL computes
    while the caller reads and digests Redis's members (in another process,
    on another core). Meanwhile ``add`` holds the rows it is given, up to
    HOLD_WHILE_STAGING of them, rather than wait for those statements: the
    two sides take about as long per message (a 10,000-message session: 39
    ms of PostgreSQL staging against 44 ms of digesting), so waiting after
    the first page left the worker idle for most of PostgreSQL's part.
    A small session is compared with the backup straight from its table
    instead: the extra statements would cost more than they hide.
    """

    # Rows held while the backup's side is staged: about 190 bytes each beside
    # the message ID (a tuple, a 16-byte digest, a 32-byte fingerprint), so at
    # most about 4 MB; a 10,000-message session is held whole.
    HOLD_WHILE_STAGING = 20_000

    def __init__(self, conn: psycopg.Connection[Any], settings: Settings) -> None:
        self._conn = conn
        self.settings = settings
        self._stack = contextlib.ExitStack()
        self._copy: psycopg.Copy | None = None
        # Whether start() sent the backup's staging, not yet waited for.
        self._staging_backup = False
        self._held: list[tuple[str, int, bytes, bytes | None]] = []

    def start(self, session_id: str, moment: datetime | None, *, with_backup: bool) -> None:
        if not with_backup:
            self._conn.execute(QUERIES["clear_verify_redis"])
            return
        self._stack.enter_context(self._conn.pipeline())
        self._conn.execute(QUERIES["clear_verify_redis"])
        self._conn.execute(QUERIES["clear_verify_stored"])
        params = {"id": session_id, "at": moment}
        self._conn.execute(QUERIES["stage_verify_stored"], params)
        self._staging_backup = True

    def add(self, rows: Sequence[tuple[str, int, bytes, bytes | None]]) -> None:
        """Stage (message ID, place in Redis, digest, fingerprint) rows of Redis's side.

        Held while the backup's side is being staged (see the class), then
        sent with the rest. The message IDs are UUIDs (parse_message checked
        them) and the rest is numbers and hex: one block of COPY text per call.
        """
        if self._staging_backup and len(self._held) + len(rows) <= self.HOLD_WHILE_STAGING:
            self._held.extend(rows)
            return
        if self._held:
            rows, self._held = [*self._held, *rows], []
        if not rows:
            return
        lines = []
        for message_id, ordinal, digest, fingerprint in rows:
            # COPY text: "\\x" is bytea's hex form behind COPY's escaping, "\N" NULL.
            printed = "\\N" if fingerprint is None else "\\\\x" + fingerprint.hex()
            lines.append(f"{message_id}\t{ordinal}\t\\\\x{digest.hex()}\t{printed}\n")
        if self._copy is None:
            self._stack.close()  # the pipeline, if any: wait for what start() sent
            self._staging_backup = False
            cursor = self._stack.enter_context(self._conn.cursor())
            self._copy = self._stack.enter_context(cursor.copy(QUERIES["copy_verify_redis"]))
        self._copy.write("".join(lines))

    def finish(self) -> None:
        """Send what is held, end the pipeline or the COPY: all staged has reached the server."""
        if self._held:
            self._staging_backup = False
            self.add([])
        self._copy = None
        self._stack.close()

    def abort(self, exc: BaseException) -> None:
        """End the pipeline or the COPY after an error (a COPY is told it failed)."""
        self._copy = None
        self._held = []
        with contextlib.suppress(Exception):
            self._stack.__exit__(type(exc), exc, exc.__traceback__)


@postgres_boundary
class PostgresStore(HistoryQueries):
    def __init__(self, conn: psycopg.Connection[Any], settings: Settings) -> None:
        self.conn = conn
        self.settings = settings
        self._merge_tables_ready = False
        self._verify_table_ready = False

    # -- plumbing -----------------------------------------------------------

    @contextlib.contextmanager
    def transaction(self, *, read_only: bool = False) -> Iterator[None]:
        try:
            with self.conn.transaction():
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
        self.conn.execute("SELECT 1")

    def migration_applied(self, migration_id: str) -> bool:
        """Whether yoyo applied this migration (SchemaNotReady when none ever was)."""
        [applied] = self._rows("migration_applied", {"id": migration_id}, scalar_row)
        return bool(applied)

    def _fetch(self, rows: Rows[R], params: Params) -> list[R]:
        return self._rows(rows.query, params, rows.factory())

    def _fetch_one(self, rows: Rows[R], params: Params) -> R | None:
        found = self._fetch(rows, params)
        return found[0] if found else None

    def _rows(self, query: str, params: Params, row_factory: RowFactory[R]) -> list[R]:
        with self.conn.cursor(row_factory=row_factory) as cur:
            return cur.execute(QUERIES[query], params).fetchall()

    def _execute(self, query: str, params: Params) -> None:
        self.conn.execute(QUERIES[query], params)

    def _execute_many(self, query: str, params: Sequence[Mapping[str, Any]]) -> None:
        if params:
            with self.conn.cursor() as cur:
                cur.executemany(QUERIES[query], params)

    # -- backup -------------------------------------------------------------

    def lock_sessions(self, session_ids: Sequence[str]) -> None:
        """Take the per-session locks for the current transaction (see queries.sql)."""
        self._execute("lock_sessions", {"ids": list(session_ids)})

    def prefer_indexes(self) -> None:
        """For the current transaction: look rows up by index (see queries.sql)."""
        self._execute("prefer_indexes", None)

    def watermarks(self, session_ids: Sequence[str]) -> dict[str, Watermark]:
        marks = self._fetch(WATERMARKS, {"ids": list(session_ids)})
        return {mark.session_id: mark for mark in marks}

    def upsert_sessions(self, sessions: Sequence[Session]) -> None:
        # The query's parameters are named after Session's fields.
        self._execute_many("upsert_session", [_params(s) for s in sessions])

    def message_copy(self) -> MessageCopy:
        return MessageCopy(self.conn, self.settings)

    def begin_merge(self) -> None:
        """Prepare to merge one session's messages (call once per session)."""
        if not self._merge_tables_ready:
            self._execute("create_merge_tables", None)
            self._merge_tables_ready = True
        self._execute("reset_merge_seen", None)

    def merge_chunk(
        self, rows: Sequence[MessageRow], history: HistoryContext | None = None
    ) -> MergeOutcome:
        """Merge rows of one session: insert new, update edited, reject conflicts.

        The slow, safe path: staged with COPY, then merged with one INSERT ...
        ON CONFLICT. Duplicate IDs inside ``rows`` must have been removed by the
        caller; duplicates of earlier chunks of the same session (since
        ``begin_merge``) and IDs owned by another session come back as rejected.
        """
        if not rows:
            return MergeOutcome(0, {})
        with self.conn.cursor(row_factory=dict_row) as cur:
            with cur.copy(QUERIES["copy_merge_staging"]) as copy:
                for row in rows:
                    copy.write_row(row)
            rejected = _rejects(cur.execute(QUERIES["merge_rejects"]))
            if rejected:
                cur.execute(QUERIES["drop_merge_rejects"], {"ids": list(rejected)})
            changes = None
            if history is not None:
                changes = self.history_merge_chunk(history.top, history.at, history.run_id)
            cur.execute(QUERIES["merge_messages"])
            stored = cur.rowcount
            # Another session's backup may have committed one of these IDs after
            # merge_rejects looked; ON CONFLICT then skipped the row: reject it too.
            rejected.update(_rejects(cur.execute(QUERIES["merge_late_rejects"])))
            cur.execute(QUERIES["clear_merge_staging"])
        return MergeOutcome(stored, rejected, changes)

    def save_watermarks(self, watermarks: Sequence[Watermark], run_id: str | None) -> None:
        self._execute_many("save_watermark", [_params(w, snapshot_id=run_id) for w in watermarks])

    def keep_records(self, records: Sequence[KeptRecord], run_id: str | None) -> None:
        """Store bad records (upserted: a record seen again updates its row)."""
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
        self._execute_many("keep_record", params)

    def kept_records(
        self, *, limit: int = 50, include_resolved: bool = False, run_id: str | None = None
    ) -> list[dict[str, Any]]:
        params = {"limit": limit, "include_resolved": include_resolved, "snapshot_id": run_id}
        return self._rows("list_kept_records", params, dict_row)

    def kept_record(self, record_id: int) -> dict[str, Any] | None:
        """One kept record, with its raw bytes."""
        found = self._rows("get_kept_record", {"id": record_id}, dict_row)
        return found[0] if found else None

    def resolve_kept_records(self, ids: Sequence[int]) -> int:
        with self.conn.cursor() as cur:
            cur.execute(QUERIES["resolve_kept_records"], {"ids": list(ids)})
            return cur.rowcount

    # -- checksums ----------------------------------------------------------

    def checksums(self, session_ids: Sequence[str]) -> dict[str, tuple[MessageChecksum, bytes]]:
        """Recorded checksums: session ID -> (message checksum, session digest)."""
        rows = self._rows("checksums", {"ids": list(session_ids)}, dict_row)
        return {
            row["session_id"]: (
                MessageChecksum.from_stored(row["message_count"], row["messages_digest"]),
                bytes(row["session_digest"]),
            )
            for row in rows
        }

    def save_checksums(
        self, checksums: Sequence[tuple[str, MessageChecksum, bytes]], run_id: str | None
    ) -> None:
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
        self._execute_many("save_checksum", params)

    def stream_message_rows(self, session_ids: Sequence[str]) -> Iterator[MessageRow]:
        """Every stored message of the sessions, as rows (COPY: flat memory, no order)."""
        with (
            self.conn.cursor() as cur,
            cur.copy(QUERIES["message_rows"], {"ids": list(session_ids)}) as copy,
        ):
            copy.set_types(["text", "text", "timestamptz", "text", "text", "text", "text"])
            yield from copy.rows()

    # -- verify -------------------------------------------------------------

    def prepare_verify(self) -> None:
        """Create verify's scratch table, once per connection.

        In a transaction of its own: verify's is read-only, and a read-only
        transaction may write a temporary table but not create one.
        """
        if not self._verify_table_ready:
            with self.conn.transaction():
                self._execute("create_verify_tables", None)
            self._verify_table_ready = True

    @contextlib.contextmanager
    def verify_staging(
        self, session_id: str, moment: datetime | None, *, with_backup: bool
    ) -> Iterator[VerifyStaging]:
        """Stage one session for ``compare_staged``; see VerifyStaging.

        ``with_backup``: also stage the backup's messages (as of ``moment``),
        which PostgreSQL does while the caller reads Redis.
        """
        staging = VerifyStaging(self.conn, self.settings)
        staging.start(session_id, moment, with_backup=with_backup)
        try:
            yield staging
        except BaseException as exc:
            staging.abort(exc)
            raise
        staging.finish()

    def staged_duplicates(self) -> list[tuple[str, bytes]]:
        """Staged members whose ID an earlier member already had: (ID, digest)."""
        with self.conn.cursor() as cur:
            found = cur.execute(QUERIES["verify_redis_duplicates"]).fetchall()
        return [(str(message_id), bytes(digest)) for message_id, digest in found]

    def compare_staged(
        self, session_id: str, moment: datetime | None, *, backup_staged: bool
    ) -> Iterator[tuple[str | None, bytes | None, MessageRow | None]]:
        """The staged Redis digests beside the stored messages, paired by ID (streamed).

        ``moment``: beside the messages as history holds them at that moment.
        ``backup_staged``: as verify_staging staged them (``with_backup``).
        Pairs whose fingerprints are equal are left out (see verify_compare).
        """
        params = {"id": session_id, "at": moment, "staged": backup_staged}
        with self.conn.cursor() as cur, cur.copy(QUERIES["verify_compare"], params) as copy:
            copy.set_types(
                ["text", "bytea", "text", "text", "timestamptz", "text", "text", "text", "text"]
            )
            for record in copy.rows():
                redis_id, digest, *stored = record
                row = None if stored[0] is None else cast(MessageRow, tuple(stored))
                yield redis_id, None if digest is None else bytes(digest), row

    # -- restore ------------------------------------------------------------

    def sessions(self, session_ids: Sequence[str]) -> dict[str, Session]:
        found = self._fetch(SESSIONS, {"ids": list(session_ids)})
        return {session.id: session for session in found}

    def live_session_ids(self, page_size: int = 5000) -> Iterator[list[str]]:
        """IDs of the sessions a restore may bring back, in pages, in ID order."""
        after: str | None = None
        while True:
            page: list[str] = self._rows(
                "live_session_ids_page", {"after": after, "limit": page_size}, scalar_row
            )
            if not page:
                return
            yield page
            after = page[-1]

    def count_soft_deleted(self) -> int:
        """Sessions in PostgreSQL that are soft-deleted (restores never bring them back)."""
        [count] = self._rows("count_soft_deleted", None, scalar_row)
        return int(count)

    def message_counts(self, session_ids: Sequence[str]) -> dict[str, int]:
        rows = self._rows("message_counts", {"ids": list(session_ids)}, dict_row)
        return {row["session_id"]: int(row["messages"]) for row in rows}

    def stream_members(self, session_ids: Sequence[str]) -> Iterator[tuple[str, bytes, int]]:
        """(session ID, zset member, score) for every message of the sessions.

        Streamed with COPY: memory stays flat whatever the sessions' size. The
        order is not defined (grouping would cost PostgreSQL a sort).
        """
        with (
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
        as_of: datetime | None = None,
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
            as_of=as_of,
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
        as_of: datetime | None = None,
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
            "as_of": as_of,
        }
        try:
            # A savepoint when inside a transaction: the violation undoes the
            # INSERT only, and the caller's transaction goes on.
            with self.conn.transaction():
                run = self._fetch_one(STARTED_RUN, params)
        except psycopg.errors.UniqueViolation:
            running = self._rows("running_full_run", {"kind": kind}, scalar_row)
            raise RunInProgress(kind, running[0] if running else "?") from None
        if run is not None:
            return run, True
        existing = self.get_run(run_id)
        assert existing is not None
        return existing, False

    def mark_run_dispatched(self, run_id: str) -> None:
        self._execute("mark_run_dispatched", {"id": run_id})

    def stale_runs(self, seconds: int) -> list[str]:
        """Running runs with no sign of life for ``seconds``."""
        return self._rows("stale_runs", {"seconds": seconds}, scalar_row)

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
        self._execute("record_results", params)

    def finish_run(self, run_id: str, error: str | None = None) -> Run:
        """Complete a running run from its results; a finished run is returned as is."""
        params = {"id": run_id, "error": None if error is None else _safe_text(error)}
        run = self._fetch_one(FINISHED_RUN, params) or self.get_run(run_id)
        if run is None:
            raise LookupError(f"no run {run_id}")
        return run

    def get_run(self, run_id: str) -> Run | None:
        return self._fetch_one(RUN, {"id": run_id})

    def list_runs(self, *, limit: int = 20, kind: str | None = None) -> list[Run]:
        return self._fetch(RUNS, {"limit": limit, "kind": kind})

    def run_progress(self, run_id: str) -> tuple[int, int, int, int]:
        """(sessions reported, messages, kept, failed) of a run so far."""
        [row] = self._rows("run_progress", {"id": run_id}, dict_row)
        return int(row["sessions"]), int(row["messages"]), int(row["kept"]), int(row["failed"])

    def run_results(self, run_id: str) -> list[SessionResult]:
        return self._fetch(RUN_RESULTS, {"id": run_id})

    def reported_sessions(self, run_id: str) -> int:
        """How many sessions of the run have a result."""
        [count] = self._rows("reported_sessions", {"id": run_id}, scalar_row)
        return int(count)

    def running_runs(self) -> list[Run]:
        return self._fetch(RUNNING_RUNS, None)

    # -- owners: who drives a run, or works on a batch of it ----------------

    def try_owner_lock(self, key: str) -> bool:
        """Take the owner lock ``key`` on this connection, unless someone holds it."""
        params = {"class": OWNER_LOCK_CLASS, "key": key}
        [locked] = self._rows("try_owner_lock", params, scalar_row)
        return bool(locked)

    def release_owner_lock(self, key: str) -> None:
        self._execute("release_owner_lock", {"class": OWNER_LOCK_CLASS, "key": key})

    def live_owners(self, keys: Sequence[str]) -> set[str]:
        """The keys whose owner lock is held now, by any connection."""
        if not keys:
            return set()
        params = {"class": OWNER_LOCK_CLASS, "keys": list(keys)}
        return set(self._rows("live_owners", params, scalar_row))

    # -- status: what `dnd-client status` and the metrics show ---------------

    def status_figures(self, beat_key: str) -> StatusFigures:
        """The deployment's figures, in one read-only transaction (one snapshot).

        ``beat_key``: the owner lock beat holds while it runs.
        """
        with self.transaction(read_only=True):
            self.conn.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ")
            [now] = self._rows("status_now", None, scalar_row)
            [open_kept] = self._rows("open_kept_records", None, scalar_row)
            return StatusFigures(
                now=now,
                pending=self._fetch(PENDING, None),
                watcher=self._fetch_one(WATCHER, None),
                activity=self._fetch(ACTIVITY, None),
                run_counts=self._fetch(RUN_COUNTS, None),
                running=self.running_runs(),
                last_full_backup=self._fetch_one(LAST_FULL_BACKUP, None),
                open_kept_records=int(open_kept),
                beat_alive=bool(self.live_owners([beat_key])),
            )

    # -- continuous protection (worker/watch.py, worker/continuous.py) -------

    def mark_pending(
        self, changes: Mapping[str, tuple[int, datetime]], pause_s: float = 0.0
    ) -> None:
        """Sessions seen changed (ID -> (shard, when)): pending until backed up.

        One backed up less than ``pause_s`` ago waits for the rest of the pause.
        """
        if not changes:
            return
        ids = sorted(changes)
        params = {
            "pause": pause_s,
            "ids": ids,
            "shards": [changes[sid][0] for sid in ids],
            "times": [changes[sid][1] for sid in ids],
        }
        with self._relaxed():
            self._execute("mark_pending", params)

    @contextlib.contextmanager
    def _relaxed(self) -> Iterator[None]:
        """A transaction whose commit does not wait for the disk (see queries.sql)."""
        with self.conn.transaction():
            self._execute("relaxed_commit", None)
            yield

    def drainable_shards(self) -> list[int]:
        """Shards with pending sessions a drain could take now."""
        return self._rows("drainable_shards", {"class": OWNER_LOCK_CLASS}, scalar_row)

    def claim_pending(self, shard: int, token: str, limit: int) -> list[str]:
        """Take up to ``limit`` pending sessions of ``shard`` for the drain ``token``.

        The drain must hold the owner lock ``token`` (try_owner_lock): a claim
        whose owner lock is gone can be taken by another drain.
        """
        params = {"shard": shard, "token": token, "limit": limit, "class": OWNER_LOCK_CLASS}
        with self._relaxed():
            return sorted(self._rows("claim_pending", params, scalar_row))

    def release_done(self, token: str, session_ids: Sequence[str], pause_s: float) -> None:
        """Backed up: done, or pending again (after ``pause_s``) if changed meanwhile."""
        if not session_ids:
            return
        params = {"token": token, "ids": sorted(session_ids), "pause": pause_s}
        with self._relaxed():
            self._execute("lock_claimed", params)
            self._execute("release_done", params)
            self._execute("release_changed_again", params)

    def release_failed(
        self, token: str, session_ids: Sequence[str], *, failed: bool, backoff_s: float
    ) -> None:
        """Not backed up: pending still; ``failed`` counts a failure and backs off."""
        if not session_ids:
            return
        params = {
            "token": token,
            "ids": sorted(session_ids),
            "failed": int(failed),
            "backoff": backoff_s,
        }
        with self._relaxed():
            self._execute("lock_claimed", params)
            self._execute("release_failed", params)

    def add_activity(
        self, shard: int, *, sessions: int, messages: int, kept: int, failures: int
    ) -> None:
        """Count one continuous backup in this minute's row of its shard."""
        params = {
            "shard": shard,
            "backups": 1,
            "sessions": sessions,
            "messages": messages,
            "kept": kept,
            "failures": failures,
        }
        with self._relaxed():
            self._execute("add_activity", params)

    def watcher_heartbeat(self, node: str, started_at: datetime, notifications: str) -> None:
        params = {"node": node, "started_at": started_at, "notifications": notifications}
        with self._relaxed():
            self._execute("watcher_heartbeat", params)

    def watcher_swept(self, node: str, sessions: int, seconds: float) -> None:
        self._execute("watcher_swept", {"node": node, "sessions": sessions, "seconds": seconds})

    # -- batches of runs on the workers --------------------------------------

    def save_batches(self, run_id: str, batches: Iterable[tuple[int, int, Sequence[str]]]) -> None:
        """Record (batch number, shard, session IDs) of each batch of a run."""
        with self.conn.cursor() as cur, cur.copy(QUERIES["copy_batches"]) as copy:
            for batch_no, shard, session_ids in batches:
                copy.write_row((run_id, batch_no, shard, list(session_ids)))

    def batch(self, run_id: str, batch_no: int) -> RunBatch | None:
        return self._fetch_one(BATCH, {"id": run_id, "batch_no": batch_no})

    def begin_batch(self, run_id: str, batch_no: int) -> list[str]:
        """Note that a worker began the batch; the sessions it still has to do."""
        params = {"id": run_id, "batch_no": batch_no}
        return self._rows("begin_batch", params, scalar_row)

    def batch_retry_at(self, run_id: str, batch_no: int, at: datetime, error: str) -> None:
        params = {"id": run_id, "batch_no": batch_no, "retry_at": at, "error": _safe_text(error)}
        self._execute("batch_retry_at", params)

    def unfinished_batches(self, run_id: str) -> list[RunBatch]:
        return self._fetch(UNFINISHED_BATCHES, {"id": run_id})

    def sessions_without_result(self, run_id: str, session_ids: Sequence[str]) -> list[str]:
        params = {"id": run_id, "ids": list(session_ids)}
        return self._rows("sessions_without_result", params, scalar_row)

    def batch_redispatched(self, run_id: str, batch_no: int) -> None:
        self._execute("batch_redispatched", {"id": run_id, "batch_no": batch_no})

    def prune(
        self, *, keep: int | None, before: datetime | None, dry_run: bool = False
    ) -> dict[str, int]:
        """Remove old run records (see queries.sql); counts of what went (or would go)."""
        if keep is None and before is None:
            raise ValueError("prune needs keep or before")
        params = {"keep": keep, "before": before}
        # A dry run does it all and rolls back: the counts are exactly what
        # a real run would remove at this moment.
        with self.conn.transaction(force_rollback=dry_run):
            [runs] = self._rows("prune_runs", params, dict_row)
            with self.conn.cursor() as cur:
                cur.execute(QUERIES["prune_resolved_kept"], params)
                kept = cur.rowcount
            return {
                "runs": int(runs["runs"]),
                "session_results": int(runs["session_results"]),
                "resolved_kept_records": kept,
            }


def _params(row: Any, **extra: Any) -> dict[str, Any]:
    """A dataclass's fields as query parameters of the same names, plus ``extra``."""
    return {**{f.name: getattr(row, f.name) for f in fields(row)}, **extra}


def _rejects(cur: psycopg.Cursor[dict[str, Any]]) -> dict[str, str]:
    """Rejected rows of the merge path: message ID -> why (see MergeOutcome)."""
    return {row["message_id"]: row["reason"] for row in cur}


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
