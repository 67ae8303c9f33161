"""Wiring: the two stores, opened from the settings, for one process or one task."""

from __future__ import annotations

import contextlib
import os
import socket
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import psycopg

from worker.connections import connect_data_redis, connect_postgres, data_redis_label
from worker.keys import RedisKeys
from worker.migrate import require_schema
from worker.pg_store import PostgresStore
from worker.redis_store import RedisStore
from worker.settings import Settings
from worker.sharding import shard_of


@dataclass
class Services:
    settings: Settings
    pg: PostgresStore
    redis: RedisStore
    worker_name: str

    def shard(self, session_id: str) -> int:
        return shard_of(session_id, self.settings.backup_shards)


def local_worker_name() -> str:
    """How a run done in this process (--local) names its worker in results."""
    return f"local@{socket.gethostname()}:{os.getpid()}"


def redis_store(
    settings: Settings, url: str | None = None, prefix: str | None = None
) -> RedisStore:
    client = connect_data_redis(settings, url)
    # How errors name it: the URL, or behind Sentinel the primary they name.
    label = url or data_redis_label(settings)
    keys = RedisKeys(settings.redis_key_prefix if prefix is None else prefix)
    return RedisStore(client, keys, label)


@contextlib.contextmanager
def open_services(
    settings: Settings,
    *,
    conn: psycopg.Connection[Any] | None = None,
    worker_name: str | None = None,
) -> Iterator[Services]:
    """Both stores, connected. ``conn``: use this PostgreSQL connection (from a pool)."""
    own_conn = conn is None
    pg_conn = connect_postgres(settings) if conn is None else conn
    try:
        pg = PostgresStore(pg_conn, settings)
        if own_conn:
            require_schema(pg)
        store = redis_store(settings)
        try:
            yield Services(
                settings=settings,
                pg=pg,
                redis=store,
                worker_name=worker_name or local_worker_name(),
            )
        finally:
            store.client.close()
    finally:
        if own_conn:
            pg_conn.close()


@contextlib.contextmanager
def open_postgres(settings: Settings) -> Iterator[PostgresStore]:
    """Only the PostgreSQL store (for commands that never touch Redis)."""
    conn = connect_postgres(settings)
    try:
        pg = PostgresStore(conn, settings)
        require_schema(pg)
        yield pg
    finally:
        conn.close()
