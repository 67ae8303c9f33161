"""Opening connections to PostgreSQL and Redis, and translating their errors.

The translation happens here, at the boundary: callers above the stores see
only :mod:`worker.errors`, with messages that name the server and the setting
to check, and never a password.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import re
from collections.abc import Callable, Iterator
from typing import Any, TypeVar

import psycopg
import psycopg.errors
import redis
import redis.exceptions

from worker.errors import (
    DndError,
    LockTimeout,
    SchemaNotReady,
    ServiceUnavailable,
    StoreError,
    TransientError,
)
from worker.settings import Settings, passwords_in, redact_url, secrets_of

APPLICATION_NAME = "dnd-client-worker"

_Method = TypeVar("_Method", bound=Callable[..., Any])
_Class = TypeVar("_Class", bound=type)


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


def postgres_reason(exc: psycopg.Error, settings: Settings) -> str:
    """What went wrong, in one line that holds no data.

    Only the primary message: a psycopg error's str() also carries the DETAIL
    (a unique violation's key, a not-null violation's whole row), the CONTEXT
    (a COPY's line, a message's content among it) and the statement. Errors of
    libpq itself (connecting, a dropped connection) have no primary message:
    their first line, with passwords scrubbed.
    """
    primary = exc.diag.message_primary
    if not primary:
        lines = str(exc).strip().splitlines()
        primary = lines[0] if lines else type(exc).__name__
    return scrub(one_line(primary), settings)


def postgres_error(exc: psycopg.Error, settings: Settings) -> DndError:
    """Ours for a psycopg error (see postgres_reason for what its text may hold)."""
    reason = postgres_reason(exc, settings)
    if isinstance(exc, psycopg.errors.LockNotAvailable):
        return LockTimeout(
            "another backup or restore held the session lock longer than "
            f"DATABASE_LOCK_TIMEOUT_MS ({settings.lock_timeout_ms} ms): {reason}"
        )
    if (exc.sqlstate or "").startswith("40"):
        # Class 40, transaction rollback: a deadlock (40P01), a serialization
        # failure (40001). The same work succeeds when done again. psycopg's
        # DeadlockDetected is not a TransactionRollback subclass (it is an
        # OperationalError, which would read as "cannot reach PostgreSQL"):
        # the SQLSTATE is what tells.
        return TransientError(
            f"PostgreSQL rolled a transaction back: {reason} (SQLSTATE {exc.sqlstate})"
        )
    if isinstance(exc, psycopg.errors.QueryCanceled):
        return StoreError(
            "PostgreSQL cancelled a statement (DATABASE_STATEMENT_TIMEOUT_MS is "
            f"{settings.statement_timeout_ms} ms): {reason}"
        )
    if isinstance(exc, psycopg.errors.UndefinedTable | psycopg.errors.UndefinedColumn):
        # No tables at all, or a migration this code needs is still pending.
        return SchemaNotReady(
            f"the database schema is missing or out of date; run `dnd-client migrate up` ({reason})"
        )
    if isinstance(exc, psycopg.OperationalError | psycopg.InterfaceError):
        return ServiceUnavailable(
            "PostgreSQL",
            settings.database_url_setting,
            f"{redact_url(settings.database_url)}: {reason}",
        )
    code = f" (SQLSTATE {exc.sqlstate})" if exc.sqlstate else ""
    return StoreError(f"PostgreSQL: {reason}{code}")


@contextlib.contextmanager
def postgres_errors(settings: Settings) -> Iterator[None]:
    """Translate psycopg errors raised inside the block into ours."""
    try:
        yield
    except psycopg.Error as exc:
        raise postgres_error(exc, settings) from exc


def postgres_boundary(cls: _Class) -> _Class:
    """Class decorator: the public methods of ``cls`` raise only our errors.

    Every public function defined in the class is wrapped, so a method added
    later is too, without anyone remembering to: plain methods; generator
    methods, whose errors may come while the caller iterates (a COPY streaming
    rows); and ``@contextlib.contextmanager`` methods, whose generator also
    sees the errors of the caller's block (thrown in at its ``yield``).
    Instances must have a ``settings`` attribute (the message names them).
    """
    for name, member in list(vars(cls).items()):
        if name.startswith("_") or not inspect.isfunction(member):
            continue
        if not getattr(member, "translates_own_errors", False):
            setattr(cls, name, _translating(member))
    return cls


def translates_own_errors(method: _Method) -> _Method:
    """Mark a method of a @postgres_boundary class that translates its errors itself.

    For a hot path only (a method called once per message), where the
    boundary's extra call would show in a backup's throughput.
    """
    method.translates_own_errors = True  # type: ignore[attr-defined]
    return method


# The code of every function @contextlib.contextmanager returns.
_CONTEXT_MANAGER_CODE = contextlib.contextmanager(lambda: iter(())).__code__


def _translating(method: Callable[..., Any]) -> Callable[..., Any]:
    if inspect.isgeneratorfunction(method):
        return _translating_generator(method)
    inner = getattr(method, "__wrapped__", None)
    if inspect.isgeneratorfunction(inner):
        if method.__code__ is not _CONTEXT_MANAGER_CODE:
            raise TypeError(f"{method.__qualname__}: cannot translate the errors of its decorator")
        return functools.wraps(method)(contextlib.contextmanager(_translating_generator(inner)))

    @functools.wraps(method)
    def call(self: Any, *args: Any, **kwargs: Any) -> Any:
        try:
            return method(self, *args, **kwargs)
        except psycopg.Error as exc:
            raise postgres_error(exc, self.settings) from exc

    return call


def _translating_generator(method: Callable[..., Iterator[Any]]) -> Callable[..., Iterator[Any]]:
    @functools.wraps(method)
    def generate(self: Any, *args: Any, **kwargs: Any) -> Iterator[Any]:
        try:
            return (yield from method(self, *args, **kwargs))
        except psycopg.Error as exc:
            raise postgres_error(exc, self.settings) from exc

    return generate


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
