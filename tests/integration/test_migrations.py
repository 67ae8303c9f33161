"""Migrations: up, up again, down, up again; and the schema the contract pins."""

from __future__ import annotations

import contextlib
import uuid
from datetime import UTC, datetime

import psycopg
import psycopg.errors
import pytest

from tests.integration.helpers import rows, scalar
from worker import migrate
from worker.settings import Settings

PROJECT_TABLES = {
    "client_sessions",
    "client_messages",
    "persistence_snapshots",
    "persistence_session_results",
    "persistence_kept_records",
    "backup_watermarks",
}
NOW = datetime(2026, 2, 12, tzinfo=UTC)


@pytest.fixture
def migrate_settings(empty_database_url):
    return Settings.from_env({"DATABASE_URL": empty_database_url})


@pytest.fixture
def conn(empty_database_url):
    with contextlib.closing(psycopg.connect(empty_database_url, autocommit=True)) as opened:
        yield opened


def _tables(conn) -> set[str]:
    return {
        r["table_name"]
        for r in rows(
            conn,
            "SELECT table_name FROM information_schema.tables"
            " WHERE table_schema = 'public' AND table_type = 'BASE TABLE'",
        )
    }


def _columns(conn, table) -> dict[str, str]:
    return {
        r["column_name"]: r["data_type"]
        for r in rows(
            conn,
            "SELECT column_name, data_type FROM information_schema.columns"
            " WHERE table_schema = 'public' AND table_name = %s",
            table,
        )
    }


def test_up_up_down_up(migrate_settings, conn):
    all_ids = [m.id for m in migrate.status(migrate_settings)]
    assert all_ids
    assert not any(m.applied for m in migrate.status(migrate_settings))
    assert not (_tables(conn) & PROJECT_TABLES)

    applied = migrate.up(migrate_settings)
    assert applied == all_ids
    assert _tables(conn) >= PROJECT_TABLES
    assert all(m.applied and m.applied_at is not None for m in migrate.status(migrate_settings))
    assert migrate.pending(migrate_settings) == []

    assert migrate.up(migrate_settings) == []  # a no-op
    assert _tables(conn) >= PROJECT_TABLES

    rolled_back = migrate.down(migrate_settings, steps=None)
    assert rolled_back == list(reversed(all_ids))
    assert not (_tables(conn) & PROJECT_TABLES)
    assert not any(m.applied for m in migrate.status(migrate_settings))

    assert migrate.up(migrate_settings) == all_ids
    assert _tables(conn) >= PROJECT_TABLES


def test_down_one_step_rolls_back_only_the_last(migrate_settings, conn):
    all_ids = migrate.up(migrate_settings)

    assert migrate.down(migrate_settings) == [all_ids[-1]]
    assert migrate.pending(migrate_settings) == [all_ids[-1]]
    assert "client_messages" in _tables(conn)
    assert migrate.up(migrate_settings) == [all_ids[-1]]


def test_contract_tables_columns_and_types(migrate_settings, conn):
    migrate.up(migrate_settings)
    tz = "timestamp with time zone"

    sessions = _columns(conn, "client_sessions")
    assert {
        name: sessions[name]
        for name in (
            "id",
            "created_at",
            "updated_at",
            "deleted_at",
            "name",
            "creator_id",
            "mcp_server_url",
            "websocket_key",
            "max_players",
            "settings",
            "status",
        )
    } == {
        "id": "uuid",
        "created_at": tz,
        "updated_at": tz,
        "deleted_at": tz,
        "name": "text",
        "creator_id": "text",
        "mcp_server_url": "text",
        "websocket_key": "text",
        "max_players": "integer",
        "settings": "jsonb",
        "status": "text",
    }
    messages = _columns(conn, "client_messages")
    assert {
        name: messages[name]
        for name in (
            "id",
            "session_id",
            "created_at",
            "role",
            "content",
            "tool_calls",
            "player_id",
        )
    } == {
        "id": "uuid",
        "session_id": "uuid",
        "created_at": tz,
        "role": "text",
        "content": "text",
        "tool_calls": "jsonb",
        "player_id": "text",
    }
    snapshots = _columns(conn, "persistence_snapshots")
    assert snapshots["id"] == "uuid"
    assert snapshots["created_at"] == tz
    assert {"session_count", "message_count", "duration_ms", "status"} <= set(snapshots)
    # Every timestamp of the project's tables is a timestamptz.
    naive = rows(
        conn,
        "SELECT table_name, column_name FROM information_schema.columns"
        " WHERE table_schema = 'public' AND data_type = 'timestamp without time zone'"
        " AND table_name = ANY(%s)",
        list(PROJECT_TABLES),
    )
    assert naive == []
    primary_keys = rows(
        conn,
        "SELECT conrelid::regclass::text AS t, pg_get_constraintdef(oid) AS def"
        " FROM pg_constraint WHERE contype = 'p'"
        " AND conrelid::regclass::text IN ('client_sessions', 'client_messages',"
        " 'persistence_snapshots')",
    )
    assert {r["t"]: r["def"] for r in primary_keys} == dict.fromkeys(
        ("client_sessions", "client_messages", "persistence_snapshots"), "PRIMARY KEY (id)"
    )


def test_messages_foreign_key_cascades(migrate_settings, conn):
    migrate.up(migrate_settings)
    [fk] = rows(
        conn,
        "SELECT confrelid::regclass::text AS target, confdeltype,"
        " pg_get_constraintdef(oid) AS def FROM pg_constraint"
        " WHERE contype = 'f' AND conrelid = 'client_messages'::regclass",
    )
    assert fk["target"] == "client_sessions"
    assert fk["confdeltype"] == "c"  # ON DELETE CASCADE
    assert "(session_id)" in fk["def"]

    sid = _session(conn)
    _message(conn, sid, "user")
    conn.execute("DELETE FROM client_sessions WHERE id = %s", (sid,))
    assert scalar(conn, "SELECT count(*) FROM client_messages") == 0
    with pytest.raises(psycopg.errors.ForeignKeyViolation):
        _message(conn, str(uuid.uuid4()), "user")


def test_role_check_constraint(migrate_settings, conn):
    migrate.up(migrate_settings)
    sid = _session(conn)
    for role in ("system", "user", "assistant", "tool"):
        _message(conn, sid, role)

    with pytest.raises(psycopg.errors.CheckViolation):
        _message(conn, sid, "wizard")
    with pytest.raises(psycopg.errors.CheckViolation):
        _message(conn, sid, "User")
    assert scalar(conn, "SELECT count(*) FROM client_messages") == 4
    [check] = rows(
        conn,
        "SELECT pg_get_constraintdef(oid) AS def FROM pg_constraint"
        " WHERE contype = 'c' AND conrelid = 'client_messages'::regclass",
    )
    assert "role" in check["def"]


def test_messages_index_on_session_and_created_at_desc(migrate_settings, conn):
    migrate.up(migrate_settings)
    definitions = [
        r["indexdef"]
        for r in rows(conn, "SELECT indexdef FROM pg_indexes WHERE tablename = 'client_messages'")
    ]
    assert any("(session_id, created_at DESC)" in d for d in definitions), definitions


def _session(conn) -> str:
    sid = str(uuid.uuid4())
    conn.execute(
        "INSERT INTO client_sessions (id, created_at, updated_at, name, creator_id,"
        " mcp_server_url, websocket_key) VALUES (%s, %s, %s, 'n', 'c', 'u', 'w')",
        (sid, NOW, NOW),
    )
    return sid


def _message(conn, sid, role):
    conn.execute(
        "INSERT INTO client_messages (id, session_id, created_at, role) VALUES (%s, %s, %s, %s)",
        (str(uuid.uuid4()), sid, NOW, role),
    )
