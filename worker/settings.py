"""Settings: one frozen dataclass, built once from the environment.

Every environment variable the project reads is named in ``Settings.from_env``
(those that can hold a password also as ``<NAME>_FILE``, see
worker/secret_files.py) and documented, with its default, in the README's
settings table. Nothing else in the package reads ``os.environ``.
"""

from __future__ import annotations

import functools
import glob
import os
import re
import tempfile
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from urllib.parse import quote, unquote, urlsplit, urlunsplit

from worker.errors import ConfigError
from worker.secret_files import SECRET_VARIABLES, SecretFileError, with_secret_files

DEFAULT_REDIS_URL = "redis://localhost:6379/0"
DEFAULT_KEY_PREFIX = "dnd:"
# The broker and the result store default to other database indexes of the same
# local Redis, so Celery's own keys never mix with the application's data.
DEFAULT_BROKER_URL = "redis://localhost:6379/1"
DEFAULT_RESULT_BACKEND = "redis://localhost:6379/2"
DEFAULT_BACKUP_SCHEDULE = "0 * * * *"
# Where beat serves the Prometheus metrics (docs/operations.md, "Monitoring").
# 9808 is not among the ports the Prometheus wiki lists as taken by exporters.
DEFAULT_METRICS_PORT = 9808
# The settings that can hold a password, each also read from <NAME>_FILE.
SETTINGS_SECRETS = tuple(name for name in SECRET_VARIABLES if name != "FLOWER_BASIC_AUTH")
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
    # REDIS_URL names one node of a Redis Cluster; the others are discovered.
    redis_cluster: bool = False
    database_url: str = ""
    broker_url: str = DEFAULT_BROKER_URL
    result_backend: str = DEFAULT_RESULT_BACKEND
    # Where a setting's value came from matters for error messages: "check
    # DATABASE_URL" is wrong advice when the URL was built from POSTGRES_*.
    database_url_setting: str = "DATABASE_URL"

    # -- Redis Sentinel -----------------------------------------------------
    # (host, port) of each sentinel that watches the application's Redis; ()
    # when REDIS_URL names the server itself. With sentinels, REDIS_URL gives
    # only the primary's credentials, database index and TLS (rediss://).
    redis_sentinels: tuple[tuple[str, int], ...] = ()
    redis_sentinel_master: str = ""
    # The sentinels' own password (their requirepass), not the primary's.
    redis_sentinel_password: str = ""
    # The master name of a sentinel:// broker and result backend.
    celery_sentinel_master: str = ""

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
    # History older than this many days folds into the state at the window's
    # start, hourly (0: history is kept for ever).
    history_keep_days: int = 0
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
    # Signed task messages (Celery's `auth` serializer): the private key and
    # certificate this process signs with, and the certificates (a path or a
    # glob) whose signatures it accepts. All three, or none (no signing).
    security_key: str = ""
    security_certificate: str = ""
    security_cert_store: str = ""
    beat_schedule_file: str = os.path.join(tempfile.gettempdir(), "dnd-client-celerybeat-schedule")

    # -- continuous protection and monitoring -------------------------------
    # Back up changed sessions within seconds (worker/watch.py); off: only
    # the scheduled backups run.
    continuous_backup: bool = True
    # The recovery point to hold: `dnd-client status` exits non-zero above it,
    # and the alert in deploy/prometheus/alerts.yml fires above it.
    continuous_max_lag_s: float = 5.0
    # How often every session is compared with its watermark: the bound on the
    # lag when a keyspace notification is lost (plus the time of a drain).
    continuous_sweep_interval_s: int = 30
    # Set notify-keyspace-events with CONFIG SET when it lacks what the
    # watcher needs (0: never change the server's configuration; sweep only).
    continuous_set_notifications: bool = True
    # Beat serves the Prometheus metrics on this port (0: it does not).
    metrics_port: int = DEFAULT_METRICS_PORT
    # ...on this address: every interface, so that Prometheus can reach it.
    metrics_address: str = "0.0.0.0"  # noqa: S104 - metrics carry no secret

    def __repr__(self) -> str:
        # Settings end up in logs and tracebacks: never with a password in them.
        fields = []
        for name in self.__dataclass_fields__:
            value = getattr(self, name)
            if isinstance(value, str) and "://" in value:
                value = redact_url(value)
            elif name == "redis_sentinel_password" and value:
                value = "***"
            fields.append(f"{name}={value!r}")
        return f"Settings({', '.join(fields)})"

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> Settings:
        env = _resolve_secret_files(os.environ if environ is None else environ)
        d = cls()  # the defaults (class attributes are slot descriptors)
        database_url, database_setting = _database_url(env)
        prefix = env.get("REDIS_KEY_PREFIX", DEFAULT_KEY_PREFIX)
        _check_prefix(prefix)
        sentinels, sentinel_master = _sentinels(env)
        settings = cls(
            redis_url=_url(env, "REDIS_URL", DEFAULT_REDIS_URL, ("redis", "rediss", "unix")),
            redis_key_prefix=prefix,
            redis_cluster=_bool(env, "REDIS_CLUSTER", d.redis_cluster),
            database_url=database_url,
            database_url_setting=database_setting,
            broker_url=_url(
                env,
                "CELERY_BROKER_URL",
                DEFAULT_BROKER_URL,
                ("redis", "rediss", "sentinel", "amqp", "amqps", "pyamqp", "memory"),
            ),
            result_backend=_url(
                env,
                "CELERY_RESULT_BACKEND",
                DEFAULT_RESULT_BACKEND,
                ("redis", "rediss", "sentinel", "rpc", "cache+memory"),
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
            history_keep_days=_int(env, "HISTORY_KEEP_DAYS", d.history_keep_days, 0, 100_000),
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
            continuous_backup=_bool(env, "CONTINUOUS_BACKUP", d.continuous_backup),
            continuous_max_lag_s=_float(
                env, "CONTINUOUS_MAX_LAG", d.continuous_max_lag_s, 0.1, 86_400
            ),
            continuous_sweep_interval_s=_int(
                env, "CONTINUOUS_SWEEP_INTERVAL", d.continuous_sweep_interval_s, 1, 86_400
            ),
            continuous_set_notifications=_bool(
                env, "CONTINUOUS_SET_NOTIFICATIONS", d.continuous_set_notifications
            ),
            metrics_port=_int(env, "METRICS_PORT", d.metrics_port, 0, 65535),
            metrics_address=env.get("METRICS_ADDRESS", "").strip() or d.metrics_address,
            redis_sentinels=sentinels,
            redis_sentinel_master=sentinel_master,
            redis_sentinel_password=env.get("REDIS_SENTINEL_PASSWORD", ""),
            celery_sentinel_master=_name(env, "CELERY_SENTINEL_MASTER", "") or sentinel_master,
            **_signing(env),
        )
        _check_sentinel_urls(settings)
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
    """``url`` with its password replaced by ``***``, safe to print or log.

    A list of URLs separated by ``;`` (Celery's ``sentinel://`` form) has each redacted.
    """
    if ";" in url:
        return ";".join(redact_url(part) for part in url.split(";"))
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
    found = passwords_in(
        (settings.redis_url, settings.database_url, settings.broker_url, settings.result_backend)
    )
    if settings.redis_sentinel_password and settings.redis_sentinel_password not in found:
        found.append(settings.redis_sentinel_password)
    return found


def passwords_in(urls: Iterable[str]) -> list[str]:
    """The passwords written in URLs (user:password@, ?password=), in every form."""
    found: list[str] = []
    for url in (part for listed in urls for part in listed.split(";")):
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


def _resolve_secret_files(env: Mapping[str, str]) -> Mapping[str, str]:
    """Each ``<NAME>_FILE`` of a setting that can hold a password, read (worker.secret_files)."""
    try:
        # FLOWER_BASIC_AUTH_FILE is Flower's, read by worker.flower_guard.
        return with_secret_files(env, SETTINGS_SECRETS)
    except SecretFileError as exc:
        raise ConfigError(str(exc)) from None


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


def _float(env: Mapping[str, str], name: str, default: float, low: float, high: float) -> float:
    raw = env.get(name, "").strip()
    if not raw:
        return default
    try:
        value = float(raw)
    except ValueError:
        raise ConfigError(f"{name} must be a number of seconds (got {raw!r})") from None
    if not low <= value <= high:  # also refuses nan
        raise ConfigError(f"{name} must be between {low:g} and {high:g} (got {raw})")
    return value


_TRUE = ("1", "true", "yes", "on")
_FALSE = ("0", "false", "no", "off")


def _bool(env: Mapping[str, str], name: str, default: bool) -> bool:
    raw = env.get(name, "").strip().lower()
    if not raw:
        return default
    if raw in _TRUE:
        return True
    if raw in _FALSE:
        return False
    raise ConfigError(f"{name} must be 1 or 0 (or true/false, yes/no, on/off; got {raw!r})")


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


_SIGNING_VARIABLES = {
    "security_key": "CELERY_SECURITY_KEY",
    "security_certificate": "CELERY_SECURITY_CERTIFICATE",
    "security_cert_store": "CELERY_SECURITY_CERT_STORE",
}


def _signing(env: Mapping[str, str]) -> dict[str, str]:
    """The three signing paths: all set and readable, or none set."""
    values = {field: env.get(name, "").strip() for field, name in _SIGNING_VARIABLES.items()}
    missing = [_SIGNING_VARIABLES[field] for field, value in values.items() if not value]
    if len(missing) == len(values):
        return values
    if missing:
        given = [name for name in _SIGNING_VARIABLES.values() if name not in missing]
        raise ConfigError(
            f"signed task messages need {', '.join(_SIGNING_VARIABLES.values())} together: "
            f"{', '.join(given)} set, {', '.join(missing)} not"
        )
    for field in ("security_key", "security_certificate"):
        if not os.path.isfile(values[field]) or not os.access(values[field], os.R_OK):
            raise ConfigError(
                f"{_SIGNING_VARIABLES[field]}: cannot read the file {values[field]!r}"
            )
    if not glob.glob(values["security_cert_store"]):
        raise ConfigError(
            f"CELERY_SECURITY_CERT_STORE: no certificate file matches "
            f"{values['security_cert_store']!r} (a file, or a glob like /certs/*.pem)"
        )
    return values


def _check_prefix(prefix: str) -> None:
    # Glob characters would make our SCAN patterns match other applications'
    # keys; whitespace is almost certainly a mistake in a .env file.
    if any(ch in prefix for ch in "*?[]{} \t\r\n"):
        raise ConfigError(
            f"REDIS_KEY_PREFIX must not contain glob characters, braces or spaces (got {prefix!r})"
        )


def _sentinels(env: Mapping[str, str]) -> tuple[tuple[tuple[str, int], ...], str]:
    """REDIS_SENTINELS and REDIS_SENTINEL_MASTER, checked together."""
    raw = env.get("REDIS_SENTINELS", "").strip()
    master = _name(env, "REDIS_SENTINEL_MASTER", "")
    sentinels = tuple(
        _host_port("REDIS_SENTINELS", item) for item in raw.split(",") if item.strip()
    )
    if sentinels and not master:
        raise ConfigError("REDIS_SENTINELS needs REDIS_SENTINEL_MASTER (the primary's name)")
    if master and not sentinels:
        raise ConfigError("REDIS_SENTINEL_MASTER needs REDIS_SENTINELS (host:port,host:port)")
    return sentinels, master


def _host_port(name: str, item: str) -> tuple[str, int]:
    match = re.fullmatch(r"\s*([\w.\-]+|\[[0-9a-fA-F:]+\]):(\d{1,5})\s*", item)
    if match is None or not 0 < int(match.group(2)) < 65536:
        raise ConfigError(f"{name}: each entry must be host:port (got {item.strip()!r})")
    return match.group(1).strip("[]"), int(match.group(2))


def _check_sentinel_urls(settings: Settings) -> None:
    """A sentinel:// broker or result backend: every part sentinel://, and a master name."""
    if settings.redis_sentinels and settings.redis_cluster:
        # A cluster fails over on its own; Sentinel watches one primary.
        raise ConfigError("REDIS_CLUSTER and REDIS_SENTINELS cannot both be set: choose one")
    if settings.redis_sentinels and not settings.redis_url.startswith(("redis://", "rediss://")):
        raise ConfigError(
            "with REDIS_SENTINELS, REDIS_URL gives the primary's password, database and TLS: "
            "it must start with redis:// or rediss://"
        )
    for name, url in (
        ("CELERY_BROKER_URL", settings.broker_url),
        ("CELERY_RESULT_BACKEND", settings.result_backend),
    ):
        if not url.startswith("sentinel://"):
            continue
        if any(not part.strip().startswith("sentinel://") for part in url.split(";")):
            raise ConfigError(
                f"{name}: list sentinels as sentinel://host:port;sentinel://host:port "
                f"(got {redact_url(url)!r})"
            )
        if not settings.celery_sentinel_master:
            raise ConfigError(
                f"{name} is a sentinel:// URL: set CELERY_SENTINEL_MASTER "
                "(or REDIS_SENTINEL_MASTER) to the master's name"
            )
