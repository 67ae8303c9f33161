"""worker.lag: the recovery point from pending sessions, the watcher's heartbeat, full backups."""

import math
from datetime import UTC, datetime, timedelta

from worker.lag import WATCHER_STALE_AFTER_S, LagInputs, recovery_point_s, watcher_alive

NOW = datetime(2026, 12, 2, 18, 0, tzinfo=UTC)


def ago(seconds: float) -> datetime:
    return NOW - timedelta(seconds=seconds)


def lag(oldest=None, continuous=True, heartbeat=None, full=None):
    return recovery_point_s(LagInputs(NOW, oldest, continuous, heartbeat, full))


def test_the_staleness_bound_is_three_heartbeats():
    assert WATCHER_STALE_AFTER_S == 15.0


def test_nothing_pending_and_a_live_watcher_is_zero():
    assert lag(heartbeat=ago(1), full=ago(3600)) == 0.0


def test_a_live_watcher_the_oldest_pending_change_is_the_lag():
    assert lag(oldest=ago(2.5), heartbeat=ago(1)) == 2.5


def test_a_stale_watcher_the_lag_is_at_least_its_heartbeat_age():
    # Nobody looked at Redis for 40 s: a change just after the heartbeat is unseen.
    assert lag(heartbeat=ago(40), full=ago(10)) == 40.0
    assert lag(oldest=ago(90), heartbeat=ago(40)) == 90.0


def test_the_stale_bound_is_inclusive():
    assert watcher_alive(NOW, ago(WATCHER_STALE_AFTER_S))
    assert not watcher_alive(NOW, ago(WATCHER_STALE_AFTER_S + 0.001))
    assert not watcher_alive(NOW, None)
    assert lag(oldest=ago(3), heartbeat=ago(WATCHER_STALE_AFTER_S)) == 3.0
    assert lag(oldest=ago(3), heartbeat=ago(16)) == 16.0


def test_no_watcher_ever_the_last_full_backup_start_bounds_it():
    assert lag(full=ago(600)) == 600.0
    assert lag(oldest=ago(700), full=ago(600)) == 700.0


def test_no_watcher_and_no_full_backup_is_unbounded():
    assert math.isinf(lag())


def test_continuous_off_ignores_a_leftover_watcher_row():
    assert lag(continuous=False, heartbeat=ago(1), full=ago(1800)) == 1800.0
    assert math.isinf(lag(continuous=False, heartbeat=ago(1)))


def test_a_clock_ahead_never_gives_a_negative_lag():
    assert lag(oldest=NOW + timedelta(seconds=2), heartbeat=NOW + timedelta(seconds=1)) == 0.0
