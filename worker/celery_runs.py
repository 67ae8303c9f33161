"""Runs on the Celery workers: the run layer (worker.runs) driven by tasks.

worker.tasks declares the tasks, a few lines each; this module is what they
do, so that every kind of run takes the same steps:

- a **one-session run** (``backup_session``...): the task owns the run's only
  batch while it works, records the run, works, finishes it;
- a **full run** (``full_backup``...): the coordinator records the run and its
  batches in one transaction, then sends one batch task per batch in a chord
  whose callback finishes the run;
- a **batch task** works on a recorded batch; the last batch to end finishes
  the run, so the run ends even if the chord's callback never runs;
- **supervision** (beat's ``supervise_runs``, and a CLI waiting on a run that
  stopped moving) sends again the batches worker.supervise finds orphaned or
  lost.

A task that meets a server down or a session lock held too long is retried
with exponential back-off, and its batch's record says when the retry is due,
so the supervisor leaves it alone meanwhile.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Sequence
from datetime import UTC, datetime, timedelta
from typing import Any, NoReturn

from celery import Task, chord
from celery.exceptions import Ignore
from celery.utils.time import get_exponential_backoff_interval

from worker import process, runs, supervise
from worker.celery import app
from worker.celery_config import (
    batch_task_name,
    session_task_name,
    shard_queue,
)
from worker.errors import DndError, RunInProgress, TransientError
from worker.models import Run, RunKind, RunOptions, SessionResult
from worker.pg_store import PostgresStore
from worker.records import parse_session_id
from worker.services import Services
from worker.settings import get_settings

log = logging.getLogger(__name__)

# Back-off of retried tasks: 1 s, 2 s, 4 s ... capped at 2 minutes, with jitter.
RETRY_BACKOFF_MAX_S = 120


class RunTask(Task):  # type: ignore[misc]
    """A task that works on a batch of a run (a one-session run is one batch).

    When it fails for good (retries exhausted, or an unexpected error), the
    sessions of its batch that have no result fail with the reason, and the
    run is finished if that was all it waited for.
    """

    max_retries = get_settings().task_max_retries
    # How the run's error names the task that failed.
    label = "task"

    def batch_of(
        self, args: Sequence[Any], kwargs: dict[str, Any], task_id: str
    ) -> tuple[str, int]:
        """(run ID, batch number) of a call of this task."""
        raise NotImplementedError

    def on_failure(
        self, exc: BaseException, task_id: str, args: Any, kwargs: Any, einfo: Any
    ) -> None:
        run_id, batch_no = self.batch_of(args, kwargs, task_id)
        error = f"{self.label} {self.name} failed: {describe_error(exc)}"
        fail_batch_quietly(run_id, batch_no, error)


# -- one-session runs -----------------------------------------------------------------


def session_run(
    task: Task, options: RunOptions, session_id: str, run_id: str | None
) -> dict[str, Any]:
    """A run over one session (its ID is the task's unless given); its result dict.

    A copy of the task that arrives late (the broker gave a message back after
    the run ended) answers with the recorded result instead of doing it again:
    a forced restore must not replace the session a second time.
    """
    sid = parse_session_id(session_id)
    run_id = run_id or task.request.id
    try:
        return _session_run(task, options, sid, run_id)
    except TransientError as exc:
        retry_later(task, exc, run_id, 0)


def _session_run(task: Task, options: RunOptions, sid: str, run_id: str) -> dict[str, Any]:
    with (
        process.task_services(worker_name(task)) as services,
        runs.owning(services.pg, runs.owner_key(run_id, 0)) as mine,
    ):
        if not mine:
            raise Ignore()  # another copy works on it now; it stores the result
        recorded = services.pg.get_run(run_id)
        if recorded is not None and recorded.done:
            return _session_answer(services, recorded, sid)
        options = runs.settle_moment(services.pg, options)
        started = runs.start(
            services, options, session_ids=[sid], run_id=run_id, details=run_details(task)
        )
        if started.created:
            runs.hand_out(services, run_id, [runs.Batch(services.shard(sid), [sid])])
        if services.pg.begin_batch(run_id, 0):
            runs.run_batch(services, options, run_id, [sid], explicit=True)
        run = runs.finish(services, run_id)
        return _session_answer(services, run, sid)


def _session_answer(services: Services, run: Run, sid: str) -> dict[str, Any]:
    """The task result of a one-session run: the session's result, and the run's."""
    found = [r for r in services.pg.run_results(run.id) if r.session_id == sid]
    answer = found[0].as_dict() if found else {"session_id": sid, "status": "failed"}
    return {**answer, "run_id": run.id, "run_status": run.status.value}


# -- full runs ------------------------------------------------------------------------


def full_run(task: Task, options: RunOptions, run_id: str | None, trigger: str) -> dict[str, Any]:
    """Start a run over every session: record it and its batches, send them in a chord.

    A retried coordinator finds its run recorded and sends nothing again (the
    supervisor sends what was lost). While another full run of this kind runs,
    returns ``status: skipped``.
    """
    settings = get_settings()
    run_id = run_id or task.request.id
    with (
        process.task_services(worker_name(task)) as services,
        runs.owning(services.pg, runs.owner_key(run_id)) as mine,
    ):
        if not mine:
            return {"status": "running", "run_id": run_id}
        options = runs.settle_moment(services.pg, options)
        try:
            with services.pg.transaction():
                details = run_details(task, trigger=trigger)
                started = runs.start(services, options, run_id=run_id, details=details)
                ids = started.session_ids
                batches = runs.cut_batches(
                    ids, settings.backup_shards, settings.batch_sessions, settings.run_max_batches
                )
                if started.created:
                    runs.hand_out(services, run_id, batches)
        except RunInProgress as busy:
            log.info("full %s not started: %s", options.kind, busy)
            return {"status": "skipped", "reason": str(busy), "running_run_id": busy.run_id}
        if not started.created:
            status = started.run.status.value if started.run.done else "running"
            return {"status": status, "run_id": run_id, "sessions": len(ids)}
        if not batches:
            done = runs.finish(services, run_id)
            return {"status": done.status.value, "run_id": run_id, "sessions": 0, "batches": 0}
        flags = options.as_dict()
        header = [
            app.signature(batch_task_name(options.kind), args=(run_id, b.shard, no, flags))
            for no, b in enumerate(batches)
        ]
        callback = app.signature("worker.tasks.finish_run", kwargs={"run_id": run_id})
        callback.link_error(app.signature("worker.tasks.fail_run", kwargs={"run_id": run_id}))
        chord(header)(callback)
        services.pg.mark_run_dispatched(run_id)
    return {"status": "running", "run_id": run_id, "sessions": len(ids), "batches": len(batches)}


def handed_out_batch(
    task: Task, kind: RunKind, run_id: str, shard: int, batch_no: int, options: dict[str, Any]
) -> dict[str, Any]:
    """A batch task: work on the recorded batch; finish the run if it was the last."""
    try:
        with process.task_services(worker_name(task)) as services:
            results = runs.run_handed_out_batch(
                services, runs.options_for(kind, options), run_id, batch_no
            )
            runs.finish_if_complete(services.pg, run_id)
    except TransientError as exc:
        retry_later(task, exc, run_id, batch_no)
    if results is None:
        return {**batch_summary(shard, []), "note": "another copy of this batch is at work"}
    return batch_summary(shard, results)


def finish_when_complete(run_id: str, worker: str) -> dict[str, Any]:
    """The chord's callback: finish the run if every session has a result.

    A chord part counted twice (a task that ran to its end twice) can fire
    the callback early: then the run is left to its last batch.
    """
    with process.task_services(worker) as services:
        run = runs.finish_if_complete(services.pg, run_id)
    return run.as_dict() if run is not None else {"status": "running", "run_id": run_id}


# -- retries and failures -------------------------------------------------------------


def retry_later(task: Task, exc: TransientError, run_id: str, batch_no: int) -> NoReturn:
    """Retry the task with back-off; the batch's record says when (or fail for good)."""
    retries = task.request.retries
    if retries >= task.max_retries:
        raise exc
    countdown = max(
        1,
        get_exponential_backoff_interval(
            factor=1, retries=retries, maximum=RETRY_BACKOFF_MAX_S, full_jitter=True
        ),
    )
    due = datetime.now(UTC) + timedelta(seconds=countdown)
    # Best effort: when PostgreSQL is what failed, this fails too, and the
    # supervisor (which needs PostgreSQL as well) is not looking meanwhile.
    with contextlib.suppress(DndError), process.task_services(worker_name(task)) as services:
        services.pg.batch_retry_at(run_id, batch_no, due, str(exc))
    raise task.retry(exc=exc, countdown=countdown)


def fail_batch_quietly(run_id: str, batch_no: int, error: str) -> None:
    """A batch failed for good: its sessions without a result fail; the run may finish."""
    # Best effort: if PostgreSQL is what failed, the supervisor does it later
    # (it gives a batch up after it was sent MAX_DISPATCHES times).
    with contextlib.suppress(DndError), process.task_services("errback") as services:
        run = services.pg.get_run(run_id)
        batch = services.pg.batch(run_id, batch_no)
        if run is None or run.done:
            return
        if batch is not None:
            missing = services.pg.sessions_without_result(run_id, batch.session_ids)
            runs.fail_batch(services.pg, run_id, missing, error, worker=services.worker_name)
            runs.finish_if_complete(services.pg, run_id)
        else:
            services.pg.finish_run(run_id, error=error)


def finish_if_complete_quietly(run_id: str) -> None:
    """Finish the run if every session has a result (best effort, as fail_batch_quietly)."""
    with contextlib.suppress(DndError), process.task_services("errback") as services:
        runs.finish_if_complete(services.pg, run_id)


# -- supervision ----------------------------------------------------------------------


def supervise_runs(pg: PostgresStore, worker: str) -> supervise.Review:
    """Review the running runs and send again what is orphaned or lost; what was done.

    The review's ``resend`` holds only the batches actually sent: a lost one
    whose queue still holds messages may be waiting there, and is left.
    """
    review = supervise.review_runs(pg, worker=worker)
    sent = []
    # Each queue's depth as the review found it, asked once: after the first
    # batch sent again, its queue is no longer empty, yet every other batch
    # lost with it (a broker restarted without its queues) is lost all the same.
    depths: dict[str, int | None] = {}
    for resend in review.resend:
        queue = shard_queue(pg.settings, resend.batch.shard)
        if queue not in depths:
            depths[queue] = queue_depth(queue)
        if resend.only_if_queue_empty and depths[queue] != 0:
            continue  # it may be waiting there still
        _send_again(resend)
        pg.batch_redispatched(resend.run.id, resend.batch.batch_no)
        sent.append(resend)
    review.resend = sent
    for line in supervise.describe(review):
        log.warning("%s", line)
    return review


def _send_again(resend: supervise.Resend) -> None:
    run, batch = resend.run, resend.batch
    options = runs.options_from_details(run).as_dict()
    kind: RunKind = run.kind  # type: ignore[assignment]
    if run.scope == "all":
        app.send_task(batch_task_name(kind), args=(run.id, batch.shard, batch.batch_no, options))
        return
    # A one-session run: its task again, under the run's ID (which is the
    # original task's), so whoever waits on that task's result gets this one.
    [sid] = batch.session_ids
    arguments = runs.options_from_details(run).task_arguments()
    kwargs = {"session_id": sid, "run_id": run.id, **arguments}
    app.send_task(session_task_name(kind), kwargs=kwargs, task_id=run.id)


def queue_depth(name: str) -> int | None:
    """Messages ready in a queue (Redis or RabbitMQ); None when it cannot be told.

    A queue the broker does not know holds nothing: on Redis an empty queue
    is no key at all, and a broker restarted without its data knows none.
    """
    try:
        with app.connection_for_read() as conn:
            channel = conn.default_channel
            if conn.transport.driver_type == "redis":
                # LLEN of the queue's lists: kombu's passive declare asks EXISTS,
                # which its global_keyprefix (CELERY_KEY_PREFIX) does not prefix,
                # so with a prefix every queue looked unknown, hence empty, and
                # the supervisor sent again batches that were still queued.
                return int(channel._size(name))
            try:
                declared = channel.queue_declare(queue=name, passive=True)
            except conn.channel_errors:
                return 0
            return int(declared.message_count)
    except Exception:  # noqa: BLE001 - an unknown depth is treated as "not empty"
        return None


# -- small pieces ---------------------------------------------------------------------


def batch_summary(shard: int, results: Sequence[SessionResult]) -> dict[str, Any]:
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


def run_details(task: Task, **extra: Any) -> dict[str, Any]:
    return {"mode": "celery", "task_id": task.request.id, **extra}


def worker_name(task: Task) -> str:
    return str(task.request.hostname or "celery")


def describe_error(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}"
