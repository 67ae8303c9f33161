"""The merge path's plans, as PostgreSQL makes them under a backup's own settings.

Backups run with ``enable_seqscan`` off (queries.sql, prefer_indexes). A statement
that can only scan a table sequentially is then costed 10^10 higher, which also
crosses ``jit_above_cost``: PostgreSQL JIT-compiled each merge statement, 100-500 ms
for a query of a few milliseconds, and `backup --all --full` of 300 sessions x 100
messages took 119 s against 1.6 s for the cold backup (bench/backup_restore.py now
prints both, "full re-backup" and "cold backup"). Here every statement of the merge
path is explained, with the server's default JIT settings, over a client_messages
that already holds the chunk's messages (the `--full` case), and must be costed
below the point where PostgreSQL would compile it.
"""

from __future__ import annotations

import contextlib
import json
import re
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime
from typing import Any

import psycopg
import pytest

from tests.conftest import create_database, drop_database
from worker.sql import QUERIES

MERGE_STATEMENTS = (
    "merge_rejects",
    "merge_messages",
    "merge_late_rejects",
    "drop_merge_rejects",
    # History's part of the merge path (worker/pg_history.py).
    "history_merge_chunk",
    "history_removed",
)
# Values for the statements' parameters (EXPLAIN plans them, never runs them).
PARAMS = {
    "ids": [],
    "at": datetime(2026, 1, 1, tzinfo=UTC),
    "snapshot_id": None,
    "top": 0.0,
    "session_id": str(uuid.uuid4()),
}
CHUNK = 500


@pytest.fixture(scope="module")
def conn(postgres_admin_url: str, template_database: str) -> Iterator[psycopg.Connection[Any]]:
    name = f"dnd_test_plans_{uuid.uuid4().hex[:12]}"
    url = create_database(postgres_admin_url, name, template=template_database)
    try:
        with contextlib.closing(psycopg.connect(url)) as connection:
            session = str(uuid.uuid4())
            connection.execute(
                "INSERT INTO client_sessions (id, created_at, updated_at, name, creator_id,"
                " mcp_server_url, websocket_key) VALUES (%s, now(), now(), 'n', 'c', 'u', 'k')",
                (session,),
            )
            connection.execute(
                "INSERT INTO client_messages (id, session_id, created_at, role, content)"
                " SELECT gen_random_uuid(), %s, now(), 'user', 'hello' FROM generate_series(1, %s)",
                (session, 20 * CHUNK),
            )
            connection.commit()
            yield connection
    finally:
        drop_database(postgres_admin_url, name)


def _explain(conn: psycopg.Connection[Any], name: str) -> dict[str, Any]:
    names = set(re.findall(r"%\((\w+)\)s", QUERIES[name]))
    params: dict[str, Any] | None = {key: PARAMS[key] for key in names} if names else None
    row = conn.execute(f"EXPLAIN (FORMAT JSON) {QUERIES[name]}", params).fetchone()
    assert row is not None
    plan: dict[str, Any] = (row[0] if isinstance(row[0], list) else json.loads(row[0]))[0]["Plan"]
    return plan


@pytest.mark.parametrize("name", MERGE_STATEMENTS)
def test_merge_statements_are_costed_below_jit(conn: psycopg.Connection[Any], name: str) -> None:
    shown = conn.execute("SHOW jit_above_cost").fetchone()
    assert shown is not None
    jit_above_cost = float(shown[0])
    try:
        conn.execute(QUERIES["prefer_indexes"])  # the backup's own setting, transaction-local
        conn.execute(QUERIES["create_merge_tables"])
        # A chunk of messages the table already holds: what `backup --full` merges.
        conn.execute(
            "INSERT INTO merge_staging SELECT id, session_id, created_at, role, content,"
            " tool_calls, player_id FROM client_messages LIMIT %s",
            (CHUNK,),
        )
        plan = _explain(conn, name)
    finally:
        conn.rollback()
    assert plan["Total Cost"] < jit_above_cost, (
        f"{name} is costed {plan['Total Cost']:.0f} under the backup's settings, above "
        f"jit_above_cost ({jit_above_cost:.0f}): PostgreSQL would JIT-compile it"
    )


def test_the_check_would_catch_a_sequential_scan(conn: psycopg.Connection[Any]) -> None:
    # Guards the test above: without the staging table's index the same statement
    # is costed past the JIT threshold, as it was before the fix.
    try:
        conn.execute(QUERIES["prefer_indexes"])
        conn.execute(QUERIES["create_merge_tables"])
        conn.execute("DROP INDEX merge_staging_id_idx")
        plan = _explain(conn, "merge_messages")
    finally:
        conn.rollback()
    assert plan["Total Cost"] > 1e9
