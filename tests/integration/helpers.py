"""Small queries shared by the integration tests (assertions read PostgreSQL directly)."""

from __future__ import annotations

from typing import Any

import psycopg

from worker.models import BackupOptions, RestoreOptions, Run, SessionResult, VerifyOptions
from worker.runner import run_local


def rows(conn: psycopg.Connection[Any], query: str, *params: Any) -> list[dict[str, Any]]:
    """Every row of ``query`` as a dict of column -> value."""
    with conn.cursor() as cur:
        cur.execute(query, params or None)
        columns = [c.name for c in cur.description or ()]
        return [dict(zip(columns, row, strict=True)) for row in cur.fetchall()]


def scalar(conn: psycopg.Connection[Any], query: str, *params: Any) -> Any:
    row = conn.execute(query, params or None).fetchone()
    assert row is not None
    return row[0]


def message_count(conn: psycopg.Connection[Any], session_id: str | None = None) -> int:
    if session_id is None:
        return int(scalar(conn, "SELECT count(*) FROM client_messages"))
    return int(
        scalar(conn, "SELECT count(*) FROM client_messages WHERE session_id = %s", session_id)
    )


def kept_records(conn: psycopg.Connection[Any]) -> list[dict[str, Any]]:
    """Every kept-aside record, oldest first, with IDs of runs as text."""
    return rows(
        conn,
        "SELECT id, kind, redis_key, session_id, message_id, score, reason, raw, preview,"
        " first_snapshot_id::text AS first_run, last_snapshot_id::text AS last_run,"
        " times_seen, resolved_at FROM persistence_kept_records ORDER BY id",
    )


def results_by_session(services: Any, run: Run) -> dict[str, SessionResult]:
    return {r.session_id: r for r in services.pg.run_results(run.id)}


def snapshot(conn: psycopg.Connection[Any], run_id: str) -> dict[str, Any]:
    found = rows(conn, "SELECT * FROM persistence_snapshots WHERE id = %s", run_id)
    assert len(found) == 1, f"no persistence_snapshots row for run {run_id}"
    return found[0]


# Whole --local runs of each kind, as the tests have always started them. The
# package has one entry point, worker.runner.run_local, which takes the run's
# options; these name the kind and its one option.


def backup_run(
    services: Any, *, session_id: str | None = None, full: bool = False, **extra: Any
) -> Run:
    return run_local(services, BackupOptions(full=full), session_ids=_ids(session_id), **extra)


def restore_run(
    services: Any, *, session_id: str | None = None, force: bool = False, **extra: Any
) -> Run:
    return run_local(services, RestoreOptions(force=force), session_ids=_ids(session_id), **extra)


def verify_run(
    services: Any, *, session_id: str | None = None, quick: bool = False, **extra: Any
) -> Run:
    return run_local(services, VerifyOptions(quick=quick), session_ids=_ids(session_id), **extra)


def _ids(session_id: str | None) -> list[str] | None:
    return None if session_id is None else [session_id]
