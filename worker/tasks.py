"""Celery tasks: a few lines each over the run layer (worker.celery_runs, worker.runs).

Every task is JSON-serialised, idempotent and safe to run twice: backups
upsert and never store a message twice, restores swap whole sessions in
atomically, run records are upserted, and a late copy of a task finds its work
done. Connection problems (and waiting too long for another run's session
lock) are retried with exponential back-off; data problems never fail a task:
they are kept aside and the run is `partial`.

    from worker.tasks import backup_session
    backup_session.delay("2f1c0a7e-...")   # routed to the session's shard queue
"""

from __future__ import annotations

import logging
import os
import uuid
from collections.abc import Sequence
from datetime import UTC, datetime, timedelta
from typing import Any

from celery import Task

from worker import celery_runs, continuous, process, runs
from worker.celery import app
from worker.celery_config import (
    CONTINUOUS_DRAIN_TASK,
    batch_task_name,
    full_task_name,
    session_task_name,
)
from worker.celery_runs import RunTask, worker_name
from worker.errors import DndError, InvalidArgument, TransientError
from worker.models import BackupOptions, RestoreOptions, RunKind, VerifyOptions
from worker.records import parse_session_id
from worker.redis_store import RedisStore
from worker.services import redis_store
from worker.settings import get_settings

log = logging.getLogger(__name__)

# Tasks that are not batches of a run retry what may work later (a server down
# for a moment) the same way: 1 s, 2 s, 4 s ... capped at 2 min, with jitter,
# TASK_MAX_RETRIES times (12: about 15 minutes in all). Never data errors:
# they would fail the same way every time.
RETRY_POLICY: dict[str, Any] = {
    "autoretry_for": (TransientError,),
    "retry_backoff": 1,
    "retry_backoff_max": celery_runs.RETRY_BACKOFF_MAX_S,
    "retry_jitter": True,
    "max_retries": get_settings().task_max_retries,
}


class SessionRunTask(RunTask):
    """A one-session run: its run is the task's ID (or ``run_id``), its batch number 0."""

    def batch_of(
        self, args: Sequence[Any], kwargs: dict[str, Any], task_id: str
    ) -> tuple[str, int]:
        return kwargs.get("run_id") or task_id, 0


# A queued backup_session's marker expires after this long if its task never
# starts (a broker that lost it): then a new request queues a new task.
BACKUP_MARKER_TTL_S = 60


def coalescible(args: Sequence[Any] | None, kwargs: dict[str, Any] | None) -> str | None:
    """The session of a plain ``backup_session`` request (ID only), else None.

    Only a request for an ordinary incremental backup under a new run merges
    with one already queued: one naming its run (the supervisor sending a
    lost one again) or asking for a full backup is sent as asked.
    """
    positional = list(args or ())
    named = dict(kwargs or {})
    if len(positional) > 1 or named.get("run_id") or named.get("full"):
        return None
    if positional and "session_id" in named:
        return None
    raw = positional[0] if positional else named.get("session_id")
    if not isinstance(raw, str) or set(named) - {"session_id", "run_id", "full"}:
        return None
    try:
        return parse_session_id(raw)
    except InvalidArgument:
        return None  # refused by the router, with its message


_markers: tuple[int, RedisStore] | None = None


def _marker_store() -> RedisStore:
    """This process's client for the markers (opened on first use, again after a fork)."""
    global _markers
    if _markers is None or _markers[0] != os.getpid():
        _markers = (os.getpid(), redis_store(get_settings()))
    return _markers[1]


class CoalescedBackupTask(SessionRunTask):
    """backup_session: a request for a session whose backup is queued joins that one.

    ``backup_session.delay(id)`` after every write is the documented way to ask
    for a prompt backup: 1,000 requests a second for one session give one
    queued task (a marker in Redis names it, and every request until it starts
    gets its AsyncResult, so the same result dict) and the one running. The
    task clears the marker as it starts, so a write during its run is covered
    by the next request's new task.
    """

    def apply_async(
        self,
        args: Sequence[Any] | None = None,
        kwargs: dict[str, Any] | None = None,
        task_id: str | None = None,
        **options: Any,
    ) -> Any:
        sid = coalescible(args, kwargs)
        if sid is None or options.get("countdown") or options.get("eta"):
            return super().apply_async(args, kwargs, task_id=task_id, **options)
        task_id = task_id or str(uuid.uuid4())
        try:
            store = _marker_store()
            queued = store.put_marker(store.keys.backup_queued(sid), task_id, BACKUP_MARKER_TTL_S)
        except DndError as exc:
            # Redis unreachable from here: ask anyway, the task finds out.
            log.warning("backup_session: cannot merge with a queued request (%s)", exc)
            queued = None
        if queued is not None and queued != task_id:
            return self.AsyncResult(queued)
        return super().apply_async(args, kwargs, task_id=task_id, **options)


def _started(session_id: str, task_id: str) -> None:
    """The request is no longer queued: a new one must queue a new task."""
    try:
        sid = parse_session_id(session_id)
        store = _marker_store()
        store.clear_marker(store.keys.backup_queued(sid), task_id)
    except DndError as exc:
        log.warning("backup_session: cannot clear the queued marker (%s)", exc)


class BatchTask(RunTask):
    """A batch of a full run: called with (run ID, shard, batch number, options)."""

    label = "batch task"

    def batch_of(
        self, args: Sequence[Any], kwargs: dict[str, Any], task_id: str
    ) -> tuple[str, int]:
        return str(args[0]), int(args[2])


# -- one session ------------------------------------------------------------------


@app.task(name=session_task_name("backup"), bind=True, base=CoalescedBackupTask)
def backup_session(
    self: Task, session_id: str, run_id: str | None = None, full: bool = False
) -> dict[str, Any]:
    """Back up one session (a one-session run); returns its result dict."""
    _started(session_id, self.request.id)
    return celery_runs.session_run(self, BackupOptions(full=full), session_id, run_id)


@app.task(name=session_task_name("restore"), bind=True, base=SessionRunTask)
def restore_session(
    self: Task,
    session_id: str,
    force: bool = False,
    run_id: str | None = None,
    as_of: str | None = None,
) -> dict[str, Any]:
    """Restore one session (a one-session run); returns its result dict.

    ``as_of``: an RFC 3339 instant or a run ID: the session as history holds it then.
    """
    options = RestoreOptions(force=force, as_of=as_of)
    return celery_runs.session_run(self, options, session_id, run_id)


@app.task(name=session_task_name("verify"), bind=True, base=SessionRunTask)
def verify_session(
    self: Task,
    session_id: str,
    quick: bool = False,
    run_id: str | None = None,
    as_of: str | None = None,
) -> dict[str, Any]:
    """Compare one session in Redis with its backup (as of a moment: with history)."""
    options = VerifyOptions(quick=quick, as_of=as_of)
    return celery_runs.session_run(self, options, session_id, run_id)


# -- full runs: a coordinator, batches per shard, a chord callback ------------------


# trail=False: the coordinator's result must not carry the hundreds of batch
# tasks it started (Celery would attach them as `children`); the run record in
# PostgreSQL is where progress lives.
@app.task(name=full_task_name("backup"), bind=True, trail=False, **RETRY_POLICY)
def full_backup(
    self: Task, full: bool = False, run_id: str | None = None, trigger: str = "task"
) -> dict[str, Any]:
    """Back up every session: batches per shard, then a chord completes the run.

    Never two at once: a second full backup (a duplicate beat, an operator)
    while one is running returns ``{"status": "skipped", ...}``.
    """
    return celery_runs.full_run(self, BackupOptions(full=full), run_id, trigger)


@app.task(name=full_task_name("restore"), bind=True, trail=False, **RETRY_POLICY)
def full_restore(
    self: Task,
    force: bool = False,
    run_id: str | None = None,
    trigger: str = "task",
    as_of: str | None = None,
) -> dict[str, Any]:
    """Restore every live session from PostgreSQL: batches per shard, then a chord.

    ``as_of``: an RFC 3339 instant or a run ID: every session live then, as it was.
    """
    options = RestoreOptions(force=force, as_of=as_of)
    return celery_runs.full_run(self, options, run_id, trigger)


@app.task(name=full_task_name("verify"), bind=True, trail=False, **RETRY_POLICY)
def full_verify(
    self: Task,
    quick: bool = False,
    run_id: str | None = None,
    trigger: str = "task",
    as_of: str | None = None,
) -> dict[str, Any]:
    """Verify every session in Redis or PostgreSQL: batches per shard, then a chord.

    ``as_of``: against the state history holds for that moment (a drill's copy).
    """
    options = VerifyOptions(quick=quick, as_of=as_of)
    return celery_runs.full_run(self, options, run_id, trigger)


def _batch_task(kind: RunKind) -> Task:
    """The task that works on one recorded batch of a full run of ``kind``."""

    @app.task(name=batch_task_name(kind), bind=True, base=BatchTask)
    def run_batch(
        self: Task, run_id: str, shard: int, batch_no: int, options: dict[str, Any]
    ) -> dict[str, Any]:
        return celery_runs.handed_out_batch(self, kind, run_id, shard, batch_no, options)

    return run_batch


# backup_batch, restore_batch, verify_batch: per-session results go to PostgreSQL.
BATCH_TASKS: dict[RunKind, Task] = {kind: _batch_task(kind) for kind in runs.KINDS}


@app.task(name="worker.tasks.finish_run", bind=True, **RETRY_POLICY)
def finish_run(
    self: Task, batch_summaries: list[dict[str, Any]] | None = None, *, run_id: str
) -> dict[str, Any]:
    """Chord callback: complete the run's row from its per-session results, if all are in."""
    return celery_runs.finish_when_complete(run_id, worker_name(self))


@app.task(name="worker.tasks.fail_run")
def fail_run(request: Any, exc: BaseException, traceback: Any, *, run_id: str) -> None:
    """Chord error path: a batch failed for good; finish the run if nothing else is missing.

    Celery calls this in the worker where the chord's last part returned, from
    inside that part's mark_as_failure: when the part that failed is the last
    one, before its own on_failure (celery.app.trace.handle_failure). The
    request is one Celery makes up from the callback and names no batch, so
    the failed batch's sessions are failed by its task's on_failure
    (RunTask), with its own error, which runs next in the same process; if
    PostgreSQL cannot be reached there, the supervisor takes the batch over
    (sends it again, and gives it up after MAX_DISPATCHES sends).
    """
    log.warning("run %s: a batch task failed for good: %s", run_id, exc)
    celery_runs.finish_if_complete_quietly(run_id)


# -- continuous protection ---------------------------------------------------------


@app.task(name=CONTINUOUS_DRAIN_TASK, bind=True)
def continuous_drain(self: Task, shard: int) -> dict[str, int]:
    """Back up the pending sessions of a shard (queued by the watcher, one at a time)."""
    with process.task_services(worker_name(self)) as services:
        # No longer queued: the watcher may queue the next drain of this shard.
        services.redis.clear_marker(services.redis.keys.drain_queued(shard), self.request.id)
        return continuous.drain(services, shard).as_dict()


# -- housekeeping -------------------------------------------------------------------


@app.task(name="worker.tasks.supervise_runs", bind=True)
def supervise_runs(self: Task) -> dict[str, int]:
    """Beat, every few seconds: finish, fail or revive runs whose workers went away."""
    with process.task_services(worker_name(self)) as services:
        review = celery_runs.supervise_runs(services.pg, services.worker_name)
    return {
        "finished": len(review.finished),
        "abandoned": len(review.abandoned),
        "given_up": len(review.given_up),
        "resend": len(review.resend),
    }


@app.task(name="worker.tasks.fail_stale_runs", bind=True, **RETRY_POLICY)
def fail_stale_runs(self: Task, after_seconds: int | None = None) -> list[str]:
    """The last resort: mark failed the runs with no progress for STALE_RUN_AFTER."""
    seconds = after_seconds or get_settings().stale_run_after_s
    with process.task_services(worker_name(self)) as services:
        stale = services.pg.stale_runs(seconds)
        for run_id in stale:
            services.pg.finish_run(
                run_id,
                error=f"abandoned: no progress for {seconds} s (a worker or the "
                "process running it died)",
            )
    if stale:
        log.warning("marked %d abandoned run(s) failed: %s", len(stale), ", ".join(stale))
    return stale


@app.task(name="worker.tasks.prune_runs", bind=True, **RETRY_POLICY)
def prune_runs(
    self: Task, older_than_days: int | None = None, keep: int | None = None
) -> dict[str, int]:
    """Remove old run records (never backed-up data): beat runs it on PRUNE_SCHEDULE."""
    days = (
        older_than_days
        if older_than_days is not None or keep is not None
        else (get_settings().prune_keep_days)
    )
    before = None if days is None else datetime.now(UTC) - timedelta(days=days)
    with process.task_services(worker_name(self)) as services:
        removed = services.pg.prune(keep=keep, before=before)
    log.info("pruned run records: %s", removed)
    return removed


@app.task(name="worker.tasks.prune_history", bind=True, **RETRY_POLICY)
def prune_history(self: Task, older_than_days: int | None = None) -> dict[str, int]:
    """Fold history older than the window into the state at its start (HISTORY_KEEP_DAYS).

    Never the current tables; restores as of a moment before the window are refused.
    """
    days = older_than_days if older_than_days is not None else get_settings().history_keep_days
    if not days:
        return {}
    before = datetime.now(UTC) - timedelta(days=days)
    with process.task_services(worker_name(self)) as services:
        folded = services.pg.fold_history(before)
    log.info("folded history before %s: %s", before.isoformat(), folded)
    return folded
