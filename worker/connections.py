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
from dataclasses import dataclass
from typing import Any, TypeVar

import psycopg
import psycopg.errors
import redis
import redis.backoff
import redis.cluster
import redis.connection
import redis.exceptions
import redis.retry
import redis.sentinel

from worker.errors import (
    ConfigError,
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


# What every client of the application's data gets: raw bytes in, raw bytes out.
_DATA_CLIENT_OPTIONS: dict[str, Any] = {
    # RESP2: redis-py 8 speaks RESP3 by default, where every zset score of a
    # backup's reads goes through a slow conversion in Python (measured:
    # 0.95 -> 0.57 us per message read with RESP2).
    "protocol": 2,
    "decode_responses": False,
    "socket_connect_timeout": 10,
    "socket_timeout": 120,
    "socket_keepalive": True,
    "health_check_interval": 30,
    "retry_on_timeout": False,
}


def connect_redis(url: str, *, setting: str = "REDIS_URL") -> redis.Redis:
    """A Redis client for the application's data: raw bytes in, raw bytes out."""
    client = redis.Redis.from_url(url, **_DATA_CLIENT_OPTIONS)
    with redis_errors(url, setting):
        client.ping()
    return client


# -- Redis Cluster (REDIS_CLUSTER=1) -----------------------------------------

# A data client: one Redis, or a Redis Cluster (same commands; see redis_store).
DataRedis = redis.Redis | redis.cluster.RedisCluster


def connect_data_redis(
    settings: Settings, url: str | None = None, *, setting: str = "REDIS_URL"
) -> DataRedis:
    """The application's Redis: the primary the sentinels name (REDIS_SENTINELS),
    a RedisCluster (REDIS_CLUSTER=1), or one Redis.

    ``url``: another Redis than the configured one (a drill's target), of the
    same kind. A cluster's URL names one node; redis-py asks it for the others
    and follows MOVED/ASK redirections (resharding, failover).
    """
    if url is None and settings.redis_sentinels:
        return connect_sentinel_primary(RedisTarget.of(settings))
    url = url or settings.redis_url
    if settings.redis_cluster:
        return connect_cluster(url, setting=setting)
    return connect_redis(url, setting=setting)


def data_redis_label(settings: Settings) -> str:
    """How messages name the application's Redis; never a password."""
    return RedisTarget.of(settings).label


def connect_cluster(url: str, *, setting: str = "REDIS_URL") -> redis.cluster.RedisCluster:
    database = redis.connection.parse_url(url).get("db") or 0  # type: ignore[no-untyped-call]
    if int(database) != 0:
        raise ConfigError(f"{setting}: a Redis Cluster has only database 0 (got /{database})")
    with redis_errors(url, setting):
        # Connects to the named node and discovers the others, or raises.
        client = redis.cluster.RedisCluster.from_url(url, **_DATA_CLIENT_OPTIONS)
        client.ping()
    return client


def is_cluster_node(url: str, *, setting: str = "REDIS_URL") -> bool:
    """Whether the Redis at ``url`` is a node of a cluster (INFO cluster)."""
    client = redis.Redis.from_url(url, socket_connect_timeout=10, socket_timeout=30)
    try:
        with redis_errors(url, setting):
            return bool(client.info("cluster").get("cluster_enabled"))
    finally:
        client.close()


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
    except (redis.exceptions.ClusterDownError, redis.exceptions.RedisClusterException) as exc:
        # A cluster without a reachable node, or with slots no node serves.
        detail = one_line(str(exc))
        for password in passwords_in([url]):
            detail = detail.replace(password, "***")
        raise ServiceUnavailable("Redis Cluster", setting, f"{redact_url(url)}: {detail}") from exc
    except redis.exceptions.RedisError as exc:
        raise StoreError(f"Redis: {one_line(str(exc))}") from exc


# -- the application's Redis: one server, or the primary sentinels name --------------


@dataclass(frozen=True, slots=True)
class RedisTarget:
    """Where the application's data lives: REDIS_URL's server, or a primary behind Sentinel.

    With sentinels, REDIS_URL gives only the primary's username, password,
    database index and TLS (rediss://); its host and port are not used.
    """

    url: str
    sentinels: tuple[tuple[str, int], ...] = ()
    master: str = ""
    sentinel_password: str = ""

    @classmethod
    def of(cls, settings: Settings) -> RedisTarget:
        return cls(
            url=settings.redis_url,
            sentinels=settings.redis_sentinels,
            master=settings.redis_sentinel_master,
            sentinel_password=settings.redis_sentinel_password,
        )

    @property
    def label(self) -> str:
        """How messages name it; never a password."""
        if not self.sentinels:
            return redact_url(self.url)
        listed = ",".join(f"{host}:{port}" for host, port in self.sentinels)
        return f"primary {self.master!r} of the sentinels {listed} (REDIS_SENTINELS)"


# Inside one command, ride out a failover (the sentinels' down-after time plus
# the promotion) for about 15 s: each attempt asks the sentinels for the
# primary again. Longer outages fail the command; the task is then retried
# with Celery's back-off (TASK_MAX_RETRIES).
SENTINEL_RETRY_ATTEMPTS = 10
SENTINEL_RETRY_CAP_S = 2.0


def connect_sentinel_primary(target: RedisTarget) -> redis.Redis:
    """A client of the primary the sentinels name, following it across failovers.

    redis-py asks the sentinels for the primary's address on every new
    connection; a connection to a primary that was demoted (READONLY) or died
    is dropped and the next attempt reconnects to the promoted replica.
    """
    kwargs: dict[str, Any] = redis.connection.parse_url(target.url)  # type: ignore[no-untyped-call]
    for name in ("host", "port", "path", "connection_class"):
        kwargs.pop(name, None)
    if target.url.startswith("rediss://"):
        kwargs["ssl"] = True
    sentinel = redis.sentinel.Sentinel(  # type: ignore[no-untyped-call]
        list(target.sentinels),
        sentinel_kwargs={
            "password": target.sentinel_password or None,
            "socket_connect_timeout": 5,
            "socket_timeout": 5,
            # A sentinel that does not answer is skipped for the next one at
            # once (redis-py's default would retry it for seconds first).
            "retry": redis.retry.Retry(redis.backoff.NoBackoff(), 0),
        },
    )
    client: redis.Redis = sentinel.master_for(  # type: ignore[no-untyped-call]
        target.master,
        redis_class=redis.Redis,
        protocol=2,  # see connect_redis
        decode_responses=False,
        socket_connect_timeout=10,
        socket_timeout=120,
        socket_keepalive=True,
        health_check_interval=30,
        retry=redis.retry.Retry(
            redis.backoff.ExponentialWithJitterBackoff(base=0.1, cap=SENTINEL_RETRY_CAP_S),
            SENTINEL_RETRY_ATTEMPTS,
        ),
        **kwargs,
    )
    with redis_errors(target.label, "REDIS_SENTINELS"):
        client.ping()
    return client
