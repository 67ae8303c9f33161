"""Celery tasks: thin wrappers over the engine (worker.backup, worker.restore).

Every task is JSON-serialised, idempotent and safe to run twice: backups
upsert and never store a message twice, restores swap whole sessions in
atomically, run records are upserted. Connection problems (and waiting too
long for another run's session lock) are retried with exponential back-off;
data problems never fail a task: they are kept aside and the run is `partial`.

    from worker.tasks import backup_session
    backup_session.delay("2f1c0a7e-...")   # routed to the session's shard queue
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Sequence
from typing import Any

from celery import Task, chord

from worker import process, runs
from worker.celery import app
from worker.celery_config import batch_task_name, full_task_name, session_task_name
from worker.errors import DndError, RunInProgress, TransientError
from worker.models import (
    BackupOptions,
    RestoreOptions,
    RunKind,
    RunOptions,
    SessionResult,
    VerifyOptions,
)
from worker.records import parse_session_id
from worker.settings import get_settings

log = logging.getLogger(__name__)

# Retry what may work later (a server down for a moment, a session lock held by
# a long run), with exponential back-off and jitter: 1 s, 2 s, 4 s ... capped
# at 2 min; TASK_MAX_RETRIES (12: about 15 minutes in all). Never retry data
# errors: they would fail the same way every time.
RETRY_POLICY: dict[str, Any] = {
    "autoretry_for": (TransientError,),
    "retry_backoff": 1,
    "retry_backoff_max": 120,
    "retry_jitter": True,
    "max_retries": get_settings().task_max_retries,
}


class RunTask(Task):  # type: ignore[misc]
    """A task that owns a run record: if it finally fails, the run is marked failed."""

    def on_failure(
        self, exc: BaseException, task_id: str, args: Any, kwargs: Any, einfo: Any
    ) -> None:
        run_id = kwargs.get("run_id") or task_id
        _fail_run_quietly(run_id, f"task {self.name} failed: {_describe(exc)}")


# -- one session ------------------------------------------------------------------


@app.task(name=session_task_name("backup"), bind=True, base=RunTask, **RETRY_POLICY)
def backup_session(
    self: Task, session_id: str, run_id: str | None = None, full: bool = False
) -> dict[str, Any]:
    """Back up one session (a one-session run); returns its result dict."""
    return _session_run(self, BackupOptions(full=full), session_id, run_id)


@app.task(name=session_task_name("restore"), bind=True, base=RunTask, **RETRY_POLICY)
def restore_session(
    self: Task, session_id: str, force: bool = False, run_id: str | None = None
) -> dict[str, Any]:
    """Restore one session (a one-session run); returns its result dict."""
    return _session_run(self, RestoreOptions(force=force), session_id, run_id)


@app.task(name=session_task_name("verify"), bind=True, base=RunTask, **RETRY_POLICY)
def verify_session(
    self: Task, session_id: str, quick: bool = False, run_id: str | None = None
) -> dict[str, Any]:
    """Compare one session in Redis with its backup (a one-session verify run)."""
    return _session_run(self, VerifyOptions(quick=quick), session_id, run_id)


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
    return _full_run(self, BackupOptions(full=full), run_id, trigger)


@app.task(name=full_task_name("restore"), bind=True, trail=False, **RETRY_POLICY)
def full_restore(
    self: Task, force: bool = False, run_id: str | None = None, trigger: str = "task"
) -> dict[str, Any]:
    """Restore every live session from PostgreSQL: batches per shard, then a chord."""
    return _full_run(self, RestoreOptions(force=force), run_id, trigger)


@app.task(name=full_task_name("verify"), bind=True, trail=False, **RETRY_POLICY)
def full_verify(
    self: Task, quick: bool = False, run_id: str | None = None, trigger: str = "task"
) -> dict[str, Any]:
    """Verify every session in Redis or PostgreSQL: batches per shard, then a chord."""
    return _full_run(self, VerifyOptions(quick=quick), run_id, trigger)


def _batch_task(kind: RunKind) -> Task:
    """The task that works on one batch of a full run of ``kind`` (one per kind)."""

    @app.task(name=batch_task_name(kind), bind=True, **RETRY_POLICY)
    def run_batch(
        self: Task, run_id: str, shard: int, session_ids: list[str], options: dict[str, Any]
    ) -> dict[str, Any]:
        with process.task_services(_worker_name(self)) as services:
            results = runs.run_batch(services, runs.options_for(kind, options), run_id, session_ids)
        return _batch_summary(shard, results)

    return run_batch


# backup_batch, restore_batch, verify_batch: per-session results go to PostgreSQL.
BATCH_TASKS: dict[RunKind, Task] = {kind: _batch_task(kind) for kind in runs.KINDS}


@app.task(name="worker.tasks.finish_run", bind=True, **RETRY_POLICY)
def finish_run(self: Task, batch_summaries: list[dict[str, Any]], run_id: str) -> dict[str, Any]:
    """Chord callback: complete the run's snapshot row from its per-session results."""
    with process.task_services(_worker_name(self)) as services:
        run = runs.finish(services, run_id)
    return run.as_dict()


@app.task(name="worker.tasks.fail_run")
def fail_run(request: Any, exc: BaseException, traceback: Any, run_id: str) -> None:
    """Chord error path: a batch failed for good (the callback will not run)."""
    task_id = getattr(request, "id", "?")
    _fail_run_quietly(run_id, f"batch task {task_id} failed: {_describe(exc)}")


# -- housekeeping -------------------------------------------------------------------


@app.task(name="worker.tasks.fail_stale_runs", bind=True, **RETRY_POLICY)
def fail_stale_runs(self: Task, after_seconds: int | None = None) -> list[str]:
    """Mark failed the runs left `running` by a crash (no progress for STALE_RUN_AFTER)."""
    seconds = after_seconds or get_settings().stale_run_after_s
    with process.task_services(_worker_name(self)) as services:
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
    from datetime import UTC, datetime, timedelta

    days = (
        older_than_days
        if older_than_days is not None or keep is not None
        else (get_settings().prune_keep_days)
    )
    before = None if days is None else datetime.now(UTC) - timedelta(days=days)
    with process.task_services(_worker_name(self)) as services:
        removed = services.pg.prune(keep=keep, before=before)
    log.info("pruned run records: %s", removed)
    return removed


# -- helpers ------------------------------------------------------------------------


def _session_run(
    task: Task, options: RunOptions, session_id: str, run_id: str | None
) -> dict[str, Any]:
    """A run over one session: its record (the task's ID unless given), the batch, the end."""
    sid = parse_session_id(session_id)
    with process.task_services(_worker_name(task)) as services:
        started = runs.start(
            services, options, session_ids=[sid], run_id=run_id or task.request.id,
            details=_details(task),
        )  # fmt: skip
        [result] = runs.run_batch(services, options, started.run.id, [sid], explicit=True)
        run = runs.finish(services, started.run.id)
    return {**result.as_dict(), "run_id": run.id, "run_status": run.status.value}


def _full_run(task: Task, options: RunOptions, run_id: str | None, trigger: str) -> dict[str, Any]:
    """Start a full run: list its sessions, record it, dispatch its chord.

    A retried coordinator finds its run and does not dispatch it twice; while
    another full run of this kind is running it returns ``status: skipped``.
    """
    settings = get_settings()
    with process.task_services(_worker_name(task)) as services:
        try:
            started = runs.start(
                services, options, run_id=run_id or task.request.id,
                details=_details(task, trigger=trigger),
            )  # fmt: skip
        except RunInProgress as busy:
            log.info("full %s not started: %s", options.kind, busy)
            return {"status": "skipped", "reason": str(busy), "running_run_id": busy.run_id}
        run, ids = started.run, started.session_ids
        if not started.created and run.details.get("dispatched"):
            return {"status": "running", "run_id": run.id, "sessions": len(ids)}
        batches = runs.cut_batches(ids, settings.backup_shards, settings.batch_sessions)
        if not batches:
            done = runs.finish(services, run.id)
            return {"status": done.status.value, "run_id": run.id, "sessions": 0, "batches": 0}
        batch_task = BATCH_TASKS[options.kind]
        flags = options.as_dict()
        header = [batch_task.si(run.id, b.shard, b.session_ids, flags) for b in batches]
        chord(header)(finish_run.s(run.id).on_error(fail_run.s(run.id)))
        services.pg.mark_run_dispatched(run.id)
    return {"status": "running", "run_id": run.id, "sessions": len(ids), "batches": len(batches)}


def _batch_summary(shard: int, results: Sequence[SessionResult]) -> dict[str, Any]:
    # Small on purpose: chord results sit in the result backend until the
    # callback runs; the per-session detail is in PostgreSQL already.
    return {
        "shard": shard,
        "sessions": len(results),
        "messages": sum(r.messages for r in results),
        "kept": sum(r.kept for r in results),
        "failed": sum(r.status.value == "failed" for r in results),
        "different": sum(r.status.value == "different" for r in results),
    }


def _details(task: Task, **extra: Any) -> dict[str, Any]:
    return {"mode": "celery", "task_id": task.request.id, **extra}


def _worker_name(task: Task) -> str:
    return str(task.request.hostname or "celery")


def _describe(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}"


def _fail_run_quietly(run_id: str, error: str) -> None:
    # Best effort: if PostgreSQL is what failed, the stale-run sweep will do it.
    with contextlib.suppress(DndError), process.task_services("errback") as services:
        services.pg.finish_run(run_id, error=error)
