"""What the store's errors say never includes chat data.

A psycopg error's str() carries its DETAIL and CONTEXT lines: a statement
cancelled in the middle of a COPY quotes the whole line it was at (IDs,
timestamp, message content), and a unique violation names the key. Those texts
end up in run records, logs and the CLI's one line: ours are built from the
primary message and SQLSTATE only.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from datetime import UTC, datetime
from urllib.parse import urlsplit, urlunsplit

import psycopg
import pytest

from tests.factories import new_id
from worker.connections import connect_postgres
from worker.errors import DndError, MessageConflict, ServiceUnavailable, StoreError
from worker.models import MessageRow, Session
from worker.pg_store import PostgresStore
from worker.settings import Settings

CONTENT = "The dragon's true name is Vorthraxiel, whisper it to nobody"


@pytest.fixture
def pg(database_url: str) -> Iterator[PostgresStore]:
    settings = Settings.from_env(
        {"DATABASE_URL": database_url, "DATABASE_STATEMENT_TIMEOUT_MS": "200"}
    )
    with contextlib.closing(connect_postgres(settings)) as conn:
        yield PostgresStore(conn, settings)


def a_session(pg: PostgresStore) -> str:
    sid = new_id()
    now = datetime(2026, 2, 12, 10, 0, tzinfo=UTC)
    pg.upsert_sessions([Session(sid, "A session", "user-1", "http://mcp", "ws-key", now, now)])
    return sid


def a_message(sid: str) -> MessageRow:
    created = datetime(2026, 2, 12, 10, 1, tzinfo=UTC)
    return (new_id(), sid, created, "user", CONTENT, '{"secret": "Vorthraxiel"}', "player-7")


def copy_in(pg: PostgresStore, row: MessageRow) -> None:
    with pg.transaction():
        copy = pg.message_copy()
        copy.write(row)
        copy.pause()


def assert_no_data(error: BaseException, row: MessageRow) -> None:
    text = str(error)
    for value in (row[0], row[1], "2026-02-12 10:01", "Vorthraxiel", "player-7"):
        assert value not in text, text


def test_a_statement_timeout_mid_copy_does_not_quote_the_row(pg, pg_conn):
    # Every inserted message takes longer than the statement timeout (200 ms).
    pg_conn.execute(
        "CREATE FUNCTION slow_insert() RETURNS trigger LANGUAGE plpgsql AS "
        "$$ BEGIN PERFORM pg_sleep(5); RETURN NEW; END $$"
    )
    pg_conn.execute(
        "CREATE TRIGGER slow_insert BEFORE INSERT ON client_messages "
        "FOR EACH ROW EXECUTE FUNCTION slow_insert()"
    )
    row = a_message(a_session(pg))

    with pytest.raises(DndError) as raised:
        copy_in(pg, row)

    # What psycopg said does quote the row: the test looks where the leak was.
    driver = raised.value.__cause__
    assert isinstance(driver, psycopg.errors.QueryCanceled)
    assert "COPY client_messages, line 1" in str(driver)
    # (PostgreSQL shows the first 100 characters of the line: the IDs and the time.)
    assert row[0] in str(driver)
    assert row[1] in str(driver)
    # Ours does not, and keeps its shape.
    assert isinstance(raised.value, StoreError)
    assert str(raised.value) == (
        "PostgreSQL cancelled a statement (DATABASE_STATEMENT_TIMEOUT_MS is 200 ms): "
        "canceling statement due to statement timeout"
    )
    assert_no_data(raised.value, row)


def test_a_message_conflict_does_not_name_the_message(pg):
    row = a_message(a_session(pg))
    copy_in(pg, row)

    with pytest.raises(MessageConflict) as raised:
        copy_in(pg, row)

    driver = raised.value.__cause__
    assert isinstance(driver, psycopg.errors.UniqueViolation)
    assert row[0] in str(driver)  # DETAIL: Key (id)=(...) already exists.
    assert str(raised.value) == (
        'PostgreSQL: duplicate key value violates unique constraint "client_messages_pkey"'
    )
    assert_no_data(raised.value, row)


def test_other_store_errors_say_the_primary_message_and_sqlstate(pg):
    row = a_message(new_id())  # no such session: the foreign key refuses it

    with pytest.raises(StoreError) as raised:
        copy_in(pg, row)

    assert str(raised.value).startswith("PostgreSQL: insert or update on table")
    assert str(raised.value).endswith("(SQLSTATE 23503)")
    assert_no_data(raised.value, row)


def test_a_refused_connection_says_its_first_line_without_the_password(database_url):
    parts = urlsplit(database_url)
    url = urlunsplit(parts._replace(netloc=f"no_such_role:s3cretpw@{parts.hostname}:{parts.port}"))
    settings = Settings.from_env({"DATABASE_URL": url})

    with pytest.raises(ServiceUnavailable) as raised:
        connect_postgres(settings)

    text = str(raised.value)
    assert 'role "no_such_role" does not exist' in text
    assert "s3cretpw" not in text
    assert text.endswith("check DATABASE_URL")


def test_the_default_timeouts_reach_every_connection(database_url):
    """With no timeout set, PostgreSQL gets the defaults users get.

    Other tests shorten DATABASE_LOCK_TIMEOUT_MS and DATABASE_STATEMENT_TIMEOUT_MS
    to reach the error paths quickly; this one proves that the defaults are what
    a connection of ours runs with.
    """
    defaults = Settings()
    settings = Settings.from_env({"DATABASE_URL": database_url})
    with connect_postgres(settings) as conn:
        shown = {
            name: conn.execute(f"SELECT current_setting('{name}')").fetchone()[0]
            for name in ("lock_timeout", "statement_timeout")
        }
    assert (defaults.lock_timeout_ms, defaults.statement_timeout_ms) == (60_000, 600_000)
    assert shown == {"lock_timeout": "1min", "statement_timeout": "10min"}
