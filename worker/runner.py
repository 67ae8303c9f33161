"""Whole runs in this process (`--local`), through the run layer (worker.runs).

The Celery tasks (worker.tasks) take the same steps spread over workers; both
leave the same records: a persistence_snapshots row that is `running` from the
start, per-session results as batches finish, and totals at the end.
"""

from __future__ import annotations

import contextlib
import threading
import uuid
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import replace
from typing import Any, Protocol

import psycopg

from worker import runs
from worker.connections import connect_postgres
from worker.errors import DndError, LockTimeout, Terminated
from worker.models import Run, RunOptions, SessionResult
from worker.pg_store import PostgresStore
from worker.records import parse_session_id
from worker.services import Services, open_postgres


class Progress(Protocol):
    def start(self, run: Run, total: int) -> None: ...

    def advance(self, results: Sequence[SessionResult]) -> None: ...


class NoProgress:
    def start(self, run: Run, total: int) -> None:
        pass

    def advance(self, results: Sequence[SessionResult]) -> None:
        pass


def run_local(
    services: Services,
    options: RunOptions,
    *,
    session_ids: Sequence[str] | None = None,
    progress: Progress | None = None,
    details: Mapping[str, Any] | None = None,
) -> Run:
    """A whole run in this process: start it, work through its batches, finish it.

    ``options`` say which kind of run (worker.models.BackupOptions, ...);
    ``session_ids``: the sessions to cover (None: all of them). Raises
    RunInProgress for a run over all sessions while another one of the kind
    runs.
    """
    ids = None if session_ids is None else [parse_session_id(sid) for sid in session_ids]
    run_id = str(uuid.uuid4())
    info = {"mode": "local", "worker": services.worker_name, **(details or {})}
    # This process owns the run from before its record exists until it ends:
    # if the process dies, or PostgreSQL drops its connection, the lock goes
    # with it and the run is known to be abandoned (worker/runs.py).
    options = runs.settle_moment(services.pg, options)
    with runs.owning(services.pg, runs.owner_key(run_id)):
        started = runs.start(services, options, session_ids=ids, run_id=run_id, details=info)
        with _finish_on_error(services, started.run):
            _run_batches(services, options, started, progress or NoProgress())
        return runs.finish(services, run_id)


def _run_batches(
    services: Services, options: RunOptions, started: runs.StartedRun, progress: Progress
) -> None:
    run = started.run
    # One process is one queue: batches follow the sessions' order, not shards.
    batches = runs.cut_batches(started.session_ids, 1, services.settings.batch_sessions)

    def work(on: Services, batch: runs.Batch) -> list[SessionResult]:
        try:
            return runs.run_batch(on, options, run.id, batch.session_ids, explicit=started.explicit)
        except LockTimeout as exc:
            # Another run held these sessions too long: they fail, the others go on.
            return runs.fail_batch(
                on.pg, run.id, batch.session_ids, str(exc), worker=on.worker_name
            )

    progress.start(run, len(started.session_ids))
    _work_through(services, batches, work, progress)


def _work_through(
    services: Services,
    batches: list[runs.Batch],
    work: Callable[[Services, runs.Batch], list[SessionResult]],
    progress: Progress,
) -> None:
    """Every batch, reported as it ends: in turn, or on LOCAL_CONNECTIONS threads.

    With LOCAL_CONNECTIONS above 1, batches run on that many threads, each with
    a PostgreSQL connection of its own: while one thread waits for PostgreSQL to
    take its COPY, another parses (a backup is CPU on both sides at once; one
    pipeline leaves one side idle part of the time). The Redis client is shared
    (redis-py's pool is thread-safe).
    """
    threads = min(services.settings.local_connections, len(batches))
    if threads <= 1:
        for batch in batches:
            progress.advance(work(services, batch))
        return
    with _thread_services(services) as per_thread:
        pool = ThreadPoolExecutor(threads, thread_name_prefix="batch")
        futures = [pool.submit(lambda b: work(per_thread(), b), batch) for batch in batches]
        try:
            for future in as_completed(futures):
                progress.advance(future.result())
        except BaseException:
            # Stop now (Ctrl-C, SIGTERM, an error): batches not started are
            # dropped; the run is marked failed without waiting for the ones
            # at work, whose transactions roll back if the process exits.
            pool.shutdown(wait=False, cancel_futures=True)
            raise
        pool.shutdown(wait=True)


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

    yield current
    # Only on success: after an error, threads may still be using them (they
    # close with the process, or when collected).
    for conn in opened:
        conn.close()


class _finish_on_error:  # noqa: N801 - used as a context manager, reads like one
    """Mark the run failed if the block raises (a server went away, Ctrl-C, SIGTERM)."""

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
        reason = _why_stopped(exc)
        try:
            self.services.pg.finish_run(self.run.id, error=reason)
        except DndError:
            # Our connection is what failed (PostgreSQL restarted, failed over,
            # or dropped it): try once on a new one. If that fails too, the
            # run's owner lock went with the old connection, so the next run
            # finds this one abandoned and marks it failed (worker/runs.py).
            with contextlib.suppress(DndError), open_postgres(self.services.settings) as pg:
                pg.finish_run(self.run.id, error=reason)


def _why_stopped(exc: BaseException) -> str:
    if isinstance(exc, Terminated):
        return "interrupted: the process was asked to stop (SIGTERM)"
    if isinstance(exc, KeyboardInterrupt):
        return "interrupted (Ctrl-C)"
    return str(exc) or type(exc).__name__
