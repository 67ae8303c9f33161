"""`dnd-client status` as people and programs read it, and the metrics sharing its figures."""

import io
import json
import math
from datetime import UTC, datetime, timedelta
from typing import Any

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.registry import Collector

from worker.cli.output import Output
from worker.cli.status_cmd import format_seconds, render_status
from worker.health import Health, Workers, assess
from worker.metrics import METRIC_NAMES, health_metrics
from worker.models import (
    Run,
    RunCount,
    RunStatus,
    ShardActivity,
    ShardPending,
    StatusFigures,
    WatcherState,
)
from worker.settings import Settings

NOW = datetime(2026, 12, 2, 18, 0, tzinfo=UTC)
SETTINGS = Settings.from_env({"BACKUP_SHARDS": "3"})


def ago(seconds: float) -> datetime:
    return NOW - timedelta(seconds=seconds)


def full_run(finished_s_ago: float = 600) -> Run:
    return Run(
        id="0f8fad5b-d9cb-469f-a165-70867728950e",
        kind="backup",
        scope="all",
        status=RunStatus.COMPLETED,
        created_at=ago(finished_s_ago + 60),
        finished_at=ago(finished_s_ago),
        session_count=10,
        message_count=100,
        kept_count=0,
        failed_count=0,
        duration_ms=60_000,
        error=None,
    )


def figures(**changes: Any) -> StatusFigures:
    base: dict[str, Any] = {
        "now": NOW,
        "pending": [ShardPending(1, 4, ago(7.5))],
        "watcher": WatcherState("w1@host", ago(3600), ago(2), "on", ago(3), 12, 0.02),
        "activity": [ShardActivity(0, 5, 5, 50, 0, 0), ShardActivity(1, 2, 3, 30, 1, 0)],
        "run_counts": [RunCount("backup", "completed", 3), RunCount("backup", "failed", 1)],
        "running": [],
        "last_full_backup": full_run(),
        "open_kept_records": 2,
        "beat_alive": True,
    }
    base.update(changes)
    return StatusFigures(**base)


def health(max_lag=None, **changes) -> Health:
    return assess(figures(**changes), SETTINGS, Workers(2), max_lag)


def test_overall_is_the_oldest_pending_change_and_each_shard_its_own():
    h = health()
    assert h.recovery_point_s == 7.5
    assert [(s.shard, s.recovery_point_s, s.pending_sessions) for s in h.shards] == [
        (0, 0.0, 0),
        (1, 7.5, 4),
        (2, 0.0, 0),
    ]
    assert h.lag_exceeded  # above the default 5 s
    assert not health(max_lag=8).lag_exceeded


def test_a_stale_watcher_raises_every_shard():
    watcher = WatcherState("w1@host", ago(3600), ago(60), "off", None, None, None)
    h = health(watcher=watcher)
    assert [s.recovery_point_s for s in h.shards] == [60.0, 60.0, 60.0]
    assert not h.watcher_alive


def test_the_table_shows_each_figure():
    text = render_status(health())
    assert "recovery point      7.5 s (target 5.0 s) ABOVE TARGET" in text
    assert "sessions waiting    4" in text
    assert "last full backup    10m00s ago (" in text
    assert "open kept records   2" in text
    assert "workers             2 alive" in text
    assert "beat                alive" in text
    assert "watcher alive on w1@host (heartbeat 2.0 s ago), notifications on" in text
    lines = text.splitlines()
    shard_1 = next(line for line in lines if line.startswith("1  "))
    assert shard_1.split()[:3] == ["1", "7.5", "s"]


def test_broker_down_and_nothing_ever_backed_up():
    h = assess(
        figures(watcher=None, last_full_backup=None, pending=[], beat_alive=False),
        SETTINGS,
        Workers(None, "the Celery broker cannot be reached (refused)"),
    )
    text = render_status(h)
    assert "unbounded (target 5.0 s) ABOVE TARGET" in text
    assert "workers             unknown: the Celery broker cannot be reached (refused)" in text
    assert "beat                not running" in text
    assert "no watcher has started yet" in text
    assert "none completed" in text


def test_json_form_is_valid_json_with_unbounded_as_null():
    out_file = io.StringIO()
    out = Output("json", stdout=out_file)
    out.data(assess(figures(watcher=None, last_full_backup=None), SETTINGS, Workers(0)).as_dict())
    payload = json.loads(out_file.getvalue())
    assert payload["recovery_point_s"] is None
    assert payload["lag_exceeded"] is True
    assert payload["workers"] == {"alive": 0, "error": None}
    assert [s["pending_sessions"] for s in payload["shards"]] == [0, 4, 0]

    out_file = io.StringIO()
    Output("json", stdout=out_file).data(health().as_dict())
    payload = json.loads(out_file.getvalue())
    assert payload["recovery_point_s"] == 7.5
    assert payload["last_full_backup"]["age_s"] == 600.0
    assert payload["continuous"]["watcher"]["heartbeat_age_s"] == 2.0


def test_format_seconds():
    assert format_seconds(0) == "0.0 s"
    assert format_seconds(4.26) == "4.3 s"
    assert format_seconds(185) == "3m05s"
    assert format_seconds(7300) == "2h01m"
    assert format_seconds(3 * 86400 + 3600) == "3d01h"
    assert format_seconds(math.inf) == "unbounded"


class _Fixed(Collector):
    def __init__(self, h: Health) -> None:
        self.h = h

    def collect(self):
        return health_metrics(self.h)


def exposition(h: Health) -> str:
    registry = CollectorRegistry(auto_describe=False)
    registry.register(_Fixed(h))
    return generate_latest(registry).decode()


def test_metrics_by_prometheus_conventions():
    text = exposition(health())
    assert 'dnd_recovery_point_seconds{shard="1"} 7.5' in text
    assert 'dnd_recovery_point_seconds{shard="0"} 0.0' in text
    assert "dnd_recovery_point_target_seconds 5.0" in text
    assert 'dnd_pending_sessions{shard="1"} 4.0' in text
    assert 'dnd_continuous_messages_total{shard="1"} 30.0' in text
    assert 'dnd_runs_total{kind="backup",status="failed"} 1.0' in text
    assert 'dnd_runs_in_progress{kind="restore"} 0.0' in text
    [stamp] = [
        float(line.split()[1])
        for line in text.splitlines()
        if line.startswith("dnd_last_full_backup_timestamp_seconds ")
    ]
    assert stamp == ago(600).timestamp()
    assert "dnd_kept_records_open 2.0" in text
    assert "dnd_beat_up 1.0" in text
    assert "dnd_watcher_up 1.0" in text


def test_an_unbounded_lag_is_plus_inf():
    text = exposition(assess(figures(watcher=None, last_full_backup=None), SETTINGS, Workers(0)))
    assert 'dnd_recovery_point_seconds{shard="0"} +Inf' in text


def test_every_exported_family_is_listed_in_metric_names():
    text = exposition(health())
    exported = {line.split()[2] for line in text.splitlines() if line.startswith("# TYPE")}
    # Those the collector adds itself: the workers', the broker's, the database's.
    assert exported | {"dnd_workers_up", "dnd_broker_up", "dnd_database_up"} == set(METRIC_NAMES)


def test_the_dev_stack_lag_line():
    from worker.devstack.lagline import lag_line

    assert lag_line(health()) == (
        "lag 7.5 s (target 5 s) ABOVE TARGET, 4 sessions waiting, "
        "last full backup 10 min ago, beat alive, watcher alive"
    )
    calm = health(pending=[], beat_alive=False, last_full_backup=None)
    assert lag_line(calm) == (
        "lag 0.0 s (target 5 s), 0 sessions waiting, no full backup yet, "
        "beat not running, watcher alive"
    )


def test_the_dev_stack_says_once_that_postgresql_cannot_be_read():
    from worker.devstack.lagline import EVERY_S, LagReporter

    said: list[str] = []
    down = Settings.from_env({"DATABASE_URL": "postgresql://postgres@127.0.0.1:1/x"})
    reporter = LagReporter(down, said.append)
    reporter.tick(now=1000.0)
    reporter.tick(now=1000.0 + EVERY_S / 2)  # not due
    reporter.tick(now=1000.0 + EVERY_S)
    assert len(said) == 1
    assert said[0].startswith("status: cannot read PostgreSQL (cannot reach PostgreSQL")
