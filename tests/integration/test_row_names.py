"""Rows by name, against the real server: each query names its columns as the store reads them.

The store builds its dataclasses from rows by column name (pg_store.Rows, with
psycopg's class_row / kwargs_row) and reads other rows as dicts by key. Here
PostgreSQL itself describes every such query (prepared, never run) and the
names it gives must be exactly the fields, or the keys, the store uses.
"""

from __future__ import annotations

import contextlib
import re
import uuid
from collections.abc import Iterator
from dataclasses import fields
from typing import Any

import psycopg
import pytest

import worker.pg_store
from tests.conftest import create_database, drop_database
from worker.sql import QUERIES

ROWS = sorted(
    (value for value in vars(worker.pg_store).values() if isinstance(value, worker.pg_store.Rows)),
    key=lambda rows: rows.query,
)
# Queries the store reads with dict_row, and the keys it reads (kept records: the
# keys the CLI prints).
KEYED = {
    "merge_rejects": {"message_id", "reason"},
    "merge_late_rejects": {"message_id", "reason"},
    "checksums": {"session_id", "message_count", "messages_digest", "session_digest"},
    "message_counts": {"session_id", "messages"},
    "run_progress": {"sessions", "messages", "kept", "failed"},
    "prune_runs": {"runs", "session_results"},
    "list_kept_records": {
        "id",
        "kind",
        "redis_key",
        "session_id",
        "message_id",
        "score",
        "reason",
        "preview",
        "first_snapshot_id",
        "last_snapshot_id",
        "first_seen_at",
        "last_seen_at",
        "times_seen",
        "resolved_at",
    },
}
KEYED["get_kept_record"] = KEYED["list_kept_records"] | {"raw"}


@pytest.fixture(scope="module")
def conn(postgres_admin_url: str, template_database: str) -> Iterator[psycopg.Connection[Any]]:
    name = f"dnd_test_rows_{uuid.uuid4().hex[:12]}"
    url = create_database(postgres_admin_url, name, template=template_database)
    try:
        with contextlib.closing(psycopg.connect(url, autocommit=True)) as connection:
            # merge_rejects reads the merge path's temporary tables.
            connection.execute(QUERIES["create_merge_tables"])
            yield connection
    finally:
        drop_database(postgres_admin_url, name)


def described_columns(conn: psycopg.Connection[Any], query: str) -> list[str]:
    """The names of the columns ``query`` returns, as PostgreSQL describes it (it never runs)."""
    numbers: dict[str, int] = {}

    def placeholder(match: re.Match[str]) -> str:
        return f"${numbers.setdefault(match.group(1), len(numbers) + 1)}"

    text = re.sub(r"%\((\w+)\)s", placeholder, query)
    name = f"describe_{uuid.uuid4().hex}".encode()
    prepared = conn.pgconn.prepare(name, text.encode())
    assert prepared.status == psycopg.pq.ExecStatus.COMMAND_OK, prepared.error_message
    described = conn.pgconn.describe_prepared(name)
    return [(described.fname(i) or b"").decode() for i in range(described.nfields)]


def test_the_store_reads_dataclasses_through_rows():
    # Guards the tests below against a discovery that silently finds nothing.
    assert len(ROWS) >= 5


@pytest.mark.parametrize("rows", ROWS, ids=lambda rows: rows.query)
def test_dataclass_rows_are_named_after_the_fields(conn, rows):
    columns = described_columns(conn, QUERIES[rows.query])
    assert sorted(columns) == sorted(f.name for f in fields(rows.cls))


@pytest.mark.parametrize("query", sorted(KEYED))
def test_dict_rows_have_the_keys_the_store_reads(conn, query):
    columns = described_columns(conn, QUERIES[query])
    assert len(columns) == len(set(columns))
    assert set(columns) == KEYED[query]
