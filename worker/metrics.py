"""Prometheus metrics, computed at scrape time from PostgreSQL (and a Celery ping).

Served over HTTP by beat (worker/beat_presence.py, from beat's ``beat_init``
signal) on METRICS_PORT, and so by the dev stack, which runs beat. Every value
is read when Prometheus asks, by :class:`HealthCollector`, from the same
figures as `dnd-client status` (worker/health.py): the recovery point keeps
rising while every worker is dead, since nothing here needs a worker.

Names and units follow Prometheus's conventions (base units, ``_seconds``,
``_total`` for counters, ``_timestamp_seconds`` for points in time). When
PostgreSQL cannot be read, only ``dnd_database_up 0`` is served (and the
workers' count), so an alert on it fires instead of the scrape failing.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator

from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector, CollectorRegistry

from worker.errors import DndError
from worker.health import Health, Workers, assess, read_figures
from worker.models import StatusFigures
from worker.settings import Settings

log = logging.getLogger(__name__)

# Every metric this module exports, for the dashboard and alert tests.
METRIC_NAMES = (
    "dnd_database_up",
    "dnd_recovery_point_seconds",
    "dnd_recovery_point_target_seconds",
    "dnd_pending_sessions",
    "dnd_last_full_backup_timestamp_seconds",
    "dnd_runs_total",
    "dnd_runs_in_progress",
    "dnd_continuous_backups_total",
    "dnd_continuous_messages_total",
    "dnd_kept_records_open",
    "dnd_workers_up",
    "dnd_broker_up",
    "dnd_beat_up",
    "dnd_watcher_up",
    "dnd_watcher_heartbeat_timestamp_seconds",
)
RUN_STATUSES = ("running", "completed", "partial", "failed")


class HealthCollector(Collector):
    """Reads the figures on every scrape; ``ping_workers`` counts the live Celery workers."""

    def __init__(self, settings: Settings, ping_workers: Callable[[], Workers]) -> None:
        self.settings = settings
        self.ping_workers = ping_workers

    def collect(self) -> Iterator[Metric]:
        workers = self.ping_workers()
        yield _gauge(
            "dnd_workers_up",
            "Celery workers consuming this deployment's queues, asked at scrape time",
            workers.count or 0,
        )
        yield _gauge(
            "dnd_broker_up",
            "Whether the Celery broker answered at scrape time (1) or not (0)",
            int(workers.count is not None),
        )
        try:
            figures = read_figures(self.settings)
        except DndError as exc:
            log.warning("metrics: cannot read PostgreSQL: %s", exc)
            yield _gauge("dnd_database_up", "Whether PostgreSQL could be read (1) or not (0)", 0)
            return
        yield _gauge("dnd_database_up", "Whether PostgreSQL could be read (1) or not (0)", 1)
        yield from health_metrics(assess(figures, self.settings, workers))

    def describe(self) -> Iterator[Metric]:
        # No query at registration: the collector is described by collecting.
        return iter(())


def health_metrics(health: Health) -> Iterator[Metric]:
    """Every metric but the workers' and the database's, from one assessment."""
    f = health.figures
    lag = GaugeMetricFamily(
        "dnd_recovery_point_seconds",
        "Age of the oldest change in Redis that may not be in PostgreSQL yet (+Inf: unbounded)",
        labels=["shard"],
        unit="seconds",
    )
    pending = GaugeMetricFamily(
        "dnd_pending_sessions", "Sessions changed and not yet backed up", labels=["shard"]
    )
    backups = CounterMetricFamily(
        "dnd_continuous_backups", "Continuous backups done", labels=["shard"]
    )
    messages = CounterMetricFamily(
        "dnd_continuous_messages", "Messages stored by continuous backups", labels=["shard"]
    )
    for s in health.shards:
        shard = str(s.shard)
        lag.add_metric([shard], s.recovery_point_s)
        pending.add_metric([shard], s.pending_sessions)
        backups.add_metric([shard], s.continuous_backups)
        messages.add_metric([shard], s.continuous_messages)
    yield from (lag, pending, backups, messages)
    yield _gauge(
        "dnd_recovery_point_target_seconds",
        "The recovery point to hold (CONTINUOUS_MAX_LAG)",
        health.max_lag_s,
    )
    yield from _run_metrics(f)
    yield _gauge(
        "dnd_kept_records_open", "Kept-aside records not resolved yet", f.open_kept_records
    )
    yield _gauge("dnd_beat_up", "Whether beat holds its lock in PostgreSQL", int(f.beat_alive))
    yield _gauge(
        "dnd_watcher_up",
        "Whether the continuous watcher's heartbeat is fresh",
        int(health.watcher_alive),
    )
    if f.watcher is not None:
        yield _gauge(
            "dnd_watcher_heartbeat_timestamp_seconds",
            "When the continuous watcher last said it was alive",
            f.watcher.heartbeat_at.timestamp(),
        )


def _run_metrics(f: StatusFigures) -> Iterator[Metric]:
    runs = CounterMetricFamily(
        "dnd_runs",
        "Runs recorded in persistence_snapshots, by kind and status (pruning resets it)",
        labels=["kind", "status"],
    )
    for count in f.run_counts:
        runs.add_metric([count.kind, count.status], count.runs)
    yield runs
    in_progress = GaugeMetricFamily("dnd_runs_in_progress", "Runs running now", labels=["kind"])
    by_kind: dict[str, int] = {"backup": 0, "restore": 0, "verify": 0}
    for run in f.running:
        by_kind[run.kind] = by_kind.get(run.kind, 0) + 1
    for kind, n in sorted(by_kind.items()):
        in_progress.add_metric([kind], n)
    yield in_progress
    if f.last_full_backup is not None and f.last_full_backup.finished_at is not None:
        yield _gauge(
            "dnd_last_full_backup_timestamp_seconds",
            "When the last completed backup of every session finished",
            f.last_full_backup.finished_at.timestamp(),
        )


def _gauge(name: str, documentation: str, value: float) -> GaugeMetricFamily:
    return GaugeMetricFamily(name, documentation, value=value)


def registry(settings: Settings, ping_workers: Callable[[], Workers]) -> CollectorRegistry:
    """A registry of our metrics only (not the process's: beat's own CPU is not the point)."""
    reg = CollectorRegistry(auto_describe=False)
    reg.register(HealthCollector(settings, ping_workers))
    return reg


def serve(settings: Settings, ping_workers: Callable[[], Workers]) -> bool:
    """Serve the metrics on METRICS_ADDRESS:METRICS_PORT in a thread; False if the port is taken."""
    from prometheus_client import start_http_server

    try:
        start_http_server(
            settings.metrics_port,
            addr=settings.metrics_address,
            registry=registry(settings, ping_workers),
        )
    except OSError as exc:
        # Metrics are not worth stopping the schedule for: say so and go on.
        log.error(
            "metrics: cannot listen on %s:%s (%s); not served (set METRICS_PORT)",
            settings.metrics_address,
            settings.metrics_port,
            exc,
        )
        return False
    where = f"{settings.metrics_address}:{settings.metrics_port}"
    log.info("metrics: serving http://%s/metrics", where)
    return True
