"""Beat says it is alive by holding an owner lock in PostgreSQL, and serves the metrics.

`celery -A worker beat` starts :func:`start` from its ``beat_init`` signal
(worker/celery.py). A daemon thread keeps a connection of its own open and holds
the owner lock ``beat`` (worker.health.BEAT_KEY) on it, the same kind of lock a
run's owner holds (worker/runs.py): it ends the moment the process or its
connection does, so `dnd-client status` and the metrics know whether beat runs
without a heartbeat table, a clock or a timeout. The thread checks its
connection every :data:`CHECK_INTERVAL_S` and opens a new one when PostgreSQL
went away.

Two beats at once schedule every task twice: the second one logs a warning.
"""

from __future__ import annotations

import contextlib
import logging
import threading
from collections.abc import Callable
from typing import Any

from worker.connections import connect_postgres
from worker.errors import DndError
from worker.health import BEAT_KEY
from worker.pg_store import PostgresStore
from worker.settings import Settings

log = logging.getLogger(__name__)

CHECK_INTERVAL_S = 5.0


class BeatPresence(threading.Thread):
    """Holds the ``beat`` owner lock for as long as the process lives."""

    def __init__(self, settings: Settings, stop: threading.Event | None = None) -> None:
        super().__init__(name="dnd-beat-presence", daemon=True)
        self.settings = settings
        self.stop_event = stop or threading.Event()
        self.holding = threading.Event()
        self._pg: PostgresStore | None = None
        self._warned = ""

    def run(self) -> None:
        while True:
            self._check()
            if self.stop_event.wait(CHECK_INTERVAL_S):
                break
        self._drop()

    def _check(self) -> None:
        try:
            if self._pg is None:
                self._pg = PostgresStore(connect_postgres(self.settings), self.settings)
                if not self._pg.try_owner_lock(BEAT_KEY):
                    self._warn_once(
                        "another beat holds the beat lock: two beats schedule every task twice"
                    )
                    self._drop()
                    return
                self.holding.set()
                self._warned = ""
                log.info("beat presence: holding the %r owner lock in PostgreSQL", BEAT_KEY)
            else:
                self._pg.ping()
        except DndError as exc:
            self._warn_once(f"beat presence: PostgreSQL cannot be reached ({exc}); retrying")
            self._drop()

    def _drop(self) -> None:
        self.holding.clear()
        if self._pg is not None:
            pg, self._pg = self._pg, None
            with contextlib.suppress(Exception):
                pg.conn.close()

    def _warn_once(self, message: str) -> None:
        if message != self._warned:
            log.warning(message)
            self._warned = message


def start(settings: Settings, serve_metrics: Callable[[Settings], Any]) -> BeatPresence:
    """Start holding the beat lock, and serve the metrics (when METRICS_PORT is not 0)."""
    presence = BeatPresence(settings)
    presence.start()
    if settings.metrics_port:
        serve_metrics(settings)
    else:
        log.info("metrics: METRICS_PORT=0, not served")
    return presence
