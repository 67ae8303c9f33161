"""Per-process resources of a Celery worker: a PostgreSQL pool and a Redis client.

Celery's prefork pool forks child processes from the main one; a libpq socket
or a Redis socket shared across a fork is corrupted by whichever process talks
first. So nothing is opened at import: ``after_fork`` (hooked to
``worker_process_init``) forgets anything inherited and opens the pool in the
child, without waiting, so a child starts even while PostgreSQL is down (its
tasks then fail with ServiceUnavailable and are retried).
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from typing import Any

from psycopg_pool import ConnectionPool, PoolTimeout

from worker.connections import postgres_errors, postgres_kwargs
from worker.errors import ServiceUnavailable
from worker.migrate import require_schema
from worker.pg_store import PostgresStore
from worker.redis_store import RedisStore
from worker.services import Services, redis_store
from worker.settings import Settings, get_settings, redact_url

_pool: ConnectionPool | None = None
_redis: RedisStore | None = None
_owner_pid: int | None = None
_schema_ready = False


def after_fork(settings: Settings | None = None) -> None:
    """Forget resources inherited from the parent and open this process's own."""
    global _pool, _redis, _owner_pid
    # Never close inherited objects: that would close the parent's sockets.
    _pool, _redis, _owner_pid = None, None, os.getpid()
    _open_pool(settings or get_settings())


def close() -> None:
    global _pool, _redis
    if _owner_pid == os.getpid():
        if _pool is not None:
            _pool.close(timeout=5)
        if _redis is not None:
            _redis.client.close()
    _pool, _redis = None, None


def _open_pool(settings: Settings) -> ConnectionPool:
    global _pool, _owner_pid
    pool = ConnectionPool(
        settings.database_url,
        # A prefork child runs one task at a time; the extra connection serves
        # run bookkeeping while a batch holds its transaction.
        min_size=1,
        max_size=max(2, min(settings.pool_size, 4)),
        kwargs=postgres_kwargs(settings),
        open=False,
        name=f"dnd-worker-{os.getpid()}",
        check=ConnectionPool.check_connection,
        # A connection goes back to the pool holding no owner lock, whatever
        # happened to the task that used it (worker/runs.py: owners).
        reset=_release_owner_locks,
        timeout=30,
        # While PostgreSQL is away the pool keeps trying to reconnect in the
        # background (psycopg_pool's default: with back-off, for 5 minutes).
    )
    pool.open(wait=False)
    _pool, _owner_pid = pool, os.getpid()
    return pool


def _release_owner_locks(conn: Any) -> None:
    conn.execute("SELECT pg_advisory_unlock_all()")


@contextlib.contextmanager
def task_services(worker_name: str) -> Iterator[Services]:
    """Both stores for one task, on a pooled PostgreSQL connection."""
    global _redis
    settings = get_settings()
    if _owner_pid != os.getpid() or _pool is None:
        after_fork(settings)  # solo/threads pools, or first use in this process
    assert _pool is not None
    if _redis is None:
        _redis = redis_store(settings)
    with _connection(_pool, settings) as conn, postgres_errors(settings):
        pg = PostgresStore(conn, settings)
        _require_schema_once(pg)
        yield Services(settings=settings, pg=pg, redis=_redis, worker_name=worker_name)


def _require_schema_once(pg: PostgresStore) -> None:
    """The schema check, until it passes once in this process (a release migrates once)."""
    global _schema_ready
    if not _schema_ready:
        require_schema(pg)
        _schema_ready = True


@contextlib.contextmanager
def _connection(pool: ConnectionPool, settings: Settings) -> Iterator[Any]:
    try:
        with pool.connection(timeout=20) as conn:
            yield conn
    except PoolTimeout:
        raise ServiceUnavailable(
            "PostgreSQL",
            settings.database_url_setting,
            f"no connection to {redact_url(settings.database_url)} within 20 s",
        ) from None
