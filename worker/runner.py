"""Whole runs in this process (`--local`): list, batch, record, finish.

The Celery tasks (worker.tasks) do the same steps spread over workers; both
leave the same records: a persistence_snapshots row that is `running` from the
start, per-session results as batches finish, and totals at the end.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import replace
from datetime import UTC, datetime
from typing import Any, Protocol

import psycopg

from worker.connections import connect_postgres
from worker.errors import DndError, LockTimeout
from worker.models import Run, SessionResult, SessionStatus
from worker.pg_store import PostgresStore
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
        ids = [session_id]
    else:
        ids, bad = engine.list_sessions()
        run = pg.start_run("backup", "all", expected_sessions=len(ids), kept=len(bad), details=info)
        pg.keep_records(bad, run.id)
    explicit = session_id is not None

    def batch(on: Services, sessions: list[str]) -> list[SessionResult]:
        return on.backup_engine().backup_batch(run.id, sessions, full=full, explicit=explicit)

    return _run_batches(services, run, ids, batch, progress)


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
    explicit = session_id is not None

    def batch(on: Services, sessions: list[str]) -> list[SessionResult]:
        return on.restore_engine().restore_batch(run.id, sessions, force=force, explicit=explicit)

    return _run_batches(services, run, ids, batch, progress)


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

    def batch(on: Services, sessions: list[str]) -> list[SessionResult]:
        return on.verify_engine().verify_batch(run.id, sessions, quick=quick)

    return _run_batches(services, run, ids, batch, progress)


BatchWork = Callable[[Services, list[str]], list[SessionResult]]


def _run_batches(
    services: Services, run: Run, ids: Sequence[str], work: BatchWork, progress: Progress
) -> Run:
    """Run ``work`` over the run's sessions, batch by batch, then finish the run.

    With LOCAL_CONNECTIONS above 1, batches run on that many threads, each with
    a PostgreSQL connection of its own: while one thread waits for PostgreSQL to
    take its COPY, another parses (a backup is CPU on both sides at once; one
    pipeline leaves one side idle part of the time). The Redis client is shared
    (redis-py's pool is thread-safe). Results are reported as batches finish.
    """
    batches = list(chunked(ids, services.settings.batch_sessions))
    progress.start(run, len(ids))
    threads = min(services.settings.local_connections, len(batches))
    with _finish_on_error(services, run):
        if threads <= 1:
            for sessions in batches:
                progress.advance(_one_batch(services, run, sessions, work))
        else:
            with (
                _thread_services(services) as per_thread,
                ThreadPoolExecutor(threads, thread_name_prefix="batch") as pool,
            ):
                futures = [
                    pool.submit(lambda b: _one_batch(per_thread(), run, b, work), sessions)
                    for sessions in batches
                ]
                try:
                    for future in as_completed(futures):
                        progress.advance(future.result())
                except BaseException:
                    for future in futures:
                        future.cancel()  # batches not started yet; running ones finish
                    raise
    return services.pg.finish_run(run.id)


def _one_batch(
    services: Services, run: Run, sessions: list[str], work: BatchWork
) -> list[SessionResult]:
    try:
        return work(services, sessions)
    except LockTimeout as exc:
        return _failed(services, run.id, sessions, str(exc))


@contextlib.contextmanager
def _thread_services(services: Services) -> Iterator[Callable[[], Services]]:
    """A Services per thread, on a PostgreSQL connection of its own; all closed at the end."""
    local = threading.local()
    opened: list[psycopg.Connection[Any]] = []
    lock = threading.Lock()

    def current() -> Services:
        mine = getattr(local, "services", None)
        if mine is None:
            conn = connect_postgres(services.settings)
            with lock:
                opened.append(conn)
            mine = local.services = replace(services, pg=PostgresStore(conn, services.settings))
        return mine

    try:
        yield current
    finally:
        for conn in opened:
            conn.close()


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
