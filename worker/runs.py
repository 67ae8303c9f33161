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

A kind of run is one engine class and one line of :data:`KINDS`. The options of
a run (``--full``, ``--force``, ``--quick``) are a worker.models.RunOptions,
given to the engine when it is made; they also say which kind the run is.
"""

from __future__ import annotations

import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from worker.backup import BackupEngine
from worker.engine import Engine
from worker.models import (
    BackupOptions,
    RestoreOptions,
    Run,
    RunKind,
    RunOptions,
    RunScope,
    SessionResult,
    VerifyOptions,
)
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
    run, created = services.pg.ensure_run(
        options.kind,
        scope_of(session_ids),
        run_id=run_id or str(uuid.uuid4()),
        forced=options.forced,
        expected_sessions=len(ids),
        kept=len(kept),
        details=info,
    )
    if created:
        services.pg.keep_records(kept, run.id)
    return StartedRun(run, created, ids)


def cut_batches(session_ids: Sequence[str], shards: int, batch_size: int) -> list[Batch]:
    """Sessions grouped by shard, then cut into batches of at most ``batch_size``.

    One batch is one transaction and, on the workers, one task on the shard's
    queue. A chord of one task per session would be 100,000 tasks for 100,000
    sessions (Celery issues #3808, #4983: slow and memory-hungry chords);
    batches keep it to sessions / batch_size.
    """
    by_shard: dict[int, list[str]] = {}
    for sid in session_ids:
        by_shard.setdefault(shard_of(sid, shards), []).append(sid)
    return [
        Batch(shard, ids[first : first + batch_size])
        for shard, ids in sorted(by_shard.items())
        for first in range(0, len(ids), batch_size)
    ]


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
    services: Services, options: RunOptions, run_id: str, session_ids: Sequence[str], error: str
) -> list[SessionResult]:
    """Record a batch as failed as a whole (it will not be tried again)."""
    results = make_engine(services, options).failed(sorted(set(session_ids)), error)
    services.pg.record_results(run_id, results)
    return results


def finish(services: Services, run_id: str, error: str | None = None) -> Run:
    """Complete the run's record from its per-session results (once; later calls return it)."""
    return services.pg.finish_run(run_id, error=error)
