"""The pure parts of continuous protection: decisions, parsing, error mapping (no services)."""

from __future__ import annotations

import psycopg
import psycopg.errors
import pytest

from worker.connections import postgres_error
from worker.continuous import repeat_pause_s
from worker.errors import ServiceUnavailable, TransientError
from worker.models import Watermark
from worker.records import hash_digest
from worker.redis_store import SweepProbe
from worker.settings import Settings
from worker.tasks import coalescible
from worker.watch import (
    flags_to_set,
    next_sweep_at,
    session_of_channel,
    sweep_finds_change,
)

SID = "6f1c0a52-0000-4000-8000-000000000001"
SETTINGS = Settings.from_env({"DATABASE_URL": "postgresql://dnd:pw@db.example:5432/dnd"})
FIELDS = {b"id": SID.encode(), b"updated_at": b"2026-02-12T10:00:00Z"}


# -- SQLSTATE class 40 is retried -----------------------------------------------------


@pytest.mark.parametrize(
    "error", [psycopg.errors.DeadlockDetected, psycopg.errors.SerializationFailure]
)
def test_a_rolled_back_transaction_is_transient_and_not_a_server_down(error):
    ours = postgres_error(error("deadlock detected"), SETTINGS)
    assert isinstance(ours, TransientError)
    assert not isinstance(ours, ServiceUnavailable)
    assert error.sqlstate in str(ours)


def test_deadlock_detected_is_not_a_transaction_rollback_in_psycopg():
    # Why the SQLSTATE decides, not the class (see worker/connections.py).
    assert not issubclass(psycopg.errors.DeadlockDetected, psycopg.errors.TransactionRollback)


def test_a_dropped_connection_is_still_a_server_down():
    ours = postgres_error(psycopg.OperationalError("server closed the connection"), SETTINGS)
    assert isinstance(ours, ServiceUnavailable)


# -- coalescing of backup_session requests ----------------------------------------------


@pytest.mark.parametrize(
    ("args", "kwargs", "expected"),
    [
        ((SID,), {}, SID),
        ((SID.upper(),), {}, SID),
        ((), {"session_id": SID}, SID),
        ((SID,), {"full": False, "run_id": None}, SID),
        # A run named (the supervisor sending a lost task again): as asked.
        ((SID,), {"run_id": "r1"}, None),
        ((SID, "r1"), {}, None),
        # A full backup is another request.
        ((SID,), {"full": True}, None),
        # Not a session ID: left to the router, which refuses it with its message.
        (("*",), {}, None),
        ((), {}, None),
        ((SID,), {"session_id": SID}, None),
        ((SID,), {"unknown": 1}, None),
    ],
)
def test_which_requests_merge_with_a_queued_one(args, kwargs, expected):
    assert coalescible(args, kwargs) == expected


# -- the watcher's decisions ---------------------------------------------------------------


@pytest.mark.parametrize(
    ("current", "wanted"),
    [
        ("", "Kzh"),
        ("Ex", "ExKzh"),
        ("Kz", "Kzh"),
        ("Kzh", None),
        ("hzK", None),
        ("KA", None),
        ("AKE", None),
        ("A", "AK"),  # every event class, but only on the keyevent channel
    ],
)
def test_notification_flags_to_set(current, wanted):
    assert flags_to_set(current) == wanted


@pytest.mark.parametrize(
    ("channel", "expected"),
    [
        (f"__keyspace@0__:dnd:session:{SID}".encode(), SID),
        (f"__keyspace@0__:dnd:session:{SID}:messages".encode(), SID),
        (f"__keyspace@0__:dnd:session:{SID.upper()}:messages", SID),
        (f"__keyspace@0__:dnd:session:{SID}:other".encode(), None),
        (b"__keyspace@0__:dnd:session:not-a-uuid", None),
        (f"__keyspace@1__:dnd:session:{SID}".encode(), None),
        (f"__keyspace@0__:other:session:{SID}".encode(), None),
    ],
)
def test_the_session_a_notification_names(channel, expected):
    assert session_of_channel(channel, "__keyspace@0__:dnd:session:") == expected


def mark(count: int = 2, top: float | None = 2000.0, fields=FIELDS) -> Watermark:
    return Watermark(SID, hash_digest(fields), count, top)


@pytest.mark.parametrize(
    ("probe", "watermark", "changed"),
    [
        (SweepProbe(SID, FIELDS, 2, 2000.0), mark(), False),
        (SweepProbe(SID, FIELDS, 3, 3000.0), mark(), True),  # a message added
        (SweepProbe(SID, FIELDS, 2, 3000.0), mark(), True),  # one replaced by a newer
        (SweepProbe(SID, FIELDS, 1, 2000.0), mark(), True),  # one removed
        (SweepProbe(SID, {**FIELDS, b"updated_at": b"x"}, 2, 2000.0), mark(), True),
        (SweepProbe(SID, FIELDS, 0, None), mark(0, None), False),
        (SweepProbe(SID, FIELDS, 1, 5.0), None, True),  # never backed up
        # No hash and never backed up: nothing a backup could store.
        (SweepProbe(SID, {}, 3, 5.0), None, False),
    ],
)
def test_what_the_sweep_counts_as_changed(probe, watermark, changed):
    assert sweep_finds_change(probe, watermark) is changed


def test_the_sweep_bound_with_the_default_interval():
    interval = Settings().continuous_sweep_interval_s
    assert interval == 30
    # A sweep started at t=100 and took 2 s: the next starts at 130, so a change
    # just after a session was compared at t=100 is found by t=130 + a sweep.
    assert next_sweep_at(100.0, 102.0, interval) == 130.0
    # A sweep longer than the interval: the next starts when it ends.
    assert next_sweep_at(100.0, 145.0, interval) == 145.0


def test_a_session_written_without_a_break_is_backed_up_every_fifth_of_the_max_lag():
    assert repeat_pause_s(Settings()) == 1.0
    assert repeat_pause_s(Settings(continuous_max_lag_s=10)) == 2.0


def test_continuous_settings_from_the_environment():
    base = {"DATABASE_URL": "postgresql://x@y/z"}
    d = Settings.from_env(base)
    assert (d.continuous_backup, d.continuous_max_lag_s, d.continuous_sweep_interval_s) == (
        True,
        5,
        30,
    )
    assert d.continuous_set_notifications is True
    off = Settings.from_env({**base, "CONTINUOUS_BACKUP": "0", "CONTINUOUS_SET_NOTIFICATIONS": "0"})
    assert not off.continuous_backup
    assert not off.continuous_set_notifications
    from worker.errors import ConfigError

    with pytest.raises(ConfigError, match="CONTINUOUS_BACKUP must be 1 or 0"):
        Settings.from_env({**base, "CONTINUOUS_BACKUP": "maybe"})
    with pytest.raises(ConfigError, match="CONTINUOUS_MAX_LAG must be between"):
        Settings.from_env({**base, "CONTINUOUS_MAX_LAG": "0"})
