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
from collections.abc import Callable, Sequence
from typing import Any

from celery import Task, chord

from worker import process
from worker.celery import app
from worker.errors import DndError, RunInProgress, TransientError
from worker.models import RunKind, SessionResult
from worker.records import parse_session_id
from worker.runner import full_run_sessions
from worker.services import Services
from worker.settings import get_settings
from worker.sharding import shard_of

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


@app.task(name="worker.tasks.backup_session", bind=True, base=RunTask, **RETRY_POLICY)
def backup_session(
    self: Task, session_id: str, run_id: str | None = None, full: bool = False
) -> dict[str, Any]:
    """Back up one session (a one-session run); returns its result dict."""

    def batch(services: Services, run: str, ids: list[str]) -> list[SessionResult]:
        return services.backup_engine().backup_batch(run, ids, full=full, explicit=True)

    return _session_run(self, "backup", session_id, run_id, batch, details={"full": full})


@app.task(name="worker.tasks.restore_session", bind=True, base=RunTask, **RETRY_POLICY)
def restore_session(
    self: Task, session_id: str, force: bool = False, run_id: str | None = None
) -> dict[str, Any]:
    """Restore one session (a one-session run); returns its result dict."""

    def batch(services: Services, run: str, ids: list[str]) -> list[SessionResult]:
        return services.restore_engine().restore_batch(run, ids, force=force, explicit=True)

    return _session_run(self, "restore", session_id, run_id, batch, forced=force)


@app.task(name="worker.tasks.verify_session", bind=True, base=RunTask, **RETRY_POLICY)
def verify_session(
    self: Task, session_id: str, quick: bool = False, run_id: str | None = None
) -> dict[str, Any]:
    """Compare one session in Redis with its backup (a one-session verify run)."""

    def batch(services: Services, run: str, ids: list[str]) -> list[SessionResult]:
        return services.verify_engine().verify_batch(run, ids, quick=quick)

    return _session_run(self, "verify", session_id, run_id, batch, details={"quick": quick})


# -- full runs: a coordinator, batches per shard, a chord callback ------------------


# trail=False: the coordinator's result must not carry the hundreds of batch
# tasks it started (Celery would attach them as `children`); the run record in
# PostgreSQL is where progress lives.
@app.task(name="worker.tasks.full_backup", bind=True, trail=False, **RETRY_POLICY)
def full_backup(
    self: Task, full: bool = False, run_id: str | None = None, trigger: str = "task"
) -> dict[str, Any]:
    """Back up every session: batches per shard, then a chord completes the run.

    Never two at once: a second full backup (a duplicate beat, an operator)
    while one is running returns ``{"status": "skipped", ...}``.
    """
    return _full_run(self, "backup", run_id, backup_batch, full, trigger, {"full": full})


@app.task(name="worker.tasks.full_restore", bind=True, trail=False, **RETRY_POLICY)
def full_restore(
    self: Task, force: bool = False, run_id: str | None = None, trigger: str = "task"
) -> dict[str, Any]:
    """Restore every live session from PostgreSQL: batches per shard, then a chord."""
    return _full_run(self, "restore", run_id, restore_batch, force, trigger, {}, forced=force)


@app.task(name="worker.tasks.full_verify", bind=True, trail=False, **RETRY_POLICY)
def full_verify(
    self: Task, quick: bool = False, run_id: str | None = None, trigger: str = "task"
) -> dict[str, Any]:
    """Verify every session in Redis or PostgreSQL: batches per shard, then a chord."""
    return _full_run(self, "verify", run_id, verify_batch, quick, trigger, {"quick": quick})


@app.task(name="worker.tasks.backup_batch", bind=True, **RETRY_POLICY)
def backup_batch(
    self: Task, run_id: str, shard: int, session_ids: list[str], full: bool = False
) -> dict[str, Any]:
    """Back up one batch of one shard's sessions; per-session results go to PostgreSQL."""
    with process.task_services(_worker_name(self)) as services:
        results = services.backup_engine().backup_batch(run_id, session_ids, full=full)
    return _batch_summary(shard, results)


@app.task(name="worker.tasks.restore_batch", bind=True, **RETRY_POLICY)
def restore_batch(
    self: Task, run_id: str, shard: int, session_ids: list[str], force: bool = False
) -> dict[str, Any]:
    """Restore one batch of one shard's sessions; per-session results go to PostgreSQL."""
    with process.task_services(_worker_name(self)) as services:
        results = services.restore_engine().restore_batch(run_id, session_ids, force=force)
    return _batch_summary(shard, results)


@app.task(name="worker.tasks.verify_batch", bind=True, **RETRY_POLICY)
def verify_batch(
    self: Task, run_id: str, shard: int, session_ids: list[str], quick: bool = False
) -> dict[str, Any]:
    """Verify one batch of one shard's sessions; per-session results go to PostgreSQL."""
    with process.task_services(_worker_name(self)) as services:
        results = services.verify_engine().verify_batch(run_id, session_ids, quick=quick)
    return _batch_summary(shard, results)


@app.task(name="worker.tasks.finish_run", bind=True, **RETRY_POLICY)
def finish_run(self: Task, batch_summaries: list[dict[str, Any]], run_id: str) -> dict[str, Any]:
    """Chord callback: complete the run's snapshot row from its per-session results."""
    with process.task_services(_worker_name(self)) as services:
        run = services.pg.finish_run(run_id)
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
    task: Task,
    kind: RunKind,
    session_id: str,
    run_id: str | None,
    batch: Callable[[Services, str, list[str]], list[SessionResult]],
    *,
    forced: bool = False,
    details: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """A run over one session: its record (the task's ID unless given), the batch, the end."""
    sid = parse_session_id(session_id)
    run_id = run_id or task.request.id
    with process.task_services(_worker_name(task)) as services:
        services.pg.ensure_run(
            kind, "session", run_id=run_id, forced=forced, expected_sessions=1,
            details=_details(task, session_id=sid, **(details or {})),
        )  # fmt: skip
        [result] = batch(services, run_id, [sid])
        run = services.pg.finish_run(run_id)
    payload = result.as_dict()
    payload["run_id"] = run_id
    payload["run_status"] = run.status.value
    return payload


def _full_run(
    task: Task,
    kind: RunKind,
    run_id: str | None,
    batch_task: Task,
    flag: bool,
    trigger: str,
    details: dict[str, Any],
    *,
    forced: bool = False,
) -> dict[str, Any]:
    """Start a full run: list its sessions, record it, dispatch its chord.

    ``batch_task`` gets (run ID, shard, session IDs, ``flag``) per batch. A
    retried coordinator finds its run and does not dispatch it twice; while
    another full run of the kind is running it returns ``status: skipped``.
    """
    run_id = run_id or task.request.id
    settings = get_settings()
    with process.task_services(_worker_name(task)) as services:
        ids, bad, extra = full_run_sessions(services, kind)
        try:
            run, created = services.pg.ensure_run(
                kind, "all", run_id=run_id, forced=forced, expected_sessions=len(ids),
                kept=len(bad), details=_details(task, trigger=trigger, **details, **extra),
            )  # fmt: skip
        except RunInProgress as busy:
            log.info("full %s not started: %s", kind, busy)
            return {"status": "skipped", "reason": str(busy), "running_run_id": busy.run_id}
        if not created and run.details.get("dispatched"):
            return {"status": "running", "run_id": run_id, "sessions": len(ids)}
        services.pg.keep_records(bad, run_id)
        batches = shard_batches(ids, settings.backup_shards, settings.batch_sessions)
        if not batches:
            done = services.pg.finish_run(run_id)
            return {"status": done.status.value, "run_id": run_id, "sessions": 0, "batches": 0}
        header = [batch_task.si(run_id, shard, batch, flag) for shard, batch in batches]
        _dispatch_chord(header, run_id)
        services.pg.mark_run_dispatched(run_id)
    return {"status": "running", "run_id": run_id, "sessions": len(ids), "batches": len(batches)}


def shard_batches(
    session_ids: Sequence[str], shards: int, batch_size: int
) -> list[tuple[int, list[str]]]:
    """Sessions grouped by shard, then cut into batches: one task per batch.

    A chord of one task per session would be 100,000 tasks for 100,000
    sessions (Celery issues #3808, #4983: slow and memory-hungry chords);
    batches keep it to sessions / batch_size.
    """
    by_shard: dict[int, list[str]] = {}
    for sid in session_ids:
        by_shard.setdefault(shard_of(sid, shards), []).append(sid)
    return [
        (shard, ids[start : start + batch_size])
        for shard, ids in sorted(by_shard.items())
        for start in range(0, len(ids), batch_size)
    ]


def _dispatch_chord(header: list[Any], run_id: str) -> None:
    callback = finish_run.s(run_id).on_error(fail_run.s(run_id))
    chord(header)(callback)


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
