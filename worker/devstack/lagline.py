"""The dev stack's status line about the recovery point, every :data:`EVERY_S` seconds.

`dnd-client dev` prints, on stderr with its other status lines, what
`dnd-client status` would say in one line: the recovery point against its
target, the sessions waiting, the last full backup, and whether beat and the
continuous watcher are alive. Read from PostgreSQL (worker/health.py).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable

from worker.errors import DndError
from worker.health import Health, Workers, assess, read_figures
from worker.settings import Settings

EVERY_S = 30.0


def lag_line(health: Health) -> str:
    """``lag 0.4 s (target 5 s), 2 sessions waiting, last full backup 3m ago, ...``."""
    lag = health.recovery_point_s
    shown = "unbounded (no full backup yet)" if math.isinf(lag) else f"{lag:.1f} s"
    parts = [
        f"lag {shown} (target {health.max_lag_s:g} s)"
        + (" ABOVE TARGET" if health.lag_exceeded else ""),
        f"{health.pending_sessions} sessions waiting",
    ]
    age = health.last_full_backup_age_s
    parts.append("no full backup yet" if age is None else f"last full backup {_ago(age)}")
    parts.append("beat alive" if health.figures.beat_alive else "beat not running")
    if health.settings.continuous_backup:
        parts.append("watcher alive" if health.watcher_alive else "watcher not running")
    return ", ".join(parts)


class LagReporter:
    """Says the lag line when it is due (and once, if PostgreSQL cannot be read)."""

    def __init__(self, settings: Settings, say: Callable[[str], None]) -> None:
        self.settings = settings
        self.say = say
        self.next_at = 0.0  # due at once
        self._failed = False

    def tick(self, now: float | None = None) -> None:
        now = time.monotonic() if now is None else now
        if now < self.next_at:
            return
        self.next_at = now + EVERY_S
        try:
            figures = read_figures(self.settings)
        except DndError as exc:
            if not self._failed:
                self.say(f"status: cannot read PostgreSQL ({exc})")
            self._failed = True
            return
        self._failed = False
        # The worker count is left out: the dev stack watches its worker itself.
        self.say(lag_line(assess(figures, self.settings, Workers(None, "not asked"))))


def _ago(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.0f} s ago"
    if seconds < 7200:
        return f"{seconds / 60:.0f} min ago"
    return f"{seconds / 3600:.1f} h ago"
