"""`dnd-client status`: the recovery point, what waits, and who is alive; a probe with --max-lag."""

from __future__ import annotations

import math
from typing import Any

import click

from worker import exit_codes
from worker.cli.common import output_option, settings
from worker.cli.output import Output, render_table
from worker.health import Health, Workers, assess, read_figures


@click.command()
@click.option(
    "--max-lag",
    type=click.FloatRange(min=0),
    default=None,
    metavar="SECONDS",
    help="Exit with status 12 when the recovery point is above this "
    "[default: CONTINUOUS_MAX_LAG, 5 s].",
)
@click.option(
    "--no-workers",
    "skip_workers",
    is_flag=True,
    help="Do not ask the broker which workers are alive (PostgreSQL only).",
)
@output_option
def status(max_lag: float | None, skip_workers: bool, output: str) -> int:
    """The recovery point now, overall and per shard, and what stands behind it.

    The recovery point is how old the oldest change in Redis that may not be in
    PostgreSQL yet is: 0 when everything is stored. Also shown: sessions waiting
    for a continuous backup, the last completed full backup, runs in progress,
    open kept-aside records, and whether workers, beat and the continuous
    watcher are alive.

    \b
    Exit status: 0 when the recovery point is at most --max-lag, 12 when it is
    above (a probe's "unhealthy"), 5 when PostgreSQL cannot be reached. A
    broker that cannot be reached is shown, and does not change the status.
    """
    config = settings()
    figures = read_figures(config)
    workers = Workers(None, "not asked (--no-workers)")
    if not skip_workers:
        # Imported here: the other work of this command needs no Celery app.
        from worker.celery import app
        from worker.celery_health import count_workers

        workers = count_workers(app, config)
    health = assess(figures, config, workers, max_lag)
    out = Output(output)
    if out.json:
        out.data(health.as_dict())
    else:
        out.stdout.write(render_status(health))
        out.stdout.flush()
    if health.lag_exceeded:
        if not out.json:
            out.status(
                f"recovery point {format_seconds(health.recovery_point_s)} is above "
                f"--max-lag {format_seconds(health.max_lag_s)}"
            )
        return exit_codes.LAG_EXCEEDED
    return exit_codes.OK


def render_status(health: Health) -> str:
    """The status as tables for people: the deployment, then one line per shard."""
    f = health.figures
    rows: list[tuple[str, Any]] = [
        (
            "recovery point",
            f"{format_seconds(health.recovery_point_s)} (target {format_seconds(health.max_lag_s)})"
            + (" ABOVE TARGET" if health.lag_exceeded else ""),
        ),
        ("sessions waiting", health.pending_sessions),
        ("last full backup", _last_full(health)),
        ("runs in progress", _running(health)),
        ("open kept records", f.open_kept_records),
        ("workers", _workers(health)),
        ("beat", "alive" if f.beat_alive else "not running"),
        ("continuous backups", _continuous(health)),
    ]
    shard_rows = [
        (
            s.shard,
            format_seconds(s.recovery_point_s),
            s.pending_sessions,
            s.oldest_change,
            s.continuous_backups,
            s.continuous_messages,
        )
        for s in health.shards
    ]
    return (
        render_table(("", ""), rows, header=False)
        + "\n"
        + render_table(
            ("shard", "recovery point", "waiting", "oldest change", "backups", "messages"),
            shard_rows,
        )
    )


def format_seconds(seconds: float | None) -> str:
    """``1.2 s``, ``3m05s``, ``2h01m``, ``unbounded`` (no backup ever bounds it)."""
    if seconds is None or math.isinf(seconds):
        return "unbounded"
    if seconds < 120:
        return f"{seconds:.1f} s"
    minutes, secs = divmod(round(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    if hours >= 48:
        return f"{hours // 24}d{hours % 24:02d}h"
    return f"{hours}h{minutes:02d}m" if hours else f"{minutes}m{secs:02d}s"


def _last_full(health: Health) -> str:
    run = health.figures.last_full_backup
    if run is None:
        return "none completed"
    status = "" if run.status.value == "completed" else f", {run.status.value}"
    return (
        f"{format_seconds(health.last_full_backup_age_s)} ago "
        f"({run.finished_at:%Y-%m-%d %H:%M:%S}, run {run.id}{status})"
    )


def _running(health: Health) -> str:
    running = health.figures.running
    if not running:
        return "none"
    return ", ".join(
        f"{run.kind} {run.id[:8]} ({run.scope}, "
        f"{format_seconds((health.figures.now - run.created_at).total_seconds())})"
        for run in running
    )


def _workers(health: Health) -> str:
    workers = health.workers
    if workers.count is None:
        return f"unknown: {workers.error}"
    return f"{workers.count} alive" if workers.count else "none alive"


def _continuous(health: Health) -> str:
    if not health.settings.continuous_backup:
        return "off (CONTINUOUS_BACKUP=0): the last full backup bounds the recovery point"
    watcher = health.figures.watcher
    if watcher is None:
        return "on, but no watcher has started yet (no worker ran)"
    age = format_seconds((health.figures.now - watcher.heartbeat_at).total_seconds())
    state = "alive" if health.watcher_alive else "STALE"
    sweep = (
        "no sweep yet"
        if watcher.last_sweep_at is None
        else f"last sweep {watcher.last_sweep_at:%H:%M:%S} "
        f"({watcher.last_sweep_sessions} sessions, {watcher.last_sweep_seconds or 0:.2f} s)"
    )
    return (
        f"watcher {state} on {watcher.node} (heartbeat {age} ago), "
        f"notifications {watcher.notifications}, {sweep}"
    )
