"""The PostgreSQL store's history queries (point-in-time restores).

A mixin of :class:`worker.pg_store.PostgresStore`, kept apart so each file reads
in one sitting: what a backup records of each session's history, the state of
sessions as of a moment, the history command's listing, and folding old history
(docs/architecture.md, "History"). Queries are in sql/queries.sql.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any, TypeVar

import psycopg
from psycopg.rows import RowFactory, class_row, dict_row, scalar_row

from worker.connections import postgres_boundary
from worker.models import MessageRow, Session
from worker.settings import Settings
from worker.sql import QUERIES

R = TypeVar("R")


@dataclass(frozen=True, slots=True)
class Capture:
    """What one backup saw of one session, for history_captures."""

    session_id: str
    message_count: int
    max_score: float | None
    hash_changed: bool = False
    added: int = 0
    removed: int = 0
    edited: int = 0
    late: int = 0


@dataclass(frozen=True, slots=True)
class HistoryContext:
    """What a merge needs to record history: the capture's moment and run, the top seen."""

    top: float | None
    at: datetime
    run_id: str | None


@dataclass(frozen=True, slots=True)
class ChunkHistory:
    """What merging one chunk changed, as history saw it."""

    edited: int
    late: int
    returned: int


@postgres_boundary
class HistoryQueries:
    conn: psycopg.Connection[Any]
    settings: Settings

    def _history_rows(
        self, query: str, params: Mapping[str, Any] | None, factory: RowFactory[R]
    ) -> list[R]:
        with self.conn.cursor(row_factory=factory) as cur:
            return cur.execute(QUERIES[query], params).fetchall()

    # -- what a backup records ------------------------------------------------

    def last_captures(self, session_ids: Sequence[str]) -> dict[str, float | None]:
        """Session ID -> the highest score its history saw (no key: never captured)."""
        rows = self._history_rows("last_captures", {"ids": list(session_ids)}, dict_row)
        return {row["session_id"]: row["max_score"] for row in rows}

    def record_captures(
        self,
        captures: Sequence[Capture],
        at: datetime,
        run_id: str | None,
        note: str | None = None,
    ) -> None:
        if not captures:
            return
        params = {
            "at": at,
            "snapshot_id": run_id,
            "note": note,
            "session_ids": [c.session_id for c in captures],
            "message_counts": [c.message_count for c in captures],
            "max_scores": [c.max_score for c in captures],
            "hash_changed": [c.hash_changed for c in captures],
            "added": [c.added for c in captures],
            "removed": [c.removed for c in captures],
            "edited": [c.edited for c in captures],
            "late": [c.late for c in captures],
        }
        self.conn.execute(QUERIES["record_captures"], params)

    def save_session_versions(
        self, session_ids: Sequence[str], at: datetime, run_id: str | None
    ) -> None:
        """Keep the stored rows of these sessions as replaced at ``at``."""
        if session_ids:
            params = {"ids": list(session_ids), "at": at, "snapshot_id": run_id}
            self.conn.execute(QUERIES["save_session_versions"], params)

    def history_merge_chunk(
        self, top: float | None, at: datetime, run_id: str | None
    ) -> ChunkHistory:
        """Record what the staged chunk changes (call before merging it)."""
        params = {"top": top, "at": at, "snapshot_id": run_id}
        [row] = self._history_rows("history_merge_chunk", params, dict_row)
        return ChunkHistory(int(row["edited"]), int(row["late"]), int(row["returned"]))

    def record_late(
        self, session_id: str, message_ids: Sequence[str], at: datetime, run_id: str | None
    ) -> None:
        """Mark messages stored by this capture as late (scored at or below what history saw)."""
        if message_ids:
            params = {"session_id": session_id, "ids": list(message_ids), "at": at,
                      "snapshot_id": run_id}  # fmt: skip
            self.conn.execute(QUERIES["record_late"], params)

    def history_removed(self, session_id: str, at: datetime, run_id: str | None) -> int:
        """Note the session's stored messages its merge did not read (gone from Redis)."""
        params = {"session_id": session_id, "at": at, "snapshot_id": run_id}
        [count] = self._history_rows("history_removed", params, scalar_row)
        return int(count)

    # -- the state as of a moment ---------------------------------------------

    def sessions_as_of(self, session_ids: Sequence[str], at: datetime) -> dict[str, Session]:
        """The sessions that existed at ``at``, as they were then."""
        params = {"ids": list(session_ids), "at": at}
        found = self._history_rows("sessions_as_of", params, class_row(Session))
        return {session.id: session for session in found}

    def session_ids_as_of(self, at: datetime) -> tuple[list[str], int]:
        """(IDs of the sessions live at ``at``, how many were soft-deleted then)."""
        rows = self._history_rows("session_ids_as_of", {"at": at}, dict_row)
        live = [row["id"] for row in rows if not row["deleted"]]
        return live, len(rows) - len(live)

    def stream_members_as_of(
        self, session_ids: Sequence[str], at: datetime
    ) -> Iterator[tuple[str, bytes, int]]:
        """As stream_members, of the messages as they were at ``at``."""
        params = {"ids": list(session_ids), "at": at}
        with (
            self.conn.cursor() as cur,
            cur.copy(QUERIES["restore_members_as_of"], params) as copy,
        ):
            copy.set_types(["text", "bytea", "int8"])
            yield from copy.rows()

    def stream_message_rows_as_of(
        self, session_ids: Sequence[str], at: datetime
    ) -> Iterator[MessageRow]:
        """As stream_message_rows, of the messages as they were at ``at``."""
        params = {"ids": list(session_ids), "at": at}
        with (
            self.conn.cursor() as cur,
            cur.copy(QUERIES["message_rows_as_of"], params) as copy,
        ):
            copy.set_types(["text", "text", "timestamptz", "text", "text", "text", "text"])
            yield from copy.rows()

    def oldest_restorable(self) -> datetime | None:
        """The oldest moment history can restore (None: no history yet)."""
        [oldest] = self._history_rows("oldest_restorable", None, scalar_row)
        return oldest  # type: ignore[no-any-return]

    def run_finished_at(self, run_id: str) -> tuple[bool, datetime | None]:
        """(whether the run exists, when it finished)."""
        found = self._history_rows("run_finished_at", {"id": run_id}, scalar_row)
        return (bool(found), found[0] if found else None)

    # -- the history command, and folding -------------------------------------

    def session_history(self, session_id: str) -> dict[str, list[dict[str, Any]]]:
        """A session's captures, replaced rows and message changes, oldest first."""
        params = {"id": session_id}
        return {
            "captures": self._history_rows("session_captures", params, dict_row),
            "versions": self._history_rows("session_versions", params, dict_row),
            "messages": self._history_rows("session_message_changes", params, dict_row),
        }

    def fold_history(self, before: datetime, *, dry_run: bool = False) -> dict[str, int]:
        """Fold history older than ``before`` into the state at ``before`` (counts)."""
        with self.conn.transaction(force_rollback=dry_run):
            [row] = self._history_rows("fold_history", {"before": before}, dict_row)
        return {name: int(value) for name, value in row.items()}
