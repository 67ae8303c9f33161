"""Continuous backups: back up a shard's pending sessions (no Celery here).

The watcher (worker/watch.py) marks sessions changed in Redis as pending, one
row each in continuous_pending however often they are written; a *drain*
(the task ``worker.tasks.continuous_drain``, one queued per shard at a time)
then:

1. claims pending sessions of its shard (``claimed_by`` = its token, whose
   owner lock it holds: a drain whose worker dies leaves claims anyone may
   take at once);
2. backs them up with the ordinary incremental backup (worker.backup: the same
   engine, the same per-session locks, the same kept-aside records), with no
   run record: a persistence_snapshots row per session would flood ``backup
   list``; what drains did is counted per shard per minute in
   continuous_activity instead;
3. releases them: a session nothing changed since the claim is done; one the
   watcher saw change meanwhile (``changed_again``: that write may have come
   after the backup read Redis) stays pending, so a write is never lost
   between "read" and "mark clean"; a failed one backs off.

It claims again until nothing is left or its time is up, then ends; the
watcher queues the next one.
"""

from __future__ import annotations

import time
import uuid
from dataclasses import asdict, dataclass

from worker import runs
from worker.errors import DndError
from worker.models import BackupOptions, SessionStatus
from worker.services import Services
from worker.settings import Settings

# A drain stops claiming after this long: a drain is a task like any other,
# and a queue shared with scheduled batches should not be held for long.
DRAIN_BUDGET_S = 0.5
# A failed session waits 1 s, 2 s, 4 s ... (at most 60 s) before it is tried again.
FAILURE_BACKOFF_S = 1.0


@dataclass(slots=True)
class DrainReport:
    """What one drain did (the task's result)."""

    shard: int
    backups: int = 0
    sessions: int = 0
    messages: int = 0
    kept: int = 0
    failed: int = 0

    def as_dict(self) -> dict[str, int]:
        return asdict(self)


def repeat_pause_s(settings: Settings) -> float:
    """How long a session changed during its backup waits before the next one.

    A session written without a break is then backed up every so often (not
    in a loop): a fifth of CONTINUOUS_MAX_LAG (1 s by default), which leaves
    the rest of the target for the backup itself and for the watcher.
    """
    return settings.continuous_max_lag_s / 5


def drain(services: Services, shard: int, *, budget_s: float = DRAIN_BUDGET_S) -> DrainReport:
    """Back up the pending sessions of ``shard`` until none is left or time is up."""
    pg = services.pg
    token = f"drain:{uuid.uuid4()}"
    report = DrainReport(shard)
    pause = repeat_pause_s(services.settings)
    engine = runs.make_engine(services, BackupOptions())
    deadline = time.monotonic() + budget_s
    with runs.owning(pg, token) as mine:
        if not mine:  # a fresh random token: cannot be held by anyone else
            raise DndError(f"owner lock {token} is taken")
        while time.monotonic() < deadline:
            ids = pg.claim_pending(shard, token, services.settings.batch_sessions)
            if not ids:
                break
            try:
                results = engine.run_batch(None, ids)
            except BaseException:
                # A server down, a lock held too long (TransientError), or the
                # task being stopped: give the claims back at once, so another
                # drain can take them, and let the caller see the error.
                pg.release_failed(token, ids, failed=False, backoff_s=0)
                raise
            failed = [r.session_id for r in results if r.status is SessionStatus.FAILED]
            done = [r.session_id for r in results if r.status is not SessionStatus.FAILED]
            pg.release_done(token, done, pause)
            pg.release_failed(token, failed, failed=True, backoff_s=FAILURE_BACKOFF_S)
            messages = sum(r.messages for r in results)
            kept = sum(r.kept for r in results)
            pg.add_activity(
                shard, sessions=len(ids), messages=messages, kept=kept, failures=len(failed)
            )
            report.backups += 1
            report.sessions += len(ids)
            report.messages += messages
            report.kept += kept
            report.failed += len(failed)
    return report
