"""The run layer: what a run is, in one place.

A *run* is one backup, restore or verify, of every session or of named ones,
recorded as a row of persistence_snapshots (its kind, scope, options, status
and totals) with one per-session result per session it covered. Whatever
drives it — this process (`--local`, worker.runner), the Celery workers
(worker.tasks) or the CLI (worker.cli) — goes through the same steps here:

1. :func:`start` records the run (`running`) and lists what it covers: the named
   sessions, or, for a run over all of them, what its engine lists (bad members
   of the sessions set are kept aside at once);
2. :func:`cut_batches` cuts the sessions into batches, per shard;
3. :func:`run_batch` has the kind's engine work on one batch; each session's
   result is recorded as the batch ends;
4. :func:`finish` completes the run's record from its per-session results.

A run has an *owner* known to be alive: whoever drives it holds an advisory
lock in PostgreSQL on its own connection (:func:`owning`), which ends when the
process or its connection does. A `--local` run is owned by its process for
its whole life; a run on the workers by the coordinator task while it hands the
batches out, then by each batch's task while it works (the batches are
recorded, so that a lost one can be sent again: worker/supervise.py). A run
whose owner is gone is *abandoned*; :func:`start` finishes an abandoned run
that blocks a new one instead of refusing.

A kind of run is one engine class and one line of :data:`KINDS`. The options of
a run (``--full``, ``--force``, ``--quick``) are a worker.models.RunOptions,
given to the engine when it is made; they also say which kind the run is.
"""

from __future__ import annotations

import contextlib
import uuid
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, fields, replace
from datetime import UTC, datetime, timedelta
from typing import Any

from worker.backup import BackupEngine
from worker.engine import Engine, failed_results
from worker.errors import DndError, InvalidArgument, RunInProgress
from worker.models import (
    BackupOptions,
    RestoreOptions,
    Run,
    RunKind,
    RunOptions,
    RunScope,
    RunStatus,
    SessionResult,
    VerifyOptions,
)
from worker.pg_store import PostgresStore
from worker.records import RecordRejected, parse_session_id, parse_timestamp
from worker.restore import RestoreEngine
from worker.services import Services
from worker.sharding import shard_of
from worker.verify import VerifyEngine


@dataclass(frozen=True, slots=True)
class RunKindSpec:
    """One kind of run: its engine, its options, and how people are told about it."""

    kind: RunKind
    engine: type[Engine[Any]]
    options: type[RunOptions]
    # What a progress bar says while it runs.
    doing: str


KINDS: Mapping[RunKind, RunKindSpec] = {
    spec.kind: spec
    for spec in (
        RunKindSpec("backup", BackupEngine, BackupOptions, "backing up"),
        RunKindSpec("restore", RestoreEngine, RestoreOptions, "restoring"),
        RunKindSpec("verify", VerifyEngine, VerifyOptions, "verifying"),
    )
}


@dataclass(frozen=True, slots=True)
class StartedRun:
    """A run as recorded when it started, and the sessions it covers."""

    run: Run
    # False when the run was already recorded (a retried task starts it again).
    created: bool
    session_ids: list[str]

    @property
    def explicit(self) -> bool:
        """Sessions named by the caller: one that does not exist is a failure, not a skip."""
        return self.run.scope != "all"


@dataclass(frozen=True, slots=True)
class Batch:
    """Sessions worked on together: one transaction, one Celery task."""

    shard: int
    session_ids: list[str]


def options_for(kind: RunKind, data: Mapping[str, Any] | None = None) -> RunOptions:
    """The options of a run of ``kind`` from their JSON form (as sent to the workers)."""
    return KINDS[kind].options.from_dict(dict(data or {}))


def options_from_details(run: Run) -> RunOptions:
    """The options a run was started with, from its record (they are in its details)."""
    cls = KINDS[run.kind].options  # type: ignore[index]
    names = {f.name for f in fields(cls)}
    return cls.from_dict({k: v for k, v in run.details.items() if k in names})


def settle_moment(pg: PostgresStore, options: RunOptions) -> RunOptions:
    """Options whose ``as_of`` (an RFC 3339 instant or a run ID) is settled to a UTC instant.

    Raises InvalidArgument (one line) for a moment that cannot be read, an
    unknown or unfinished run, a moment in the future, or one older than the
    history kept (naming the oldest restorable moment).
    """
    text = getattr(options, "as_of", None)
    if text is None:
        return options
    moment = _moment_of(pg, str(text))
    if moment > datetime.now(UTC):
        raise InvalidArgument(f"--as-of {text} is in the future")
    oldest = pg.oldest_restorable()
    if oldest is None:
        raise InvalidArgument("no history is kept yet: back up first, then restore as of a moment")
    if moment < oldest:
        raise InvalidArgument(
            f"--as-of {text} is before the history kept: the oldest restorable moment is "
            f"{oldest.astimezone(UTC).isoformat()}"
        )
    return replace(options, as_of=moment.isoformat())  # type: ignore[call-arg]


def _moment_of(pg: PostgresStore, text: str) -> datetime:
    try:
        run_id = parse_session_id(text)  # a run ID is a UUID, as session IDs are
    except InvalidArgument:
        pass
    else:
        exists, finished = pg.run_finished_at(run_id)
        if not exists:
            raise InvalidArgument(f"--as-of: no run {run_id}")
        if finished is None:
            raise InvalidArgument(f"--as-of: run {run_id} has not finished")
        return finished.astimezone(UTC)
    try:
        return parse_timestamp(text, "--as-of")
    except RecordRejected:
        raise InvalidArgument(
            f"--as-of: cannot read {text!r}: give an RFC 3339 instant "
            "(2026-02-12T10:00:00Z) or a run ID"
        ) from None


def make_engine(services: Services, options: RunOptions) -> Engine[Any]:
    """The engine for a run with these options, over these stores."""
    settings = services.settings
    return KINDS[options.kind].engine(
        services.redis,
        services.pg,
        options,
        chunk_messages=settings.chunk_messages,
        shard_of=services.shard,
        worker_name=services.worker_name,
    )


def scope_of(session_ids: Sequence[str] | None) -> RunScope:
    if session_ids is None:
        return "all"
    return "session" if len(session_ids) == 1 else "list"


def start(
    services: Services,
    options: RunOptions,
    *,
    session_ids: Sequence[str] | None = None,
    run_id: str | None = None,
    details: Mapping[str, Any] | None = None,
) -> StartedRun:
    """Record a run (``running``) and list what it covers.

    ``session_ids``: canonical IDs to cover (None: every session, as the kind's
    engine lists them). ``run_id``: the run's ID when the caller chose it (a
    Celery task's ID); a run already recorded under it is returned as it is.
    Raises RunInProgress for a run over all sessions while another run of the
    kind over all sessions is running.
    """
    info = {**options.as_dict(), **(details or {})}
    kept = []
    if session_ids is None:
        coverage = make_engine(services, options).coverage()
        ids, kept, info = coverage.session_ids, coverage.kept, {**info, **coverage.details}
    else:
        ids = sorted(set(session_ids))
        if len(ids) == 1:
            info["session_id"] = ids[0]
    chosen_id = run_id or str(uuid.uuid4())

    def record() -> tuple[Run, bool]:
        return services.pg.ensure_run(
            options.kind, scope_of(session_ids), run_id=chosen_id, forced=options.forced,
            expected_sessions=len(ids), kept=len(kept), details=info, as_of=options.moment,
        )  # fmt: skip

    try:
        run, created = record()
    except RunInProgress as busy:
        # The run in the way may be one whose owner died: then it goes.
        if not finish_if_abandoned(services.pg, busy.run_id):
            raise
        run, created = record()
    if created:
        services.pg.keep_records(kept, run.id)
    return StartedRun(run, created, ids)


def cut_batches(
    session_ids: Sequence[str], shards: int, batch_size: int, max_batches: int | None = None
) -> list[Batch]:
    """Sessions grouped by shard, then cut into batches of ``batch_size`` or more.

    One batch is one task on the shard's queue. A chord of one task per session
    would be 100,000 tasks for 100,000 sessions (Celery issues #3808, #4983:
    slow and memory-hungry chords); batches keep it to sessions / batch_size,
    and ``max_batches`` caps that: a run too big for it gets bigger batches
    (the smallest size that fits), which their tasks work through one
    transaction of ``batch_size`` sessions at a time (:func:`run_handed_out_batch`).
    With more non-empty shards than ``max_batches``, each shard is one batch.
    """
    by_shard: dict[int, list[str]] = {}
    for sid in session_ids:
        by_shard.setdefault(shard_of(sid, shards), []).append(sid)
    size = batch_size
    if max_batches is not None:
        size = batch_size_within([len(ids) for ids in by_shard.values()], batch_size, max_batches)
    return [
        Batch(shard, ids[first : first + size])
        for shard, ids in sorted(by_shard.items())
        for first in range(0, len(ids), size)
    ]


def batch_size_within(per_shard: Sequence[int], batch_size: int, max_batches: int) -> int:
    """The smallest size >= ``batch_size`` that cuts shards of these sizes into at most
    ``max_batches`` batches (or one batch per shard, when even that is more)."""

    def count(size: int) -> int:
        return sum(-(-n // size) for n in per_shard)

    low, high = batch_size, max([batch_size, *per_shard])
    if count(low) <= max_batches:
        return low
    while low < high:  # count() only falls as the size grows
        mid = (low + high) // 2
        if count(mid) <= max_batches:
            high = mid
        else:
            low = mid + 1
    return low


def run_batch(
    services: Services,
    options: RunOptions,
    run_id: str | None,
    session_ids: Sequence[str],
    *,
    explicit: bool = False,
) -> list[SessionResult]:
    """One batch of a run, by the kind's engine; its results are recorded under ``run_id``.

    A TransientError (a server down, a session lock held too long) is raised:
    the caller retries the batch or fails it (:func:`fail_batch`).
    """
    return make_engine(services, options).run_batch(run_id, session_ids, explicit=explicit)


def fail_batch(
    pg: PostgresStore, run_id: str, session_ids: Sequence[str], error: str, *, worker: str
) -> list[SessionResult]:
    """Record sessions of a run as failed (a batch that will not be tried again)."""
    shards = pg.settings.backup_shards
    results = failed_results(
        sorted(set(session_ids)), error, shard_of=lambda sid: shard_of(sid, shards), worker=worker
    )
    pg.record_results(run_id, results)
    return results


def finish(services: Services, run_id: str, error: str | None = None) -> Run:
    """Complete the run's record from its per-session results (once; later calls return it)."""
    return services.pg.finish_run(run_id, error=error)


def finish_if_complete(pg: PostgresStore, run_id: str) -> Run | None:
    """Finish the run once every session it covers has a result; None while some have not.

    Each batch of a run on the workers calls this as it ends, so the run is
    finished by whichever batch is last, whether or not the chord's callback
    ever runs (a lost chord part, a result backend that was down).
    """
    run = pg.get_run(run_id)
    if run is None or run.done:
        return run
    if pg.reported_sessions(run_id) < (run.expected_sessions or 0):
        return None
    return pg.finish_run(run_id)


# -- owners -------------------------------------------------------------------------

# A run handed out so recently that its owner may not have taken its lock yet.
OWNERLESS_GRACE_S = 20


def owner_key(run_id: str, batch_no: int | None = None) -> str:
    """The owner lock of a run (its driver) or of one of its batches (the task at work)."""
    return f"run:{run_id}" if batch_no is None else f"batch:{run_id}:{batch_no}"


@contextlib.contextmanager
def owning(pg: PostgresStore, key: str) -> Iterator[bool]:
    """Hold the owner lock ``key`` while the block runs; False: someone else holds it."""
    mine = pg.try_owner_lock(key)
    try:
        yield mine
    finally:
        if mine:
            # A broken connection has let go of it already.
            with contextlib.suppress(DndError):
                pg.release_owner_lock(key)


def abandonment(run: Run, live: set[str], now: datetime | None = None) -> str | None:
    """Why ``run`` is abandoned (its owner is gone and nothing will finish it), or None.

    A --local run is abandoned as soon as its process's lock is gone. A run on
    the workers is abandoned when its coordinator stopped before handing its
    batches out; once they are out, the batches' own records keep it going
    (worker/supervise.py), so it is never abandoned here.
    """
    if run.status is not RunStatus.RUNNING or owner_key(run.id) in live:
        return None
    if run.details.get("mode") == "local":
        who = run.details.get("worker") or "the process running it"
        return f"abandoned: {who} ended without finishing the run (killed, or its connection lost)"
    now = now or datetime.now(UTC)
    handed_out = run.details.get("dispatched") or run.scope != "all"
    if not handed_out and now - run.created_at > timedelta(seconds=OWNERLESS_GRACE_S):
        return "abandoned: the coordinator task stopped before handing the batches out"
    return None


def finish_if_abandoned(pg: PostgresStore, run_id: str) -> bool:
    """Mark the run failed if it is abandoned; True when it was (a new run may start)."""
    run = pg.get_run(run_id)
    if run is None:
        return False
    reason = abandonment(run, pg.live_owners([owner_key(run_id)]))
    if reason is None:
        return False
    pg.finish_run(run_id, error=reason)
    return True


# -- batches handed out to the workers ------------------------------------------------


def hand_out(services: Services, run_id: str, batches: Sequence[Batch]) -> None:
    """Record a run's batches before their tasks are sent (numbered from 0)."""
    services.pg.save_batches(
        run_id, ((no, batch.shard, batch.session_ids) for no, batch in enumerate(batches))
    )


def run_handed_out_batch(
    services: Services, options: RunOptions, run_id: str, batch_no: int, *, explicit: bool = False
) -> list[SessionResult] | None:
    """A recorded batch, as its task works on it; its results are recorded.

    None: another copy of the task is at work on it right now (it holds the
    batch's owner lock). Sessions that already have a result in the run are not
    done again, so a late copy of a finished batch does nothing.
    """
    with owning(services.pg, owner_key(run_id, batch_no)) as mine:
        if not mine:
            return None
        todo = services.pg.begin_batch(run_id, batch_no)
        # A batch bigger than a transaction (a run cut to at most RUN_MAX_BATCHES)
        # is worked through BACKUP_BATCH_SESSIONS sessions at a time; each part's
        # results are recorded as it ends, so a retried task resumes after them.
        step = services.settings.batch_sessions
        results: list[SessionResult] = []
        for first in range(0, len(todo), step):
            part = todo[first : first + step]
            results += run_batch(services, options, run_id, part, explicit=explicit)
        return results
