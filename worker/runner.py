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
from typing import Any, Protocol

import psycopg

from worker.connections import connect_postgres
from worker.errors import DndError, LockTimeout
from worker.models import KeptRecord, Run, RunKind, SessionResult
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

    def batch(on: Services, run_id: str, sessions: list[str], explicit: bool) -> BatchResults:
        return on.backup_engine().backup_batch(run_id, sessions, full=full, explicit=explicit)

    return _run(services, "backup", session_id, batch, progress, {"full": full, **(details or {})})


def restore_run(
    services: Services,
    *,
    session_id: str | None = None,
    force: bool = False,
    progress: Progress | None = None,
    details: dict[str, Any] | None = None,
) -> Run:
    """Restore one session or every live (not soft-deleted) session in PostgreSQL."""

    def batch(on: Services, run_id: str, sessions: list[str], explicit: bool) -> BatchResults:
        return on.restore_engine().restore_batch(run_id, sessions, force=force, explicit=explicit)

    return _run(services, "restore", session_id, batch, progress, details or {}, forced=force)


def verify_run(
    services: Services,
    *,
    session_id: str | None = None,
    quick: bool = False,
    progress: Progress | None = None,
    details: dict[str, Any] | None = None,
) -> Run:
    """Compare Redis with PostgreSQL for one session, or for every session in either."""

    def batch(on: Services, run_id: str, sessions: list[str], _explicit: bool) -> BatchResults:
        return on.verify_engine().verify_batch(run_id, sessions, quick=quick)

    info = {"quick": quick, **(details or {})}
    return _run(services, "verify", session_id, batch, progress, info)


def full_run_sessions(
    services: Services, kind: RunKind
) -> tuple[list[str], list[KeptRecord], dict[str, Any]]:
    """What a full run of ``kind`` covers: (session IDs, bad set members, run details).

    Backups cover the sessions set (a member that is no session ID is kept
    aside), restores the live sessions in PostgreSQL, verifies both. The Celery
    coordinators (worker.tasks) use this too.
    """
    if kind == "backup":
        ids, bad = services.backup_engine().listed_sessions()
        return ids, bad, {}
    if kind == "restore":
        ids = [sid for page in services.pg.live_session_ids() for sid in page]
        return ids, [], {"soft_deleted_not_restored": services.pg.count_soft_deleted()}
    return services.verify_engine().session_ids(), [], {}


BatchResults = list[SessionResult]
RunBatch = Callable[[Services, str, list[str], bool], BatchResults]


def _run(
    services: Services,
    kind: RunKind,
    session_id: str | None,
    run_batch: RunBatch,
    progress: Progress | None,
    details: dict[str, Any],
    *,
    forced: bool = False,
) -> Run:
    """Start the run's record, cover its sessions batch by batch, finish it."""
    pg = services.pg
    info = {"mode": "local", **details}
    if session_id is not None:
        session_id = parse_session_id(session_id)
        run = pg.start_run(
            kind, "session", forced=forced, expected_sessions=1,
            details={**info, "session_id": session_id},
        )  # fmt: skip
        ids = [session_id]
    else:
        ids, bad, extra = full_run_sessions(services, kind)
        run = pg.start_run(
            kind, "all", forced=forced, expected_sessions=len(ids), kept=len(bad),
            details={**info, **extra},
        )  # fmt: skip
        pg.keep_records(bad, run.id)
    explicit = session_id is not None

    def work(on: Services, sessions: list[str]) -> BatchResults:
        return run_batch(on, run.id, sessions, explicit)

    return _run_batches(services, run, ids, work, progress or NoProgress())


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
    results = services.engine().failed(batch, error)
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
