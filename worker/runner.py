"""Whole runs in this process (`--local`): list, batch, record, finish.

The Celery tasks (worker.tasks) do the same steps spread over workers; both
leave the same records: a persistence_snapshots row that is `running` from the
start, per-session results as batches finish, and totals at the end.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from datetime import UTC, datetime
from typing import Any, Protocol

from worker.errors import DndError, LockTimeout
from worker.models import Run, SessionResult, SessionStatus
from worker.records import parse_session_id
from worker.services import Services


class Progress(Protocol):
    def start(self, run: Run, total: int) -> None: ...

    def advance(self, results: Sequence[SessionResult]) -> None: ...


class NoProgress:
    def start(self, run: Run, total: int) -> None:
        pass

    def advance(self, results: Sequence[SessionResult]) -> None:
        pass


def chunked(items: Sequence[str], size: int) -> Iterator[list[str]]:
    for start in range(0, len(items), size):
        yield list(items[start : start + size])


def backup_run(
    services: Services,
    *,
    session_id: str | None = None,
    full: bool = False,
    progress: Progress | None = None,
    details: dict[str, Any] | None = None,
) -> Run:
    """Back up one session (``session_id``) or every session in the sessions set."""
    progress = progress or NoProgress()
    pg = services.pg
    engine = services.backup_engine()
    if session_id is not None:
        session_id = parse_session_id(session_id)
    info = {"mode": "local", "full": full, **(details or {})}
    if session_id is not None:
        run = pg.start_run(
            "backup", "session", expected_sessions=1, details={**info, "session_id": session_id}
        )
        batches: Iterator[list[str]] = iter([[session_id]])
        total = 1
    else:
        ids, bad = engine.list_sessions()
        run = pg.start_run("backup", "all", expected_sessions=len(ids), kept=len(bad), details=info)
        pg.keep_records(bad, run.id)
        batches = chunked(ids, services.settings.batch_sessions)
        total = len(ids)
    progress.start(run, total)
    with _finish_on_error(services, run):
        for batch in batches:
            try:
                results = engine.backup_batch(
                    run.id, batch, full=full, explicit=session_id is not None
                )
            except LockTimeout as exc:
                results = _failed(services, run.id, batch, str(exc))
            progress.advance(results)
    return pg.finish_run(run.id)


def restore_run(
    services: Services,
    *,
    session_id: str | None = None,
    force: bool = False,
    progress: Progress | None = None,
    details: dict[str, Any] | None = None,
) -> Run:
    """Restore one session or every live (not soft-deleted) session in PostgreSQL."""
    progress = progress or NoProgress()
    pg = services.pg
    engine = services.restore_engine()
    if session_id is not None:
        session_id = parse_session_id(session_id)
    info = {"mode": "local", **(details or {})}
    if session_id is not None:
        run = pg.start_run(
            "restore",
            "session",
            forced=force,
            expected_sessions=1,
            details={**info, "session_id": session_id},
        )
        ids = [session_id]
    else:
        _live, deleted = pg.count_sessions()
        ids = [sid for page in pg.live_session_ids() for sid in page]
        run = pg.start_run(
            "restore",
            "all",
            forced=force,
            expected_sessions=len(ids),
            details={**info, "soft_deleted_not_restored": deleted},
        )
    progress.start(run, len(ids))
    with _finish_on_error(services, run):
        for batch in chunked(ids, services.settings.batch_sessions):
            try:
                results = engine.restore_batch(
                    run.id, batch, force=force, explicit=session_id is not None
                )
            except LockTimeout as exc:
                results = _failed(services, run.id, batch, str(exc))
            progress.advance(results)
    return pg.finish_run(run.id)


def verify_run(
    services: Services,
    *,
    session_id: str | None = None,
    quick: bool = False,
    progress: Progress | None = None,
    details: dict[str, Any] | None = None,
) -> Run:
    """Compare Redis with PostgreSQL for one session, or for every session in either."""
    progress = progress or NoProgress()
    pg = services.pg
    engine = services.verify_engine()
    info = {"mode": "local", "quick": quick, **(details or {})}
    if session_id is not None:
        session_id = parse_session_id(session_id)
        run = pg.start_run(
            "verify", "session", expected_sessions=1, details={**info, "session_id": session_id}
        )
        ids = [session_id]
    else:
        ids = engine.session_ids()
        run = pg.start_run("verify", "all", expected_sessions=len(ids), details=info)
    progress.start(run, len(ids))
    with _finish_on_error(services, run):
        for batch in chunked(ids, services.settings.batch_sessions):
            try:
                results = engine.verify_batch(run.id, batch, quick=quick)
            except LockTimeout as exc:
                results = _failed(services, run.id, batch, str(exc))
            progress.advance(results)
    return pg.finish_run(run.id)


def _failed(
    services: Services, run_id: str, batch: Sequence[str], error: str
) -> list[SessionResult]:
    """A batch that waited too long for its session locks (another run held them).

    The other batches go on; these sessions are failed, and the run with them.
    """
    now = datetime.now(UTC)
    results = [
        SessionResult(
            session_id=sid,
            status=SessionStatus.FAILED,
            error=error,
            shard=services.shard(sid),
            worker=services.worker_name,
            finished_at=now,
        )
        for sid in batch
    ]
    services.pg.record_results(run_id, results)
    return results


class _finish_on_error:  # noqa: N801 - used as a context manager, reads like one
    """Mark the run failed if the block raises (a server went away, Ctrl-C)."""

    def __init__(self, services: Services, run: Run) -> None:
        self.services = services
        self.run = run

    def __enter__(self) -> None:
        return None

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: object
    ) -> None:
        if exc is None:
            return
        reason = "interrupted" if isinstance(exc, KeyboardInterrupt) else str(exc)
        # If PostgreSQL itself is what failed, the run stays `running` until
        # the stale-run sweep marks it failed.
        with contextlib.suppress(DndError):
            self.services.pg.finish_run(self.run.id, error=reason)
