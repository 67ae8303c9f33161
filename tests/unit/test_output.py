"""worker.cli.output: tables, durations, the progress bar and exit statuses."""

import io
import json
from datetime import UTC, datetime

import pytest

from worker import exit_codes
from worker.cli.output import (
    Output,
    ProgressBar,
    format_duration,
    render_table,
    run_exit_status,
)
from worker.models import Run, RunStatus, SessionResult, SessionStatus

SID = "123e4567-e89b-12d3-a456-426614174000"


def make_run(status=RunStatus.COMPLETED, **changes):
    fields = {
        "id": "0f8fad5b-d9cb-469f-a165-70867728950e",
        "kind": "backup",
        "scope": "all",
        "status": status,
        "created_at": datetime(2026, 2, 12, 2, 0, tzinfo=UTC),
        "finished_at": datetime(2026, 2, 12, 2, 1, 5, tzinfo=UTC),
        "session_count": 2,
        "message_count": 10,
        "kept_count": 0,
        "failed_count": 0,
        "duration_ms": 65_000,
        "error": None,
    }
    fields.update(changes)
    return Run(**fields)


# -- render_table ------------------------------------------------------------------


def test_render_table_aligns_columns_to_the_widest_cell():
    table = render_table(("name", "messages"), [("alpha", 1), ("b", 12345)])
    assert table == ("name   messages\n-----  --------\nalpha  1\nb      12345\n")


def test_render_table_columns_start_at_the_same_offset_on_every_line():
    table = render_table(("a", "b", "c"), [("x" * 7, "y", "z"), ("x", "y" * 9, "z")])
    lines = table.splitlines()
    assert len(lines) == 4
    starts = {line.index("z") for line in lines[2:]}
    assert len(starts) == 1
    assert lines[0].index("c") == starts.pop()


def test_render_table_shows_none_as_a_dash_and_datetimes_to_the_second():
    table = render_table(
        ("when", "error"), [(datetime(2026, 2, 12, 2, 0, 5, 123456, tzinfo=UTC), None)]
    )
    assert table.splitlines()[2] == "2026-02-12 02:00:05  -"


def test_render_table_keeps_one_row_per_line():
    table = render_table(("error",), [("line one\nline two",)])
    assert table.splitlines()[2] == "line one line two"
    assert len(table.splitlines()) == 3


def test_render_table_has_no_trailing_spaces():
    table = render_table(("long column", "x"), [("a", ""), ("b", None)])
    assert all(line == line.rstrip() for line in table.splitlines())


def test_render_table_without_header():
    assert render_table(("", ""), [("run", "abc"), ("status", "ok")], header=False) == (
        "run     abc\nstatus  ok\n"
    )


def test_render_table_with_no_rows_is_just_the_header():
    assert render_table(("id", "status"), []) == "id  status\n--  ------\n"


def test_render_table_rejects_a_row_of_the_wrong_width():
    with pytest.raises((ValueError, IndexError)):
        render_table(("a", "b"), [("1", "2", "3")])


# -- format_duration ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("ms", "text"),
    [
        (None, "-"),
        (0, "0 ms"),
        (1, "1 ms"),
        (999, "999 ms"),
        (1000, "1.0 s"),
        (1500, "1.5 s"),
        (59_900, "59.9 s"),
        (90_000, "90.0 s"),
        (120_000, "2m00s"),
        (125_400, "2m05s"),
        (3_599_000, "59m59s"),
        (3_600_000, "1h00m00s"),
        (3_661_000, "1h01m01s"),
        (86_400_000, "24h00m00s"),
    ],
)
def test_format_duration(ms, text):
    assert format_duration(ms) == text


# -- ProgressBar ---------------------------------------------------------------------


def test_progress_bar_writes_nothing_when_the_stream_is_not_a_terminal():
    stream = io.StringIO()
    bar = ProgressBar("backing up", stream)
    assert bar.enabled is False
    bar.start(make_run(RunStatus.RUNNING), 100)
    bar.advance([SessionResult(SID, SessionStatus.COMPLETED, messages=3)])
    bar.set_done(50, 150)
    bar.close()
    assert stream.getvalue() == ""


def test_progress_bar_draws_when_enabled():
    # The counterpart of the test above: the same calls do write when enabled.
    stream = io.StringIO()
    bar = ProgressBar("backing up", stream, enabled=True)
    bar.start(make_run(RunStatus.RUNNING), 100)
    bar.advance([SessionResult(SID, SessionStatus.COMPLETED, messages=3)])
    bar.close()
    assert "backing up" in stream.getvalue()


def test_progress_bar_draws_nothing_for_a_single_session():
    stream = io.StringIO()
    bar = ProgressBar("restoring", stream, enabled=True)
    bar.start(make_run(RunStatus.RUNNING), 1)
    bar.advance([SessionResult(SID, SessionStatus.COMPLETED)])
    bar.close()
    assert stream.getvalue() == ""


def test_progress_bar_keeps_totals_even_when_disabled():
    bar = ProgressBar("backing up", io.StringIO())
    bar.start(make_run(RunStatus.RUNNING), 3)
    bar.advance(
        [
            SessionResult(SID, SessionStatus.COMPLETED, messages=3),
            SessionResult(SID, SessionStatus.PARTIAL, messages=2, kept=1),
        ]
    )
    bar.advance([SessionResult(SID, SessionStatus.FAILED)])
    assert (bar.totals.sessions, bar.totals.messages, bar.totals.kept) == (3, 5, 1)
    assert bar.totals.failed == 1
    bar.set_done(3, 42)
    assert bar.totals.messages == 42
    bar.close()
    bar.close()  # closing twice is harmless


# -- run_exit_status -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("status", "code"),
    [
        (RunStatus.COMPLETED, exit_codes.OK),
        (RunStatus.PARTIAL, exit_codes.PARTIAL),
        (RunStatus.FAILED, exit_codes.RUN_FAILED),
        (RunStatus.RUNNING, exit_codes.OK),
    ],
)
def test_run_exit_status(status, code):
    assert run_exit_status(make_run(status)) == code


def test_partial_and_failed_runs_exit_non_zero_and_differently():
    partial = run_exit_status(make_run(RunStatus.PARTIAL))
    failed = run_exit_status(make_run(RunStatus.FAILED))
    assert partial != 0
    assert failed != 0
    assert partial != failed
    assert exit_codes.USAGE == 2  # docs/contract.md §4: a bad argument exits 2
    assert 2 not in (partial, failed)


# -- Output ---------------------------------------------------------------------------


def test_output_run_table_shows_the_closing_figures():
    stdout, stderr = io.StringIO(), io.StringIO()
    Output("table", stdout, stderr).run(make_run(kept_count=2, status=RunStatus.PARTIAL))
    text = stdout.getvalue()
    for label, value in [
        ("status", "partial"),
        ("sessions", "2"),
        ("messages", "10"),
        ("records kept aside", "2"),
        ("duration", "65.0 s"),
    ]:
        assert any(line.startswith(label) and line.endswith(value) for line in text.splitlines()), (
            label,
            text,
        )
    assert "kept" in stderr.getvalue()  # where to find them: on stderr


def test_output_run_table_lists_failed_sessions():
    stdout = io.StringIO()
    failed = [SessionResult(SID, SessionStatus.FAILED, error="boom")]
    Output("table", stdout, io.StringIO()).run(make_run(RunStatus.FAILED), failed=failed)
    assert any(SID in line and "boom" in line for line in stdout.getvalue().splitlines())


def test_output_run_json_is_one_parseable_document_with_failed_sessions():
    stdout, stderr = io.StringIO(), io.StringIO()
    failed = [SessionResult(SID, SessionStatus.FAILED, error="boom", shard=3)]
    Output("json", stdout, stderr).run(make_run(RunStatus.FAILED), failed=failed)
    data = json.loads(stdout.getvalue())
    assert data["status"] == "failed"
    assert data["message_count"] == 10
    assert data["failed_sessions"][0]["session_id"] == SID
    assert data["failed_sessions"][0]["error"] == "boom"
    assert stderr.getvalue() == ""


def test_output_data_json_handles_datetimes_and_bytes():
    stdout = io.StringIO()
    when = datetime(2026, 2, 12, 2, 0, tzinfo=UTC)
    Output("json", stdout, io.StringIO()).data({"at": when, "raw": b"\xffok"})
    data = json.loads(stdout.getvalue())
    assert data["at"] == when.isoformat()
    assert data["raw"] == "\\xffok"


def test_output_data_table_prints_rows_and_json_prints_payload():
    table_out, json_out = io.StringIO(), io.StringIO()
    payload = [{"id": 1}]
    Output("table", table_out, io.StringIO()).data(payload, columns=("id",), rows=[(1,)])
    Output("json", json_out, io.StringIO()).data(payload, columns=("id",), rows=[(1,)])
    assert table_out.getvalue() == "id\n--\n1\n"
    assert json.loads(json_out.getvalue()) == payload
