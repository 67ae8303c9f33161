"""Opening connections to PostgreSQL and Redis, and translating their errors.

The translation happens here, at the boundary: callers above the stores see
only :mod:`worker.errors`, with messages that name the server and the setting
to check, and never a password.
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Iterator
from typing import Any

import psycopg
import psycopg.errors
import redis
import redis.exceptions

from worker.errors import (
    LockTimeout,
    SchemaNotReady,
    ServiceUnavailable,
    StoreError,
)
from worker.settings import Settings, passwords_in, redact_url, secrets_of

APPLICATION_NAME = "dnd-client-worker"


def postgres_kwargs(settings: Settings) -> dict[str, Any]:
    """Connection parameters every PostgreSQL connection of ours gets."""
    # Celery's time limits cannot interrupt a call blocked inside libpq (Celery
    # issue #3878), so the server itself must give up: statement_timeout bounds
    # a query, lock_timeout bounds waiting for another run's session lock.
    options = (
        f"-c statement_timeout={settings.statement_timeout_ms} "
        f"-c lock_timeout={settings.lock_timeout_ms} "
        "-c idle_in_transaction_session_timeout=600000"
    )
    return {
        "autocommit": True,
        "application_name": APPLICATION_NAME,
        "options": options,
        "connect_timeout": 10,
        # Notice a dead server or a dropped network within about a minute
        # instead of hanging on a half-open socket.
        "keepalives": 1,
        "keepalives_idle": 30,
        "keepalives_interval": 10,
        "keepalives_count": 3,
    }


def connect_postgres(settings: Settings) -> psycopg.Connection[Any]:
    with postgres_errors(settings):
        return psycopg.connect(settings.database_url, **postgres_kwargs(settings))


def connect_redis(url: str, *, setting: str = "REDIS_URL") -> redis.Redis:
    """A Redis client for the application's data: raw bytes in, raw bytes out."""
    client = redis.Redis.from_url(
        url,
        # RESP2: redis-py 8 speaks RESP3 by default, where every zset score of a
        # backup's reads goes through a slow conversion in Python (measured:
        # 0.95 -> 0.57 us per message read with RESP2).
        protocol=2,
        decode_responses=False,
        socket_connect_timeout=10,
        socket_timeout=120,
        socket_keepalive=True,
        health_check_interval=30,
        retry_on_timeout=False,
    )
    with redis_errors(url, setting):
        client.ping()
    return client


def one_line(text: str) -> str:
    return re.sub(r"\s+", " ", text).strip()


def scrub(text: str, settings: Settings) -> str:
    """``text`` with every configured password replaced by ``***``."""
    for secret in secrets_of(settings):
        text = text.replace(secret, "***")
    return text


@contextlib.contextmanager
def postgres_errors(settings: Settings) -> Iterator[None]:
    """Translate psycopg errors raised inside the block into ours."""
    try:
        yield
    except psycopg.errors.LockNotAvailable as exc:
        raise LockTimeout(
            "another backup or restore held the session lock longer than "
            f"DATABASE_LOCK_TIMEOUT_MS ({settings.lock_timeout_ms} ms): "
            f"{scrub(one_line(str(exc)), settings)}"
        ) from exc
    except psycopg.errors.QueryCanceled as exc:
        raise StoreError(
            "PostgreSQL cancelled a statement (DATABASE_STATEMENT_TIMEOUT_MS is "
            f"{settings.statement_timeout_ms} ms): {scrub(one_line(str(exc)), settings)}"
        ) from exc
    except (psycopg.errors.UndefinedTable, psycopg.errors.UndefinedColumn) as exc:
        # No tables at all, or a migration this code needs is still pending.
        raise SchemaNotReady(
            "the database schema is missing or out of date; run `dnd-client migrate up` "
            f"({scrub(one_line(str(exc)), settings)})"
        ) from exc
    except (psycopg.OperationalError, psycopg.InterfaceError) as exc:
        raise ServiceUnavailable(
            "PostgreSQL",
            settings.database_url_setting,
            f"{redact_url(settings.database_url)}: {scrub(one_line(str(exc)), settings)}",
        ) from exc
    except psycopg.Error as exc:
        raise StoreError(f"PostgreSQL: {scrub(one_line(str(exc)), settings)}") from exc


@contextlib.contextmanager
def redis_errors(url: str, setting: str = "REDIS_URL") -> Iterator[None]:
    """Translate redis-py errors raised inside the block into ours."""
    try:
        yield
    except (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError) as exc:
        detail = one_line(str(exc))
        for password in passwords_in([url]):
            detail = detail.replace(password, "***")
        raise ServiceUnavailable("Redis", setting, f"{redact_url(url)}: {detail}") from exc
    except redis.exceptions.RedisError as exc:
        raise StoreError(f"Redis: {one_line(str(exc))}") from exc
