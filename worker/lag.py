"""The recovery point: how old the oldest change in Redis not yet in PostgreSQL can be.

A bottom module (standard library only): the status command, the metrics and
the continuous watcher (which writes the heartbeat these figures read) share
the constants and the arithmetic.

The figures come from PostgreSQL alone (continuous_pending, continuous_watcher,
persistence_snapshots), so they can be computed by any process, workers dead
or alive:

- the watcher notes each changed session in continuous_pending with the time
  it first saw it changed; the drains remove it once it is backed up. The
  recovery point is ``now - min(changed_at)``, 0 when nothing is pending;
- the watcher is *stale* when its heartbeat is older than
  :data:`WATCHER_STALE_AFTER_S`: nobody looks at Redis since then, so a change
  made just after its last heartbeat may be unseen. The recovery point is then
  at least ``now - heartbeat_at``: it keeps rising while every worker is dead;
- with continuous backups on and no watcher row at all (never started), or
  with continuous backups off (``CONTINUOUS_BACKUP=0``), what is known is the
  last completed full backup: a change made after it started may be anywhere.
  The recovery point is then at least ``now -`` its start, and unbounded
  (``math.inf``) when there has never been one.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from datetime import datetime

# How often the active watcher writes continuous_watcher.heartbeat_at.
WATCHER_HEARTBEAT_S = 5.0
# A heartbeat older than this: the watcher is gone (three beats missed).
WATCHER_STALE_AFTER_S = 3 * WATCHER_HEARTBEAT_S


@dataclass(frozen=True, slots=True)
class LagInputs:
    """What the recovery point of the deployment (or of one shard) is computed from."""

    now: datetime
    # The oldest changed_at among the pending sessions (of the shard); None: none pending.
    oldest_change: datetime | None
    continuous: bool
    # The watcher's last heartbeat; None: there is no continuous_watcher row.
    heartbeat_at: datetime | None
    # When the last completed full backup started; None: there never was one.
    last_full_started_at: datetime | None


def watcher_alive(now: datetime, heartbeat_at: datetime | None) -> bool:
    """Whether the watcher's heartbeat is recent enough to trust that it is looking."""
    return heartbeat_at is not None and _age(now, heartbeat_at) <= WATCHER_STALE_AFTER_S


def recovery_point_s(inputs: LagInputs) -> float:
    """The recovery point in seconds (0: everything in Redis is in PostgreSQL)."""
    now = inputs.now
    pending = 0.0 if inputs.oldest_change is None else _age(now, inputs.oldest_change)
    if inputs.continuous and inputs.heartbeat_at is not None:
        if watcher_alive(now, inputs.heartbeat_at):
            return pending
        return max(pending, _age(now, inputs.heartbeat_at))
    # No watcher ever ran, or continuous backups are off: only full backups bound it.
    if inputs.last_full_started_at is None:
        return math.inf
    return max(pending, _age(now, inputs.last_full_started_at))


def _age(now: datetime, then: datetime) -> float:
    return max(0.0, (now - then).total_seconds())
