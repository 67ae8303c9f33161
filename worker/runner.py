"""Whole runs in this process (`--local`), through the run layer (worker.runs).

The Celery tasks (worker.tasks) take the same steps spread over workers; both
leave the same records: a persistence_snapshots row that is `running` from the
start, per-session results as batches finish, and totals at the end.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import replace
from typing import Any, Protocol

import psycopg

from worker import runs
from worker.connections import connect_postgres
from worker.errors import DndError, LockTimeout
from worker.models import Run, RunOptions, SessionResult
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
    started = runs.start(
        services, options, session_ids=ids, details={"mode": "local", **(details or {})}
    )
    run = started.run
    settings = services.settings
    # One process is one queue: batches follow the sessions' order, not shards.
    batches = runs.cut_batches(started.session_ids, 1, settings.batch_sessions)

    def work(on: Services, batch: runs.Batch) -> list[SessionResult]:
        try:
            return runs.run_batch(on, options, run.id, batch.session_ids, explicit=started.explicit)
        except LockTimeout as exc:
            # Another run held these sessions too long: they fail, the others go on.
            return runs.fail_batch(on, options, run.id, batch.session_ids, str(exc))

    shown = progress or NoProgress()
    shown.start(run, len(started.session_ids))
    with _finish_on_error(services, run):
        _work_through(services, batches, work, shown)
    return runs.finish(services, run.id)


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
    with (
        _thread_services(services) as per_thread,
        ThreadPoolExecutor(threads, thread_name_prefix="batch") as pool,
    ):
        futures = [pool.submit(lambda b: work(per_thread(), b), batch) for batch in batches]
        try:
            for future in as_completed(futures):
                progress.advance(future.result())
        except BaseException:
            for future in futures:
                future.cancel()  # batches not started yet; running ones finish
            raise


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
