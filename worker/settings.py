"""Settings: one frozen dataclass, built once from the environment.

Every environment variable the project reads is named in ``Settings.from_env``
and documented, with its default, in the README's settings table. Nothing else
in the package reads ``os.environ``.
"""

from __future__ import annotations

import functools
import os
import re
import tempfile
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from urllib.parse import quote, unquote, urlsplit, urlunsplit

from worker.errors import ConfigError

DEFAULT_REDIS_URL = "redis://localhost:6379/0"
DEFAULT_KEY_PREFIX = "dnd:"
# The broker and the result store default to other database indexes of the same
# local Redis, so Celery's own keys never mix with the application's data.
DEFAULT_BROKER_URL = "redis://localhost:6379/1"
DEFAULT_RESULT_BACKEND = "redis://localhost:6379/2"
DEFAULT_BACKUP_SCHEDULE = "0 * * * *"
# libpq also takes the password as a URL query parameter: ...?password=secret
_QUERY_PASSWORD_RE = re.compile(r"((?:^|&)password=)([^&]*)")

# The original (Go) design's PostgreSQL variables and their defaults.
POSTGRES_DEFAULTS = {
    "POSTGRES_HOST": "localhost:5432",
    "POSTGRES_USER": "dnd",
    "POSTGRES_PASSWORD": "password",
    "POSTGRES_DBNAME": "dnd_client",
    "POSTGRES_SSLMODE": "disable",
}


@dataclass(frozen=True, slots=True, repr=False)
class Settings:
    redis_url: str = DEFAULT_REDIS_URL
    redis_key_prefix: str = DEFAULT_KEY_PREFIX
    database_url: str = ""
    broker_url: str = DEFAULT_BROKER_URL
    result_backend: str = DEFAULT_RESULT_BACKEND
    # Where a setting's value came from matters for error messages: "check
    # DATABASE_URL" is wrong advice when the URL was built from POSTGRES_*.
    database_url_setting: str = "DATABASE_URL"

    # -- the engine ---------------------------------------------------------
    # Sessions handled in one PostgreSQL transaction (and, up to run_max_batches
    # batches per run, one Celery task).
    batch_sessions: int = 200
    # The most batch tasks a full run on the workers is cut into (the chord's
    # header): beyond run_max_batches x batch_sessions sessions, a batch task
    # takes more sessions and works through them one transaction of
    # batch_sessions at a time.
    run_max_batches: int = 256
    # Messages moved per Redis round trip; bounds memory for huge sessions.
    chunk_messages: int = 5000

    # -- PostgreSQL ---------------------------------------------------------
    pool_size: int = 4
    # PostgreSQL connections (one thread each) a --local run works with at once.
    local_connections: int = 2
    # Celery's time limits cannot interrupt a driver call blocked in C (Celery
    # issue #3878), so the server must give up on its own.
    statement_timeout_ms: int = 600_000
    lock_timeout_ms: int = 60_000

    # -- Celery -------------------------------------------------------------
    backup_schedule: str = DEFAULT_BACKUP_SCHEDULE
    prune_schedule: str = ""
    prune_keep_days: int = 30
    backup_shards: int = 8
    # Queue names are f"{queue_prefix}default" and f"{queue_prefix}shard.N".
    queue_prefix: str = "dnd."
    # Prefix of every key Celery writes in a Redis broker / result store.
    celery_key_prefix: str = ""
    # Queues that producers in other languages send to (celery-node, gocelery:
    # Celery's default queue, `celery`): workers consume them too. () = none.
    producer_queues: tuple[str, ...] = ("celery",)
    # Retries of a task that met a transient error (server down, lock held),
    # with exponential back-off capped at 2 minutes: 12 is about 15 minutes.
    task_max_retries: int = 12
    # Both limits stay under RabbitMQ's default consumer_timeout (30 min).
    task_soft_time_limit_s: int = 1200
    task_time_limit_s: int = 1500
    # Longer than the longest task (see worker/celery_config.py).
    broker_visibility_timeout_s: int = 1800
    # How often beat has a worker look at the running runs: finish those whose
    # sessions all reported, fail --local runs whose process died, send again
    # the batches of workers that died or messages a broker lost.
    supervise_interval_s: int = 10
    # The last resort: a run still `running` with no progress for this long.
    stale_run_after_s: int = 3600
    result_expires_s: int = 86_400
    beat_schedule_file: str = os.path.join(tempfile.gettempdir(), "dnd-client-celerybeat-schedule")

    def __repr__(self) -> str:
        # Settings end up in logs and tracebacks: never with a password in them.
        fields = []
        for name in self.__dataclass_fields__:
            value = getattr(self, name)
            if isinstance(value, str) and "://" in value:
                value = redact_url(value)
            fields.append(f"{name}={value!r}")
        return f"Settings({', '.join(fields)})"

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> Settings:
        env = os.environ if environ is None else environ
        d = cls()  # the defaults (class attributes are slot descriptors)
        database_url, database_setting = _database_url(env)
        prefix = env.get("REDIS_KEY_PREFIX", DEFAULT_KEY_PREFIX)
        _check_prefix(prefix)
        settings = cls(
            redis_url=_url(env, "REDIS_URL", DEFAULT_REDIS_URL, ("redis", "rediss", "unix")),
            redis_key_prefix=prefix,
            database_url=database_url,
            database_url_setting=database_setting,
            broker_url=_url(
                env,
                "CELERY_BROKER_URL",
                DEFAULT_BROKER_URL,
                ("redis", "rediss", "amqp", "amqps", "pyamqp", "memory"),
            ),
            result_backend=_url(
                env,
                "CELERY_RESULT_BACKEND",
                DEFAULT_RESULT_BACKEND,
                ("redis", "rediss", "rpc", "cache+memory"),
            ),
            batch_sessions=_int(env, "BACKUP_BATCH_SESSIONS", d.batch_sessions, 1, 10_000),
            run_max_batches=_int(env, "RUN_MAX_BATCHES", d.run_max_batches, 1, 100_000),
            chunk_messages=_int(env, "BACKUP_CHUNK_MESSAGES", d.chunk_messages, 10, 1_000_000),
            pool_size=_int(env, "DATABASE_POOL_SIZE", d.pool_size, 1, 100),
            local_connections=_int(env, "LOCAL_CONNECTIONS", d.local_connections, 1, 32),
            statement_timeout_ms=_int(
                env, "DATABASE_STATEMENT_TIMEOUT_MS", d.statement_timeout_ms, 0, 86_400_000
            ),
            lock_timeout_ms=_int(env, "DATABASE_LOCK_TIMEOUT_MS", d.lock_timeout_ms, 0, 86_400_000),
            backup_schedule=env.get("BACKUP_SCHEDULE", DEFAULT_BACKUP_SCHEDULE).strip(),
            prune_schedule=env.get("PRUNE_SCHEDULE", "").strip(),
            prune_keep_days=_int(env, "PRUNE_KEEP_DAYS", d.prune_keep_days, 1, 100_000),
            backup_shards=_int(env, "BACKUP_SHARDS", d.backup_shards, 1, 1024),
            queue_prefix=_name(env, "CELERY_QUEUE_PREFIX", d.queue_prefix),
            celery_key_prefix=_name(env, "CELERY_KEY_PREFIX", d.celery_key_prefix),
            producer_queues=_queue_names(env, "CELERY_PRODUCER_QUEUES", d.producer_queues),
            broker_visibility_timeout_s=_int(
                env, "BROKER_VISIBILITY_TIMEOUT", d.broker_visibility_timeout_s, 5, 604_800
            ),
            beat_schedule_file=env.get("BEAT_SCHEDULE_FILE", "").strip() or d.beat_schedule_file,
            task_max_retries=_int(env, "TASK_MAX_RETRIES", d.task_max_retries, 0, 1000),
            task_soft_time_limit_s=_int(
                env, "TASK_SOFT_TIME_LIMIT", d.task_soft_time_limit_s, 1, 604_800
            ),
            task_time_limit_s=_int(env, "TASK_TIME_LIMIT", d.task_time_limit_s, 1, 604_800),
            stale_run_after_s=_int(env, "STALE_RUN_AFTER", d.stale_run_after_s, 10, 604_800),
            supervise_interval_s=_int(env, "SUPERVISE_INTERVAL", d.supervise_interval_s, 1, 3600),
            result_expires_s=_int(env, "CELERY_RESULT_EXPIRES", d.result_expires_s, 60, 2_592_000),
        )
        if settings.task_time_limit_s <= settings.task_soft_time_limit_s:
            raise ConfigError(
                "TASK_TIME_LIMIT must be greater than TASK_SOFT_TIME_LIMIT "
                f"({settings.task_time_limit_s} <= {settings.task_soft_time_limit_s})"
            )
        for name, value in (
            ("BROKER_VISIBILITY_TIMEOUT", settings.broker_visibility_timeout_s),
            ("STALE_RUN_AFTER", settings.stale_run_after_s),
        ):
            if value <= settings.task_time_limit_s:
                raise ConfigError(
                    f"{name} ({value} s) must be longer than TASK_TIME_LIMIT "
                    f"({settings.task_time_limit_s} s), the longest a task may run"
                )
        return settings


@functools.cache
def get_settings() -> Settings:
    """The process's settings, parsed from the environment on first use."""
    return Settings.from_env()


def redact_url(url: str) -> str:
    """``url`` with its password replaced by ``***``, safe to print or log."""
    try:
        parts = urlsplit(url)
        port = parts.port  # raises ValueError for a port that is not a number
    except ValueError:
        return "<unparseable URL>"
    query = _QUERY_PASSWORD_RE.sub(r"\1***", parts.query)
    if parts.password is None:
        return url if query == parts.query else urlunsplit(parts._replace(query=query))
    host = parts.hostname or ""
    if ":" in host:  # IPv6 literal
        host = f"[{host}]"
    if port is not None:
        host = f"{host}:{port}"
    user = parts.username or ""
    return urlunsplit(parts._replace(netloc=f"{user}:***@{host}", query=query))


def secrets_of(settings: Settings) -> list[str]:
    """Every password found in the settings' URLs, for scrubbing free text."""
    return passwords_in(
        (settings.redis_url, settings.database_url, settings.broker_url, settings.result_backend)
    )


def passwords_in(urls: Iterable[str]) -> list[str]:
    """The passwords written in URLs (user:password@, ?password=), in every form."""
    found: list[str] = []
    for url in urls:
        try:
            parts = urlsplit(url)
            written = [parts.password or ""]
        except ValueError:
            continue
        written += [m.group(2) for m in _QUERY_PASSWORD_RE.finditer(parts.query)]
        # As written in the URL (percent-encoded) and as the server sees it.
        for secret in written:
            for form in (secret, unquote(secret)):
                if form and form not in found:
                    found.append(form)
    return found


def _database_url(env: Mapping[str, str]) -> tuple[str, str]:
    url = env.get("DATABASE_URL", "").strip()
    if url:
        try:
            scheme = urlsplit(url).scheme
        except ValueError:
            raise ConfigError("DATABASE_URL is not a valid URL") from None
        if scheme not in ("postgres", "postgresql"):
            raise ConfigError(f"DATABASE_URL must start with postgresql:// (got scheme {scheme!r})")
        return url, "DATABASE_URL"
    values = {name: env.get(name, default) for name, default in POSTGRES_DEFAULTS.items()}
    host = values["POSTGRES_HOST"]
    if not re.fullmatch(r"[\w.\-]+(:\d{1,5})?|\[[0-9a-fA-F:]+\](:\d{1,5})?", host):
        raise ConfigError(f"POSTGRES_HOST must be host or host:port (got {host!r})")
    sslmode = values["POSTGRES_SSLMODE"]
    allowed_sslmodes = ("disable", "allow", "prefer", "require", "verify-ca", "verify-full")
    if sslmode not in allowed_sslmodes:
        raise ConfigError(f"POSTGRES_SSLMODE must be one of {', '.join(allowed_sslmodes)}")
    user = quote(values["POSTGRES_USER"], safe="")
    password = quote(values["POSTGRES_PASSWORD"], safe="")
    auth = f"{user}:{password}@" if password else f"{user}@"
    dbname = quote(values["POSTGRES_DBNAME"], safe="")
    url = f"postgresql://{auth}{host}/{dbname}?sslmode={sslmode}"
    return url, "POSTGRES_HOST/POSTGRES_USER/POSTGRES_PASSWORD/POSTGRES_DBNAME"


def _url(env: Mapping[str, str], name: str, default: str, schemes: tuple[str, ...]) -> str:
    value = env.get(name, "").strip() or default
    try:
        scheme = urlsplit(value).scheme
    except ValueError as exc:
        raise ConfigError(f"{name} is not a valid URL") from exc
    if scheme not in schemes:
        raise ConfigError(
            f"{name} must be a URL starting with one of "
            f"{', '.join(s + '://' for s in schemes)} (got {redact_url(value)!r})"
        )
    return value


def _int(env: Mapping[str, str], name: str, default: int, low: int, high: int) -> int:
    raw = env.get(name, "").strip()
    if not raw:
        return default
    try:
        value = int(raw)
    except ValueError:
        raise ConfigError(f"{name} must be an integer (got {raw!r})") from None
    if not low <= value <= high:
        raise ConfigError(f"{name} must be between {low} and {high} (got {value})")
    return value


def _name(env: Mapping[str, str], name: str, default: str) -> str:
    value = env.get(name, default).strip()
    if not re.fullmatch(r"[A-Za-z0-9_.:\-]*", value):
        raise ConfigError(f"{name} may hold only letters, digits and . _ : - (got {value!r})")
    return value


def _queue_names(env: Mapping[str, str], name: str, default: tuple[str, ...]) -> tuple[str, ...]:
    """A comma-separated list of queue names; unset: ``default``, empty: none."""
    raw = env.get(name)
    if raw is None:
        return default
    names: list[str] = []
    for item in raw.split(","):
        queue = item.strip()
        if not queue or queue in names:
            continue
        if not re.fullmatch(r"[A-Za-z0-9_.:\-]+", queue):
            raise ConfigError(
                f"{name}: a queue name may hold only letters, digits and . _ : - (got {queue!r})"
            )
        if queue.startswith("amq."):
            raise ConfigError(f"{name}: RabbitMQ reserves names starting with amq. (got {queue!r})")
        names.append(queue)
    return tuple(names)


def _check_prefix(prefix: str) -> None:
    # Glob characters would make our SCAN patterns match other applications'
    # keys; whitespace is almost certainly a mistake in a .env file.
    if any(ch in prefix for ch in "*?[]{} \t\r\n"):
        raise ConfigError(
            f"REDIS_KEY_PREFIX must not contain glob characters, braces or spaces (got {prefix!r})"
        )
