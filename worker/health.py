"""The deployment's health as `dnd-client status` and the metrics show it.

Read from PostgreSQL alone (:meth:`PostgresStore.status_figures`), so that the
figures go on being right, and the recovery point goes on rising, when every
worker is dead. Whether workers answer is asked of the broker by the caller
(a Celery ping: worker/celery_health.py) and handed in.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from worker.connections import connect_postgres
from worker.lag import LagInputs, recovery_point_s, watcher_alive
from worker.migrate import require_schema
from worker.models import Run, StatusFigures
from worker.pg_store import PostgresStore
from worker.settings import Settings

# The owner lock beat holds while it runs (worker/beat_presence.py).
BEAT_KEY = "beat"


@dataclass(frozen=True, slots=True)
class Workers:
    """Celery workers that answered a ping; ``count`` None when the broker could not be asked."""

    count: int | None
    error: str | None = None


@dataclass(frozen=True, slots=True)
class ShardHealth:
    shard: int
    recovery_point_s: float
    pending_sessions: int
    oldest_change: datetime | None
    continuous_backups: int
    continuous_messages: int


@dataclass(frozen=True, slots=True)
class Health:
    figures: StatusFigures
    settings: Settings
    workers: Workers
    max_lag_s: float
    recovery_point_s: float
    shards: list[ShardHealth]

    @property
    def lag_exceeded(self) -> bool:
        return self.recovery_point_s > self.max_lag_s

    @property
    def pending_sessions(self) -> int:
        return sum(p.sessions for p in self.figures.pending)

    @property
    def watcher_alive(self) -> bool:
        watcher = self.figures.watcher
        return watcher is not None and watcher_alive(self.figures.now, watcher.heartbeat_at)

    @property
    def last_full_backup_age_s(self) -> float | None:
        run = self.figures.last_full_backup
        if run is None or run.finished_at is None:
            return None
        return _age(self.figures.now, run.finished_at)

    def as_dict(self) -> dict[str, Any]:
        """The JSON form (`dnd-client status --output json`); an unbounded lag is null."""
        f = self.figures
        watcher = f.watcher
        return {
            "now": f.now,
            "recovery_point_s": _finite(self.recovery_point_s),
            "max_lag_s": self.max_lag_s,
            "lag_exceeded": self.lag_exceeded,
            "pending_sessions": self.pending_sessions,
            "last_full_backup": _full_backup(f.last_full_backup, f.now),
            "runs_in_progress": [_running(run, f.now) for run in f.running],
            "open_kept_records": f.open_kept_records,
            "workers": {"alive": self.workers.count, "error": self.workers.error},
            "beat": {"alive": f.beat_alive},
            "continuous": {
                "enabled": self.settings.continuous_backup,
                "watcher_alive": self.watcher_alive,
                "watcher": None
                if watcher is None
                else {
                    "node": watcher.node,
                    "started_at": watcher.started_at,
                    "heartbeat_at": watcher.heartbeat_at,
                    "heartbeat_age_s": round(_age(f.now, watcher.heartbeat_at), 3),
                    "notifications": watcher.notifications,
                    "last_sweep_at": watcher.last_sweep_at,
                    "last_sweep_sessions": watcher.last_sweep_sessions,
                    "last_sweep_seconds": watcher.last_sweep_seconds,
                },
            },
            "shards": [
                {
                    "shard": s.shard,
                    "recovery_point_s": _finite(s.recovery_point_s),
                    "pending_sessions": s.pending_sessions,
                    "oldest_change": s.oldest_change,
                    "continuous_backups": s.continuous_backups,
                    "continuous_messages": s.continuous_messages,
                }
                for s in self.shards
            ],
        }


def read_figures(settings: Settings) -> StatusFigures:
    """The figures, on a connection of their own (ServiceUnavailable when PostgreSQL is down)."""
    conn = connect_postgres(settings)
    try:
        pg = PostgresStore(conn, settings)
        require_schema(pg)
        return pg.status_figures(BEAT_KEY)
    finally:
        conn.close()


def assess(
    figures: StatusFigures, settings: Settings, workers: Workers, max_lag_s: float | None = None
) -> Health:
    """The recovery point overall and per shard (worker/lag.py), from the figures."""
    full = figures.last_full_backup
    watcher = figures.watcher

    def lag(oldest: datetime | None) -> float:
        return recovery_point_s(
            LagInputs(
                now=figures.now,
                oldest_change=oldest,
                continuous=settings.continuous_backup,
                heartbeat_at=None if watcher is None else watcher.heartbeat_at,
                last_full_started_at=None if full is None else full.created_at,
            )
        )

    pending = {p.shard: p for p in figures.pending}
    activity = {a.shard: a for a in figures.activity}
    # Every configured shard, and any other a row names (BACKUP_SHARDS changed since).
    numbers = sorted(set(range(settings.backup_shards)) | set(pending) | set(activity))
    shards = []
    for n in numbers:
        p, a = pending.get(n), activity.get(n)
        oldest = None if p is None else p.oldest_change
        shards.append(
            ShardHealth(
                shard=n,
                recovery_point_s=lag(oldest),
                pending_sessions=0 if p is None else p.sessions,
                oldest_change=oldest,
                continuous_backups=0 if a is None else a.backups,
                continuous_messages=0 if a is None else a.messages,
            )
        )
    oldest_all = min((p.oldest_change for p in figures.pending), default=None)
    return Health(
        figures=figures,
        settings=settings,
        workers=workers,
        max_lag_s=settings.continuous_max_lag_s if max_lag_s is None else max_lag_s,
        recovery_point_s=lag(oldest_all),
        shards=shards,
    )


def _age(now: datetime, then: datetime) -> float:
    return max(0.0, (now - then).total_seconds())


def _finite(seconds: float) -> float | None:
    return None if math.isinf(seconds) else round(seconds, 3)


def _full_backup(run: Run | None, now: datetime) -> dict[str, Any] | None:
    if run is None:
        return None
    return {
        "id": run.id,
        "status": run.status.value,
        "started_at": run.created_at,
        "finished_at": run.finished_at,
        "age_s": None if run.finished_at is None else round(_age(now, run.finished_at), 3),
        "sessions": run.session_count,
        "messages": run.message_count,
    }


def _running(run: Run, now: datetime) -> dict[str, Any]:
    return {
        "id": run.id,
        "kind": run.kind,
        "scope": run.scope,
        "started_at": run.created_at,
        "age_s": round(_age(now, run.created_at), 3),
        "sessions": run.expected_sessions,
    }
