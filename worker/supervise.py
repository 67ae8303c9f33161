"""Keeping runs alive: finish what is done, fail what is abandoned, find lost work.

A run on the workers is its recorded batches (persistence_run_batches). Each
batch's task holds the batch's owner lock while it works (worker/runs.py), so
PostgreSQL knows, at any moment, which batches are being worked on by a live
process. A batch that is not done (some of its sessions have no result), not
held, and not waiting for a retry, is one of:

- *orphaned*: a worker began it after it was last sent, and no one holds it
  now: that worker died (SIGKILL, OOM, a lost host) or lost its connection.
  It is sent again at once. On the Redis broker this is what brings the work
  of a dead worker back within seconds instead of after the broker's
  visibility timeout (30 minutes by default); on RabbitMQ the broker gives
  the message back too, and whichever copy comes second finds nothing to do;
- *lost*: sent more than GRACE_S ago and never begun since. Its message may
  still wait in its queue behind others, or may be gone (a broker restarted
  without its queues, a task acknowledged without running). The caller
  (worker.tasks) sends it again only when its queue is empty.

A batch sent MAX_DISPATCHES times without being finished is given up: its
sessions fail with the reason, and the run ends failed rather than forever
running (a batch that kills its worker each time, say).

A run whose sessions all have results is finished here, whether or not its
chord's callback ever ran. A --local run whose process is gone is marked failed
(worker.runs.abandonment).

This module decides and records; it sends nothing: the Celery side does
(worker.tasks.supervise), so the same review runs in beat's periodic task and
in a CLI that waits on a run that stopped moving.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta

from worker import runs
from worker.models import Run, RunBatch
from worker.pg_store import PostgresStore

log = logging.getLogger(__name__)

# A batch sent this recently, or whose retry was due this recently, is left alone.
GRACE_S = 20
# Sent this many times and never finished: its sessions fail.
MAX_DISPATCHES = 5
# Only one review at a time, whoever runs it.
REVIEW_LOCK = "supervisor"


@dataclass(frozen=True, slots=True)
class Resend:
    """A batch (or a one-session run) to send again, and why."""

    run: Run
    batch: RunBatch
    why: str
    # Lost, not orphaned: it may still be queued; send it only if its queue is empty.
    only_if_queue_empty: bool


@dataclass(slots=True)
class Review:
    """What one look at the running runs found and did."""

    finished: list[Run] = field(default_factory=list)
    abandoned: list[tuple[Run, str]] = field(default_factory=list)
    given_up: list[tuple[RunBatch, str]] = field(default_factory=list)
    resend: list[Resend] = field(default_factory=list)

    def __bool__(self) -> bool:
        return bool(self.finished or self.abandoned or self.given_up or self.resend)


def review_runs(pg: PostgresStore, *, worker: str, now: datetime | None = None) -> Review:
    """Look at every running run once (nothing if another review is under way).

    ``worker`` names who reviews, in the results of sessions it fails.
    """
    review = Review()
    with runs.owning(pg, REVIEW_LOCK) as mine:
        if not mine:
            return review
        moment = now or datetime.now(UTC)
        for run in pg.running_runs():
            if run.details.get("mode") == "local":
                _review_local(pg, run, review)
            else:
                _review_on_workers(pg, run, moment, review, worker)
    return review


def _review_local(pg: PostgresStore, run: Run, review: Review) -> None:
    reason = runs.abandonment(run, pg.live_owners([runs.owner_key(run.id)]))
    if reason is not None:
        pg.finish_run(run.id, error=reason)
        review.abandoned.append((run, reason))


def _review_on_workers(
    pg: PostgresStore, run: Run, now: datetime, review: Review, worker: str
) -> None:
    done = runs.finish_if_complete(pg, run.id)
    if done is not None:
        if done.done:
            review.finished.append(done)
        return
    unfinished = pg.unfinished_batches(run.id)
    keys = [runs.owner_key(run.id)] + [runs.owner_key(run.id, b.batch_no) for b in unfinished]
    live = pg.live_owners(keys)
    if runs.owner_key(run.id) in live:
        return  # its coordinator is still handing it out
    given_up = len(review.given_up)
    for batch in unfinished:
        if runs.owner_key(run.id, batch.batch_no) not in live:
            _review_batch(pg, run, batch, now, review, worker)
    if len(review.given_up) > given_up:
        finished = runs.finish_if_complete(pg, run.id)
        if finished is not None and finished.done:
            review.finished.append(finished)


def _review_batch(
    pg: PostgresStore, run: Run, batch: RunBatch, now: datetime, review: Review, worker: str
) -> None:
    grace = timedelta(seconds=GRACE_S)
    if batch.retry_at is not None and now < batch.retry_at + grace:
        return  # a retry is due: its task waits in a worker for it
    if batch.dispatches >= MAX_DISPATCHES:
        reason = (
            f"given up: the batch was sent {batch.dispatches} times and never finished "
            f"(last error: {batch.last_error or 'none recorded'})"
        )
        missing = pg.sessions_without_result(run.id, batch.session_ids)
        runs.fail_batch(pg, run.id, missing, reason, worker=worker)
        review.given_up.append((batch, reason))
        return
    began_since_sent = batch.started_at is not None and batch.started_at >= batch.dispatched_at
    if began_since_sent:
        why = "its worker stopped before finishing it (killed, or its connection lost)"
        review.resend.append(Resend(run, batch, why, only_if_queue_empty=False))
    elif now - batch.dispatched_at > grace:
        why = f"not begun {int((now - batch.dispatched_at).total_seconds())} s after it was sent"
        review.resend.append(Resend(run, batch, why, only_if_queue_empty=True))


def describe(review: Review) -> Iterator[str]:
    """One line per thing the review found, for the log."""
    for run in review.finished:
        yield f"run {run.id} ({run.kind}) finished: every session has a result ({run.status})"
    for run, reason in review.abandoned:
        yield f"run {run.id} ({run.kind}) marked failed: {reason}"
    for batch, reason in review.given_up:
        yield f"run {batch.run_id} batch {batch.batch_no}: {reason}"
    for resend in review.resend:
        yield f"run {resend.run.id} batch {resend.batch.batch_no}: sending again, {resend.why}"
