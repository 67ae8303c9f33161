"""Retention: old run records go; running runs, open kept records and backed-up data stay."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from tests.factories import (
    BASE_TIME,
    add_messages,
    iso,
    make_sessions,
    message,
    new_id,
    session_fields,
    write_session,
)
from tests.integration.helpers import (
    backup_run,
    kept_records,
    restore_run,
    rows,
    scalar,
    verify_run,
)

RUNNERS: dict[str, Any] = {"backup": backup_run, "restore": restore_run, "verify": verify_run}
DATA_TABLES = {
    "client_sessions": "id",
    "client_messages": "id",
    "backup_watermarks": "session_id",
    "backup_checksums": "session_id",
}


def _history(services, redis_client, keys, kinds: list[str]) -> list[tuple[str, str]]:
    """Real runs of these kinds, in this order, over two sessions: [(kind, run ID)]."""
    make_sessions(redis_client, keys, 2, 3)
    made = []
    for kind in kinds:
        run = RUNNERS[kind](services)
        assert run.session_count == 2
        made.append((kind, run.id))
    return made


def _age(pg_conn, run_id: str, days: float, *, finished_days: float | None = None) -> None:
    """Move a run back in time: started ``days`` ago, finished ``finished_days`` ago."""
    pg_conn.execute(
        "UPDATE persistence_snapshots SET created_at = now() - %s * interval '1 day',"
        " finished_at = CASE WHEN finished_at IS NULL THEN NULL"
        "                    ELSE now() - %s * interval '1 day' END WHERE id = %s",
        (days, days if finished_days is None else finished_days, run_id),
    )


def _age_in_order(pg_conn, made: list[tuple[str, str]]) -> None:
    """The first run the oldest (len(made) days ago), the last one a day ago."""
    for index, (_kind, run_id) in enumerate(made):
        _age(pg_conn, run_id, len(made) - index)


def _run_ids(pg_conn) -> set[str]:
    return {r[0] for r in pg_conn.execute("SELECT id::text FROM persistence_snapshots")}


def _results_of(pg_conn) -> dict[str, int]:
    return dict(
        pg_conn.execute(
            "SELECT snapshot_id::text, count(*) FROM persistence_session_results GROUP BY 1"
        ).fetchall()
    )


def _data(pg_conn) -> dict[str, list]:
    """Every row of the backed-up data, as text."""
    return {
        table: [r[0] for r in pg_conn.execute(f"SELECT t::text FROM {table} t ORDER BY {key}")]
        for table, key in DATA_TABLES.items()
    }


def _records(pg_conn) -> list:
    return [
        r[0] for r in pg_conn.execute("SELECT t::text FROM persistence_kept_records t ORDER BY id")
    ]


def _kept(
    pg_conn, name: str, *, run_id: str | None, resolved: bool, seen_days_ago: float = 0
) -> int:
    """A kept-aside record last seen by ``run_id``; returns its ID."""
    return int(
        scalar(
            pg_conn,
            "INSERT INTO persistence_kept_records (kind, redis_key, reason, raw, raw_sha256,"
            " preview, first_snapshot_id, last_snapshot_id, last_seen_at, resolved_at)"
            " VALUES ('message', %s, 'bad', %s, sha256(%s), %s, %s, %s,"
            "         now() - %s * interval '1 day', CASE WHEN %s THEN now() END)"
            " RETURNING id",
            f"dnd:session:{name}:messages",
            name.encode(),
            name.encode(),
            name,
            run_id,
            run_id,
            seen_days_ago,
            resolved,
        )
    )


@pytest.mark.parametrize("keep", [0, 1, 2, 5])
def test_keep_n_keeps_the_newest_finished_runs_of_each_kind(
    services, redis_client, keys, pg_conn, keep
):
    kinds = ["backup", "verify", "backup", "restore", "verify", "backup", "restore", "backup"]
    made = _history(services, redis_client, keys, kinds)
    _age_in_order(pg_conn, made)
    expected = {
        run_id for kind in RUNNERS for run_id in [r for k, r in reversed(made) if k == kind][:keep]
    }
    results_before = _results_of(pg_conn)

    counts = services.pg.prune(keep=keep, before=None)

    assert _run_ids(pg_conn) == expected
    gone = [run_id for _kind, run_id in made if run_id not in expected]
    assert counts == {
        "runs": len(gone),
        "session_results": 2 * len(gone),
        "resolved_kept_records": 0,
    }
    # Per-session results went with their runs (cascade); the others are whole.
    assert _results_of(pg_conn) == {r: n for r, n in results_before.items() if r in expected}


def test_older_than_goes_by_when_a_run_ended(services, redis_client, keys, pg_conn):
    made = _history(services, redis_client, keys, ["backup", "backup", "verify", "restore"])
    (_, ended_long_ago), (_, long_run), (_, recent), (_, unfinished) = made
    _age(pg_conn, ended_long_ago, 40)
    _age(pg_conn, long_run, 40, finished_days=10)  # started long ago, ended recently
    _age(pg_conn, recent, 20)
    # A failed run with no finished_at: its start is what counts.
    pg_conn.execute(
        "UPDATE persistence_snapshots SET finished_at = NULL WHERE id = %s", (unfinished,)
    )
    _age(pg_conn, unfinished, 50)

    counts = services.pg.prune(keep=None, before=datetime.now(UTC) - timedelta(days=30))

    assert _run_ids(pg_conn) == {long_run, recent}
    assert counts["runs"] == 2
    assert counts["session_results"] == 4
    assert set(_results_of(pg_conn)) == {long_run, recent}


def test_keep_and_older_than_together_need_both(services, redis_client, keys, pg_conn):
    made = _history(
        services, redis_client, keys, ["backup", "backup", "backup", "verify", "restore", "restore"]
    )
    ages = [40, 35, 1, 45, 10, 5]
    for (_kind, run_id), days in zip(made, ages, strict=True):
        _age(pg_conn, run_id, days)
    old_backup, older_backup, new_backup, lone_verify, young_restore, newest_restore = (
        run_id for _kind, run_id in made
    )

    counts = services.pg.prune(keep=1, before=datetime.now(UTC) - timedelta(days=30))

    # Old and not the newest of its kind: only the two old backups.
    assert _run_ids(pg_conn) == {new_backup, lone_verify, young_restore, newest_restore}
    assert old_backup not in _run_ids(pg_conn)
    assert older_backup not in _run_ids(pg_conn)
    assert counts["runs"] == 2


def test_dry_run_counts_the_same_and_removes_nothing(services, redis_client, keys, pg_conn):
    made = _history(services, redis_client, keys, ["backup", "verify", "backup", "verify"])
    _age_in_order(pg_conn, made)
    _kept(pg_conn, "a", run_id=made[0][1], resolved=True)
    _kept(pg_conn, "b", run_id=made[0][1], resolved=False)
    runs_before = rows(pg_conn, "SELECT * FROM persistence_snapshots ORDER BY id")
    results_before = _results_of(pg_conn)
    records_before = _records(pg_conn)

    dry = services.pg.prune(keep=1, before=None, dry_run=True)

    assert dry == {"runs": 2, "session_results": 4, "resolved_kept_records": 1}
    assert rows(pg_conn, "SELECT * FROM persistence_snapshots ORDER BY id") == runs_before
    assert _results_of(pg_conn) == results_before
    assert _records(pg_conn) == records_before

    assert services.pg.prune(keep=1, before=None) == dry
    assert len(_run_ids(pg_conn)) == 2


def test_running_runs_are_never_removed(services, redis_client, keys, pg_conn):
    made = _history(services, redis_client, keys, ["backup", "backup"])
    _age_in_order(pg_conn, made)
    running = services.pg.start_run("backup", "all", expected_sessions=5)
    single = services.pg.start_run("verify", "session", expected_sessions=1)
    for run in (running, single):
        _age(pg_conn, run.id, 100)

    # A running run does not take one of the places --keep leaves.
    counts = services.pg.prune(keep=1, before=None)
    assert _run_ids(pg_conn) == {made[1][1], running.id, single.id}
    assert counts["runs"] == 1

    services.pg.prune(keep=0, before=datetime.now(UTC) + timedelta(days=1))
    assert _run_ids(pg_conn) == {running.id, single.id}
    statuses = {r[0] for r in pg_conn.execute("SELECT status FROM persistence_snapshots")}
    assert statuses == {"running"}


def test_kept_records_go_only_when_resolved_and_their_last_run_is_gone(
    services, redis_client, keys, pg_conn
):
    made = _history(services, redis_client, keys, ["backup", "backup"])
    _age_in_order(pg_conn, made)
    (_, old), (_, new) = made
    gone_resolved = _kept(pg_conn, "gone-resolved", run_id=old, resolved=True)
    gone_open = _kept(pg_conn, "gone-open", run_id=old, resolved=False)
    kept_resolved = _kept(pg_conn, "kept-resolved", run_id=new, resolved=True)
    stale_resolved = _kept(pg_conn, "stale-resolved", run_id=new, resolved=True, seen_days_ago=60)
    stale_open = _kept(pg_conn, "stale-open", run_id=new, resolved=False, seen_days_ago=60)
    no_run_resolved = _kept(pg_conn, "no-run-resolved", run_id=None, resolved=True)

    counts = services.pg.prune(keep=1, before=None)

    assert counts == {"runs": 1, "session_results": 2, "resolved_kept_records": 2}
    left = {r["id"]: r for r in kept_records(pg_conn)}
    assert set(left) == {gone_open, kept_resolved, stale_resolved, stale_open}
    # An open record outlives the run that saw it: it just no longer points at it.
    assert left[gone_open]["last_run"] is None
    assert left[gone_open]["first_run"] is None
    assert left[gone_open]["resolved_at"] is None
    assert left[kept_resolved]["last_run"] == new
    assert no_run_resolved not in left
    assert gone_resolved not in left

    # With a cut-off, a resolved record last seen before it goes, whatever its run.
    counts = services.pg.prune(keep=1, before=datetime.now(UTC) - timedelta(days=30))
    assert counts == {"runs": 0, "session_results": 0, "resolved_kept_records": 1}
    assert {r["id"] for r in kept_records(pg_conn)} == {gone_open, kept_resolved, stale_open}


def test_a_record_kept_by_a_real_backup_goes_once_resolved(services, redis_client, keys, pg_conn):
    sid = make_sessions(redis_client, keys, 1, 2)[0]
    add_messages(redis_client, keys, sid, [b"{not json"], score=1)
    first = backup_run(services)
    [record] = kept_records(pg_conn)
    assert record["last_run"] == first.id

    assert services.pg.prune(keep=0, before=None)["resolved_kept_records"] == 0
    assert [r["id"] for r in kept_records(pg_conn)] == [record["id"]]
    assert services.pg.resolve_kept_records([record["id"]]) == 1
    assert services.pg.prune(keep=0, before=None)["resolved_kept_records"] == 1
    assert kept_records(pg_conn) == []


def test_backed_up_data_is_never_touched(services, redis_client, keys, pg_conn):
    made = _history(services, redis_client, keys, ["backup", "verify", "restore"])
    sid = new_id()
    # A soft-deleted session too, backed up by a run of its own.
    write_session(
        redis_client, keys, session_fields(sid, deleted_at=iso(BASE_TIME)), [message(sid, 0)]
    )
    backup_run(services)
    _age_in_order(pg_conn, made)
    before = _data(pg_conn)
    assert {table: len(found) for table, found in before.items()} == {
        "client_sessions": 3,
        "client_messages": 7,
        "backup_watermarks": 3,
        "backup_checksums": 3,
    }

    counts = services.pg.prune(keep=0, before=datetime.now(UTC) + timedelta(days=1))

    assert counts["runs"] == 4
    assert _run_ids(pg_conn) == set()
    assert _data(pg_conn) == before
    # The watermarks still do their job: nothing to back up again.
    again = backup_run(services)
    assert again.message_count == 0
    assert _data(pg_conn)["client_messages"] == before["client_messages"]


def test_prune_needs_a_criterion(services):
    with pytest.raises(ValueError, match="keep or before"):
        services.pg.prune(keep=None, before=None)
