"""Celery configuration, built from the settings. Every reliability choice says why.

Kept apart from worker/celery.py so it can be read (and tested) without
starting anything.
"""

from __future__ import annotations

import re
from datetime import timedelta
from typing import Any

from kombu.entity import Exchange, Queue

from worker.errors import ConfigError
from worker.models import RUN_KINDS, RunKind
from worker.settings import Settings
from worker.tls import with_cert_check


def session_task_name(kind: RunKind) -> str:
    """The task that runs one session (``worker.tasks.backup_session``...)."""
    return f"worker.tasks.{kind}_session"


def full_task_name(kind: RunKind) -> str:
    """The task that starts a run over every session (``worker.tasks.full_backup``...)."""
    return f"worker.tasks.full_{kind}"


def batch_task_name(kind: RunKind) -> str:
    """The task that works on one batch of a full run (``worker.tasks.backup_batch``...)."""
    return f"worker.tasks.{kind}_batch"


# Backs up the pending sessions of one shard (worker/continuous.py): its only
# argument is the shard, and it goes to that shard's queue.
CONTINUOUS_DRAIN_TASK = "worker.tasks.continuous_drain"

# Tasks whose first argument is a session ID: routed to the session's shard.
PER_SESSION_TASKS = frozenset(session_task_name(kind) for kind in RUN_KINDS)
# Tasks that carry a `shard` argument (batches of one shard's sessions).
PER_SHARD_TASKS = frozenset(batch_task_name(kind) for kind in RUN_KINDS)


def default_queue(settings: Settings) -> str:
    """Coordinators, chord callbacks and housekeeping go here."""
    return f"{settings.queue_prefix}default"


def shard_queue(settings: Settings, shard: int) -> str:
    return f"{settings.queue_prefix}shard.{shard}"


def all_queues(settings: Settings) -> list[str]:
    """The queues our own tasks are sent to: each needs a consumer (the CLI checks)."""
    return [default_queue(settings)] + [
        shard_queue(settings, n) for n in range(settings.backup_shards)
    ]


def producer_queues(settings: Settings) -> list[str]:
    """Queues producers in other languages send to (CELERY_PRODUCER_QUEUES), not ours.

    celery-node and gocelery send to Celery's default queue, `celery`. Nothing
    of ours is sent there, so the CLI does not check for their consumers; a
    name that is one of our queues already is consumed anyway.
    """
    ours = set(all_queues(settings))
    return [name for name in settings.producer_queues if name not in ours]


def consumed_queues(settings: Settings) -> list[str]:
    """What `celery -A worker worker` consumes without -Q: ours, then the producers'."""
    return all_queues(settings) + producer_queues(settings)


def parse_schedule(text: str, variable: str) -> Any:
    """A 5-field crontab line or a number of seconds, as a Celery schedule (None: off)."""
    from celery.schedules import crontab, schedule

    value = text.strip()
    if value.lower() in ("", "off", "none", "disabled"):
        return None
    if re.fullmatch(r"\d+(\.\d+)?", value):
        seconds = float(value)
        if seconds < 1:
            raise ConfigError(f"{variable} must be at least 1 second (got {text!r})")
        return schedule(timedelta(seconds=seconds))
    fields = value.split()
    if len(fields) != 5:
        raise ConfigError(
            f"{variable} must be a 5-field crontab line like '0 * * * *' or a number of "
            f"seconds like '3600' (got {text!r})"
        )
    minute, hour, day_of_month, month_of_year, day_of_week = fields
    try:
        return crontab(
            minute=minute,
            hour=hour,
            day_of_month=day_of_month,
            month_of_year=month_of_year,
            day_of_week=day_of_week,
        )
    except (ValueError, TypeError) as exc:
        raise ConfigError(f"{variable} is not a valid crontab line ({text!r}): {exc}") from None


def schedule_period_s(text: str) -> float | None:
    """Roughly how often a schedule fires (for expiring stale ticks); None if unknown."""
    value = text.strip()
    if re.fullmatch(r"\d+(\.\d+)?", value):
        return float(value)
    return None


def sentinel_options(settings: Settings) -> dict[str, Any]:
    """Transport options of a sentinel:// broker or result backend (kombu, Celery).

    The URL lists the sentinels (sentinel://h1:26379;sentinel://h2:26379/1)
    and may carry the primary's password (sentinel://:password@h1:26379;...);
    the master's name and the sentinels' own password come from here.
    """
    options: dict[str, Any] = {"master_name": settings.celery_sentinel_master}
    if settings.redis_sentinel_password:
        options["sentinel_kwargs"] = {"password": settings.redis_sentinel_password}
    return options


def build_config(settings: Settings) -> dict[str, Any]:
    # Each queue has its own direct exchange and routing key: a message for
    # shard 3 can only ever land in shard 3's queue. A producer queue is
    # declared the same way, as Celery declares its default queue `celery`
    # (durable, not auto-deleted, no arguments), so that RabbitMQ accepts it
    # from celery-node and gocelery too: they declare it so and publish to the
    # default exchange with the queue's name as routing key. A task arriving
    # there, or on another shard's queue, is still safe: every per-session
    # task takes the session's lock in PostgreSQL.
    queues = [
        Queue(name, Exchange(name, type="direct"), routing_key=name, durable=True)
        for name in consumed_queues(settings)
    ]
    transport_options: dict[str, Any] = {
        # Redis broker: a task taken but not acknowledged (acks_late) is handed
        # to another worker after this long. It must exceed the longest task,
        # or a slow task would run twice at once; and it is how tasks of a
        # worker killed outright (SIGKILL of the whole worker) come back.
        "visibility_timeout": settings.broker_visibility_timeout_s,
        # Look for such abandoned tasks every 30 s (kombu's default is about
        # every 100 s); the check is one cheap sorted-set query.
        "unacked_restore_interval": min(30, max(1, settings.broker_visibility_timeout_s // 4)),
        "unacked_restore_throttle": 1,
    }
    result_options: dict[str, Any] = {}
    if settings.celery_key_prefix:
        # Several deployments (or test runs) can share one Redis this way.
        transport_options["global_keyprefix"] = settings.celery_key_prefix
        result_options["global_keyprefix"] = settings.celery_key_prefix
    if settings.broker_url.startswith("sentinel://"):
        transport_options.update(sentinel_options(settings))
    if settings.result_backend.startswith("sentinel://"):
        result_options.update(sentinel_options(settings))

    config: dict[str, Any] = {
        # rediss:// without ssl_cert_reqs: kombu would connect without checking
        # the certificate (Celery #5371) and the result backend would refuse
        # the URL; both check it, as redis-py does for REDIS_URL.
        "broker_url": with_cert_check(settings.broker_url),
        "result_backend": with_cert_check(settings.result_backend),
        # JSON only: a pickle payload from the broker could run arbitrary code.
        "task_serializer": "json",
        "result_serializer": "json",
        "accept_content": ["json"],
        "result_accept_content": ["json"],
        "timezone": "UTC",
        "enable_utc": True,
        "task_queues": queues,
        "task_default_queue": default_queue(settings),
        "task_default_exchange": default_queue(settings),
        "task_default_routing_key": default_queue(settings),
        "task_routes": (route_task,),
        # Acknowledge a task when it has finished, not when it starts: a task
        # whose worker dies mid-way is delivered again. Our tasks are
        # idempotent (upserts, COPY only of what is not stored), so running
        # one twice is safe; losing one is not.
        "task_acks_late": True,
        # ...and when a pool process is killed (SIGKILL, OOM killer), requeue
        # its task instead of marking it failed.
        "task_reject_on_worker_lost": True,
        # A task may run for minutes: a worker reserves one at a time, so the
        # others stay in the queue for idle workers instead of waiting behind.
        "worker_prefetch_multiplier": 1,
        # With late acks the broker redelivers anything unacknowledged when the
        # connection drops; finishing such tasks would only duplicate work.
        "worker_cancel_long_running_tasks_on_connection_loss": True,
        "broker_connection_retry_on_startup": True,
        "broker_transport_options": transport_options,
        "result_backend_transport_options": result_options,
        # Soft limit: SoftTimeLimitExceeded lets the task roll back cleanly;
        # hard limit: the pool process is killed. Both stay under RabbitMQ's
        # default consumer_timeout (30 min) so an unacked task is not cut off.
        # They cannot interrupt a call blocked in libpq (Celery #3878): the
        # PostgreSQL statement_timeout and lock_timeout cover that.
        "task_soft_time_limit": settings.task_soft_time_limit_s,
        "task_time_limit": settings.task_time_limit_s,
        # Results are for callers waiting on them and for chords; the lasting
        # record is in PostgreSQL. Expire them so Redis does not fill up.
        "result_expires": settings.result_expires_s,
        # No STARTED state: writing it happens before the task runs, and when
        # the result backend cannot take it (down for a second), Celery fails
        # the task without running it, and acknowledges it. Progress lives in
        # PostgreSQL (the run's results), and Flower sees tasks start through
        # events.
        "task_track_started": False,
        # Flower shows workers and tasks from these events.
        "worker_send_task_events": True,
        "task_send_sent_event": True,
        "worker_hijack_root_logger": False,
        "beat_schedule": beat_schedule(settings),
        "beat_schedule_filename": settings.beat_schedule_file,
    }
    if signing_enabled(settings):
        config.update(signing_config(settings))
    return config


def signing_enabled(settings: Settings) -> bool:
    return bool(settings.security_key)


def signing_config(settings: Settings) -> dict[str, Any]:
    """Signed task messages: Celery's `auth` serializer over JSON.

    Every task message is signed with the private key and verified against the
    certificates of the store; a worker accepts nothing else, so an unsigned or
    altered message is refused before it runs. Results stay plain JSON (they
    come from workers, which are trusted to sign). The app must then call
    ``setup_security`` (worker/celery.py does).
    """
    return {
        "task_serializer": "auth",
        "accept_content": ["auth"],
        "security_key": settings.security_key,
        "security_certificate": settings.security_certificate,
        "security_cert_store": settings.security_cert_store,
        "security_digest": "sha256",
    }


def beat_schedule(settings: Settings) -> dict[str, Any]:
    from celery.schedules import schedule

    entries: dict[str, Any] = {}
    backup = parse_schedule(settings.backup_schedule, "BACKUP_SCHEDULE")
    if backup is not None:
        period = schedule_period_s(settings.backup_schedule)
        entries["full-backup"] = {
            "task": "worker.tasks.full_backup",
            "schedule": backup,
            "kwargs": {"trigger": "beat"},
            # A tick that waited in the queue for a whole period is stale: the
            # next one is already due, so drop it rather than pile them up.
            "options": {"expires": period} if period else {},
        }
    # Finish, fail or revive runs whose workers or owners went away
    # (worker/supervise.py): a dead worker's batch is sent again within about
    # this long, on any broker.
    entries["supervise-runs"] = {
        "task": "worker.tasks.supervise_runs",
        "schedule": schedule(timedelta(seconds=settings.supervise_interval_s)),
        "options": {"expires": settings.supervise_interval_s},
    }
    entries["fail-stale-runs"] = {
        "task": "worker.tasks.fail_stale_runs",
        "schedule": schedule(timedelta(seconds=300)),
        "options": {"expires": 300},
    }
    prune = parse_schedule(settings.prune_schedule, "PRUNE_SCHEDULE")
    if prune is not None:
        entries["prune-runs"] = {
            "task": "worker.tasks.prune_runs",
            "schedule": prune,
            "kwargs": {"older_than_days": settings.prune_keep_days},
        }
    if settings.history_keep_days:
        # Fold history older than the window (restores before it are refused).
        entries["prune-history"] = {
            "task": "worker.tasks.prune_history",
            "schedule": schedule(timedelta(hours=1)),
            "kwargs": {"older_than_days": settings.history_keep_days},
            "options": {"expires": 3600},
        }
    return entries


def route_task(
    name: str, args: Any, kwargs: Any, options: Any, task: Any = None, **_: Any
) -> dict[str, str] | None:
    """Send every task about a session to its shard's queue (a pure function of its ID)."""
    from worker.records import parse_session_id
    from worker.settings import get_settings
    from worker.sharding import shard_of

    settings = get_settings()
    if name in PER_SESSION_TASKS:
        session_id = kwargs.get("session_id") if kwargs else None
        if session_id is None and args:
            session_id = args[0]
        # Refuses anything but a UUID before it is sent anywhere.
        canonical = parse_session_id(session_id if isinstance(session_id, str) else "")
        return {"queue": shard_queue(settings, shard_of(canonical, settings.backup_shards))}
    if name == CONTINUOUS_DRAIN_TASK:
        shard = (kwargs or {}).get("shard", args[0] if args else None)
        if isinstance(shard, int):
            return {"queue": shard_queue(settings, shard)}
    if name in PER_SHARD_TASKS:
        shard = kwargs.get("shard") if kwargs else None
        if shard is None and args and len(args) > 1:
            shard = args[1]
        if isinstance(shard, int):
            return {"queue": shard_queue(settings, shard)}
    return None
