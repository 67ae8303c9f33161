"""worker.models: run totals and the per-session result of a task."""

import json
from datetime import UTC, datetime, timedelta, timezone

import pytest

from worker.models import (
    MESSAGE_COLUMNS,
    Run,
    RunStatus,
    RunTotals,
    SessionResult,
    SessionStatus,
)

SID = "123e4567-e89b-12d3-a456-426614174000"


def result(status, messages=0, kept=0):
    return SessionResult(session_id=SID, status=status, messages=messages, kept=kept)


# -- RunTotals ---------------------------------------------------------------------


def test_empty_totals_are_a_completed_run():
    totals = RunTotals()
    assert (totals.sessions, totals.messages, totals.kept, totals.failed) == (0, 0, 0, 0)
    assert totals.status is RunStatus.COMPLETED


def test_add_counts_sessions_messages_and_kept_records():
    totals = RunTotals()
    totals.add(result(SessionStatus.COMPLETED, messages=10))
    totals.add(result(SessionStatus.PARTIAL, messages=5, kept=2))
    totals.add(result(SessionStatus.COMPLETED, messages=0))
    assert totals.sessions == 3
    assert totals.messages == 15
    assert totals.kept == 2
    assert (totals.failed, totals.skipped, totals.unchanged) == (0, 0, 0)


@pytest.mark.parametrize(
    ("status", "counter"),
    [
        (SessionStatus.FAILED, "failed"),
        (SessionStatus.SKIPPED, "skipped"),
        (SessionStatus.UNCHANGED, "unchanged"),
    ],
)
def test_add_counts_each_status_in_its_own_counter(status, counter):
    totals = RunTotals()
    totals.add(result(status))
    totals.add(result(status))
    counters = {"failed": 0, "skipped": 0, "unchanged": 0, counter: 2}
    assert {name: getattr(totals, name) for name in counters} == counters
    assert totals.sessions == 2


def test_add_kept_counts_records_of_no_session():
    totals = RunTotals()
    totals.add_kept(3)
    totals.add_kept(0)
    assert totals.kept == 3
    assert totals.sessions == 0
    assert totals.status is RunStatus.PARTIAL


@pytest.mark.parametrize(
    ("statuses_and_kept", "run_status"),
    [
        ([(SessionStatus.COMPLETED, 0)], RunStatus.COMPLETED),
        ([(SessionStatus.UNCHANGED, 0), (SessionStatus.SKIPPED, 0)], RunStatus.COMPLETED),
        ([(SessionStatus.COMPLETED, 0), (SessionStatus.PARTIAL, 1)], RunStatus.PARTIAL),
        ([(SessionStatus.COMPLETED, 0), (SessionStatus.FAILED, 0)], RunStatus.FAILED),
        # failed beats partial, whatever the order
        ([(SessionStatus.PARTIAL, 4), (SessionStatus.FAILED, 0)], RunStatus.FAILED),
        ([(SessionStatus.FAILED, 0), (SessionStatus.PARTIAL, 4)], RunStatus.FAILED),
    ],
)
def test_run_status_failed_beats_partial_beats_completed(statuses_and_kept, run_status):
    totals = RunTotals()
    for status, kept in statuses_and_kept:
        totals.add(result(status, kept=kept))
    assert totals.status is run_status


def test_kept_set_members_alone_make_a_run_partial_and_failure_still_wins():
    totals = RunTotals()
    totals.add(result(SessionStatus.COMPLETED, messages=3))
    totals.add_kept(1)
    assert totals.status is RunStatus.PARTIAL
    totals.add(result(SessionStatus.FAILED))
    assert totals.status is RunStatus.FAILED  # type: ignore[comparison-overlap]


# -- SessionResult -------------------------------------------------------------------


def test_session_result_as_dict_has_the_contract_keys_and_is_json():
    data = SessionResult(
        session_id=SID,
        status=SessionStatus.PARTIAL,
        messages=12,
        kept=1,
        duration_ms=345,
        error=None,
        shard=3,
        worker="celery@host",
        finished_at=datetime(2026, 2, 12, 2, 0, 0, 123457, tzinfo=UTC),
    ).as_dict()
    assert {"session_id", "status", "messages", "duration_ms", "error", "shard", "worker"} <= set(
        data
    )
    assert data["status"] == "partial"
    assert type(data["status"]) is str  # not the enum: JSON-able and comparable to text
    assert data["messages"] == 12
    assert json.loads(json.dumps(data)) == data


@pytest.mark.parametrize(
    "original",
    [
        SessionResult(session_id=SID, status=SessionStatus.COMPLETED),
        SessionResult(
            session_id=SID,
            status=SessionStatus.FAILED,
            messages=0,
            kept=0,
            duration_ms=12,
            error="cannot reach PostgreSQL (...); check DATABASE_URL",
            shard=7,
            worker="celery@w1",
            finished_at=datetime(2026, 2, 12, 2, 0, 0, 123457, tzinfo=UTC),
        ),
        SessionResult(
            session_id=SID,
            status=SessionStatus.SKIPPED,
            finished_at=datetime(2026, 2, 12, 10, 0, tzinfo=timezone(timedelta(hours=8))),
        ),
    ],
)
def test_session_result_survives_a_json_round_trip(original):
    wire = json.loads(json.dumps(original.as_dict()))
    again = SessionResult.from_dict(wire)
    assert again == original
    assert again.status is original.status
    if original.finished_at is not None:
        assert again.finished_at.utcoffset() == original.finished_at.utcoffset()


@pytest.mark.parametrize("status", list(SessionStatus))
def test_every_session_status_round_trips(status):
    assert SessionResult.from_dict(result(status).as_dict()).status is status


def test_session_result_from_dict_fills_missing_counters_with_defaults():
    again = SessionResult.from_dict({"session_id": SID, "status": "completed"})
    assert again == SessionResult(session_id=SID, status=SessionStatus.COMPLETED)


def test_session_result_from_dict_rejects_an_unknown_status():
    with pytest.raises(ValueError, match="exploded"):
        SessionResult.from_dict({"session_id": SID, "status": "exploded"})


# -- Run ---------------------------------------------------------------------------


def make_run(status, finished_at=None):
    return Run(
        id="0f8fad5b-d9cb-469f-a165-70867728950e",
        kind="backup",
        scope="all",
        status=status,
        created_at=datetime(2026, 2, 12, 2, 0, tzinfo=UTC),
        finished_at=finished_at,
        session_count=2,
        message_count=10,
        kept_count=0,
        failed_count=0,
        duration_ms=1500,
        error=None,
    )


@pytest.mark.parametrize(
    ("status", "done"),
    [
        (RunStatus.RUNNING, False),
        (RunStatus.COMPLETED, True),
        (RunStatus.PARTIAL, True),
        (RunStatus.FAILED, True),
    ],
)
def test_run_is_done_unless_running(status, done):
    assert make_run(status).done is done


def test_run_as_dict_is_json():
    data = make_run(RunStatus.COMPLETED, datetime(2026, 2, 12, 2, 0, 2, tzinfo=UTC)).as_dict()
    assert data["status"] == "completed"
    assert data["created_at"] == "2026-02-12T02:00:00+00:00"
    assert data["finished_at"] == "2026-02-12T02:00:02+00:00"
    assert json.loads(json.dumps(data)) == data


def test_run_as_dict_of_an_unfinished_run():
    data = make_run(RunStatus.RUNNING).as_dict()
    assert data["finished_at"] is None
    json.dumps(data)


# -- constants ---------------------------------------------------------------------


def test_message_columns_match_the_contract():
    assert MESSAGE_COLUMNS == (
        "id",
        "session_id",
        "created_at",
        "role",
        "content",
        "tool_calls",
        "player_id",
    )


def test_run_statuses_are_the_contract_values():
    assert {status.value for status in RunStatus} == {"running", "completed", "partial", "failed"}
