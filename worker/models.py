"""Plain dataclasses the stores and the engine speak in.

Messages travel as tuples in ``MESSAGE_COLUMNS`` order rather than as objects:
a backup moves millions of them, and building a dataclass per message would
cost more than writing it to PostgreSQL.
"""

from __future__ import annotations

import enum
from dataclasses import asdict, dataclass, field
from datetime import datetime
from typing import Any, ClassVar, Literal, Self, get_args

# Column order of a message row, used by COPY in and out of client_messages.
MESSAGE_COLUMNS = ("id", "session_id", "created_at", "role", "content", "tool_calls", "player_id")

# (id, session_id, created_at, role, content, tool_calls as JSON text, player_id)
MessageRow = tuple[str, str, datetime, str, str | None, str | None, str | None]

RunKind = Literal["backup", "restore", "verify"]
RUN_KINDS: tuple[RunKind, ...] = get_args(RunKind)
# A run covers every session ("all"), one named session, or a list of them.
RunScope = Literal["all", "session", "list"]


@dataclass(frozen=True, slots=True)
class RunOptions:
    """How a run of one kind works (``--full``, ``--force``, ``--quick``...).

    Given to an engine when it is made, stored in the run's details, and sent
    to the workers as a JSON object (``as_dict`` / ``from_dict``). Each kind of
    run has its own subclass; ``kind`` says which.
    """

    kind: ClassVar[RunKind]

    @property
    def forced(self) -> bool:
        """Whether the run may replace live data (the run record's ``forced``)."""
        return False

    @property
    def moment(self) -> datetime | None:
        """The past moment whose state the run restores or compares (None: the latest)."""
        return None

    # Options of the process that makes the engine, never a task's argument
    # (the published tasks take the others by name: docs/contract.md §3).
    not_task_arguments: ClassVar[tuple[str, ...]] = ()

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)

    def task_arguments(self) -> dict[str, Any]:
        """The options as keyword arguments of the kind's published tasks."""
        return {k: v for k, v in self.as_dict().items() if k not in self.not_task_arguments}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Self:
        return cls(**data)


@dataclass(frozen=True, slots=True)
class BackupOptions(RunOptions):
    kind: ClassVar[RunKind] = "backup"
    # Read every message again (and merge) instead of only what changed.
    full: bool = False


@dataclass(frozen=True, slots=True)
class RestoreOptions(RunOptions):
    kind: ClassVar[RunKind] = "restore"
    # Replace sessions that exist in Redis (otherwise they are skipped).
    force: bool = False
    # Restore the state history holds for this moment (RFC 3339, UTC), not the latest.
    as_of: str | None = None
    # Before replacing a session (force), capture its state into history, so
    # the restore can be undone. Off for drills: their target is not live data.
    keep_replaced: bool = True
    not_task_arguments: ClassVar[tuple[str, ...]] = ("keep_replaced",)

    @property
    def moment(self) -> datetime | None:
        return None if self.as_of is None else datetime.fromisoformat(self.as_of)

    @property
    def forced(self) -> bool:
        return self.force


@dataclass(frozen=True, slots=True)
class VerifyOptions(RunOptions):
    kind: ClassVar[RunKind] = "verify"
    # Compare Redis with the recorded checksums only, where they match.
    quick: bool = False
    # Compare with the state history holds for this moment (RFC 3339, UTC).
    as_of: str | None = None

    @property
    def moment(self) -> datetime | None:
        return None if self.as_of is None else datetime.fromisoformat(self.as_of)


class SessionStatus(enum.StrEnum):
    """What happened to one session in one run."""

    COMPLETED = "completed"  # stored (backup) or written to Redis (restore)
    UNCHANGED = "unchanged"  # backup: nothing changed since the last run
    PARTIAL = "partial"  # done, but some records were kept aside
    SKIPPED = "skipped"  # restore: exists in Redis (no --force) or soft-deleted
    FAILED = "failed"  # an error stopped it; nothing of it was committed
    DIFFERENT = "different"  # verify: Redis and PostgreSQL disagree


class RunStatus(enum.StrEnum):
    RUNNING = "running"
    COMPLETED = "completed"
    PARTIAL = "partial"
    FAILED = "failed"


@dataclass(frozen=True, slots=True)
class Session:
    id: str
    name: str
    creator_id: str
    mcp_server_url: str
    websocket_key: str
    created_at: datetime
    updated_at: datetime
    max_players: int | None = None
    # The settings object as compact JSON text (it goes to a jsonb column).
    settings: str | None = None
    status: str = "active"
    deleted_at: datetime | None = None


@dataclass(frozen=True, slots=True)
class KeptRecord:
    """A record from Redis that could not be stored faithfully, kept raw.

    ``raw`` holds the exact bytes: the set member, the zset member, or, for a
    session hash, a JSON object of its fields (see records.encode_raw_hash).
    """

    kind: Literal["session_id", "session", "message"]
    redis_key: str
    raw: bytes
    reason: str
    session_id: str | None = None
    message_id: str | None = None
    score: float | None = None


@dataclass(frozen=True, slots=True)
class Watermark:
    """What the last backup of a session saw in Redis.

    A later run compares a cheap probe of Redis against it to decide whether to
    read the session at all, and which part of its messages to read.
    """

    session_id: str
    hash_digest: bytes | None
    message_count: int
    max_score: float | None


@dataclass(slots=True)
class SessionResult:
    session_id: str
    status: SessionStatus
    messages: int = 0
    kept: int = 0
    duration_ms: int = 0
    error: str | None = None
    shard: int | None = None
    worker: str | None = None
    finished_at: datetime | None = None
    # Kind-specific detail (a backup's checksum, what a verify found).
    details: dict[str, Any] | None = None

    def as_dict(self) -> dict[str, Any]:
        """A JSON-able dict (the Celery task result of docs/contract.md §3)."""
        data = asdict(self)
        data["status"] = self.status.value
        data["finished_at"] = self.finished_at.isoformat() if self.finished_at else None
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> SessionResult:
        finished = data.get("finished_at")
        return cls(
            session_id=data["session_id"],
            status=SessionStatus(data["status"]),
            messages=int(data.get("messages", 0)),
            kept=int(data.get("kept", 0)),
            duration_ms=int(data.get("duration_ms", 0)),
            error=data.get("error"),
            shard=data.get("shard"),
            worker=data.get("worker"),
            finished_at=datetime.fromisoformat(finished) if finished else None,
            details=data.get("details"),
        )

    @classmethod
    def from_row(cls, *, status: str, **columns: Any) -> SessionResult:
        """From a persistence_session_results row, by column name."""
        return cls(status=SessionStatus(status), **columns)


@dataclass(frozen=True, slots=True)
class Run:
    """One backup, restore or verify run: a row of persistence_snapshots."""

    id: str
    kind: str
    scope: str
    status: RunStatus
    created_at: datetime
    finished_at: datetime | None
    session_count: int
    message_count: int
    kept_count: int
    failed_count: int
    duration_ms: int | None
    error: str | None
    forced: bool = False
    expected_sessions: int | None = None
    details: dict[str, Any] = field(default_factory=dict)
    # A restore or verify of the state at a past moment: that moment.
    as_of: datetime | None = None

    @classmethod
    def from_row(cls, *, status: str, details: dict[str, Any] | None, **columns: Any) -> Run:
        """From a persistence_snapshots row, by column name."""
        return cls(status=RunStatus(status), details=details or {}, **columns)

    @property
    def done(self) -> bool:
        return self.status is not RunStatus.RUNNING

    def as_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["status"] = self.status.value
        data["created_at"] = self.created_at.isoformat()
        data["finished_at"] = self.finished_at.isoformat() if self.finished_at else None
        data["as_of"] = self.as_of.isoformat() if self.as_of else None
        return data


@dataclass(frozen=True, slots=True)
class RunBatch:
    """A batch of a run on the workers, as recorded when it was handed out.

    A batch is done when each of its sessions has a result in the run; until
    then its record says when its task was sent, when a worker last began it
    and whether a retry is due, which is how a lost batch is told from a slow
    one (worker/supervise.py).
    """

    run_id: str
    batch_no: int
    shard: int
    session_ids: list[str]
    dispatched_at: datetime
    dispatches: int
    started_at: datetime | None
    starts: int
    retry_at: datetime | None
    last_error: str | None


@dataclass(slots=True)
class RunTotals:
    """Running totals of a run, as shown in the closing summary."""

    sessions: int = 0
    messages: int = 0
    kept: int = 0
    failed: int = 0
    skipped: int = 0
    unchanged: int = 0

    def add(self, result: SessionResult) -> None:
        self.sessions += 1
        self.messages += result.messages
        self.kept += result.kept
        if result.status in (SessionStatus.FAILED, SessionStatus.DIFFERENT):
            self.failed += 1
        elif result.status is SessionStatus.SKIPPED:
            self.skipped += 1
        elif result.status is SessionStatus.UNCHANGED:
            self.unchanged += 1

    def add_kept(self, count: int) -> None:
        """Records kept aside that belong to no session result (bad set members)."""
        self.kept += count

    @property
    def status(self) -> RunStatus:
        if self.failed:
            return RunStatus.FAILED
        if self.kept:
            return RunStatus.PARTIAL
        return RunStatus.COMPLETED


# -- what `dnd-client status` and the metrics read --------------------------------


@dataclass(frozen=True, slots=True)
class ShardPending:
    """Sessions of one shard changed in Redis and not yet backed up (continuous_pending)."""

    shard: int
    sessions: int
    oldest_change: datetime


@dataclass(frozen=True, slots=True)
class WatcherState:
    """The continuous watcher's row (continuous_watcher): who watches, and how lately."""

    node: str
    started_at: datetime
    heartbeat_at: datetime
    # Keyspace notifications: 'on', 'enabled' (the watcher set them), 'off' (refused).
    notifications: str
    last_sweep_at: datetime | None
    last_sweep_sessions: int | None
    last_sweep_seconds: float | None


@dataclass(frozen=True, slots=True)
class ShardActivity:
    """What continuous backups of one shard did, summed over continuous_activity."""

    shard: int
    backups: int
    sessions: int
    messages: int
    kept_records: int
    failures: int


@dataclass(frozen=True, slots=True)
class RunCount:
    """How many runs of a kind are recorded with a status."""

    kind: str
    status: str
    runs: int


@dataclass(frozen=True, slots=True)
class StatusFigures:
    """Everything PostgreSQL knows about the deployment's health, read at one moment."""

    now: datetime
    pending: list[ShardPending]
    watcher: WatcherState | None
    activity: list[ShardActivity]
    run_counts: list[RunCount]
    running: list[Run]
    last_full_backup: Run | None
    open_kept_records: int
    # Whether beat holds its presence lock (worker/beat_presence.py).
    beat_alive: bool
