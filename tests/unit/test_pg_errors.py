"""Driver errors leave the PostgreSQL store as ours, whatever the method (no database).

A fake connection raises psycopg errors; every kind of method the store has
(plain, generator, context manager) must turn them into worker.errors, and so
must a method nobody wrapped by hand.
"""

from __future__ import annotations

import contextlib
import inspect
from collections.abc import Iterator
from typing import Any

import psycopg
import psycopg.errors
import pytest

from worker.checksums import MessageChecksum
from worker.connections import postgres_boundary, postgres_error
from worker.errors import (
    DndError,
    LockTimeout,
    MessageConflict,
    SchemaNotReady,
    ServiceUnavailable,
    StoreError,
)
from worker.pg_store import MessageCopy, PostgresStore
from worker.settings import Settings

PASSWORD = "s3cretpw"
SETTINGS = Settings.from_env({"DATABASE_URL": f"postgresql://dnd:{PASSWORD}@db.example:5432/dnd"})
# What a psycopg error's str() carries below its first line: the data involved.
# What the fake COPY yields before the connection drops.
ROW: Any = ("a row",)
LEAK = "DETAIL:  Key (id)=(6f1c0a52-0000-4000-8000-000000000001) already exists.\nCONTEXT:  secret"


def dropped() -> psycopg.OperationalError:
    return psycopg.OperationalError(f"server closed the connection unexpectedly\n{LEAK}")


class FakeCopy:
    """A COPY that yields one row and then loses the connection."""

    def __init__(self, error: Exception) -> None:
        self.error = error

    def __enter__(self) -> FakeCopy:
        return self

    def __exit__(self, *exc: object) -> None:
        return None

    def set_types(self, types: list[str]) -> None:
        pass

    def rows(self) -> Iterator[tuple[Any, ...]]:
        yield ROW
        raise self.error

    def write_row(self, row: Any) -> None:
        raise self.error


class FakeCursor:
    def __init__(self, error: Exception) -> None:
        self.error = error

    def __enter__(self) -> FakeCursor:
        return self

    def __exit__(self, *exc: object) -> None:
        return None

    def execute(self, *args: Any, **kwargs: Any) -> FakeCursor:
        raise self.error

    def executemany(self, *args: Any, **kwargs: Any) -> None:
        raise self.error

    def copy(self, *args: Any, **kwargs: Any) -> FakeCopy:
        return FakeCopy(self.error)


class FakeConnection:
    """Every statement fails with ``error``; transactions and COPY start fine."""

    def __init__(self, error: Exception) -> None:
        self.error = error

    def execute(self, *args: Any, **kwargs: Any) -> None:
        raise self.error

    def cursor(self, *args: Any, **kwargs: Any) -> FakeCursor:
        return FakeCursor(self.error)

    def transaction(self, *args: Any, **kwargs: Any) -> contextlib.nullcontext[None]:
        return contextlib.nullcontext()


def store(error: Exception | None = None) -> PostgresStore:
    return PostgresStore(FakeConnection(error or dropped()), SETTINGS)  # type: ignore[arg-type]


def assert_clean(exc: BaseException) -> None:
    """Neither the data of the DETAIL/CONTEXT lines nor a password in our text."""
    text = str(exc)
    assert "6f1c0a52" not in text
    assert "secret" not in text
    assert PASSWORD not in text


@pytest.mark.parametrize(
    "call",
    [
        lambda pg: pg.ping(),
        lambda pg: pg.get_run("6f1c0a52-0000-4000-8000-000000000002"),
        lambda pg: pg.list_runs(),
        lambda pg: pg.watermarks(["6f1c0a52-0000-4000-8000-000000000002"]),
        lambda pg: pg.save_checksums([("s", MessageChecksum(1, 2), b"")], None),
        lambda pg: pg.run_progress("r"),
        lambda pg: pg.count_soft_deleted(),
    ],
    ids=["ping", "get_run", "list_runs", "watermarks", "save_checksums", "run_progress", "count"],
)
def test_a_public_method_raises_service_unavailable(call):
    with pytest.raises(ServiceUnavailable) as raised:
        call(store())
    assert "server closed the connection unexpectedly" in str(raised.value)
    assert "check DATABASE_URL" in str(raised.value)
    assert isinstance(raised.value.__cause__, psycopg.OperationalError)
    assert_clean(raised.value)


def test_a_generator_method_raises_it_while_the_caller_iterates():
    rows = store().stream_message_rows(["6f1c0a52-0000-4000-8000-000000000002"])
    assert next(rows) == ROW  # the COPY is under way when the connection drops
    with pytest.raises(ServiceUnavailable) as raised:
        next(rows)
    assert_clean(raised.value)


def test_generator_methods_translate_their_first_statement_too():
    with pytest.raises(ServiceUnavailable):
        next(store().live_session_ids())
    members = store().stream_members(["6f1c0a52-0000-4000-8000-000000000002"])
    assert next(members) == ROW
    with pytest.raises(ServiceUnavailable):
        next(members)


def test_errors_in_a_transaction_block_are_translated_and_reset_the_merge_tables():
    pg = store()
    pg._merge_tables_ready = True
    with pytest.raises(ServiceUnavailable), pg.transaction():
        raise dropped()
    assert pg._merge_tables_ready is False


def test_read_only_transaction_translates_its_own_statement():
    pg = store()
    with pytest.raises(ServiceUnavailable), pg.transaction(read_only=True):
        pytest.fail("the block must not run: SET TRANSACTION failed")


def test_ours_pass_through_untouched():
    pg = store()
    with pytest.raises(MessageConflict), pg.transaction():
        raise MessageConflict("PostgreSQL: duplicate key")


def test_every_public_method_is_wrapped():
    for name, member in vars(PostgresStore).items():
        if not name.startswith("_") and inspect.isfunction(member):
            assert hasattr(member, "__wrapped__"), name


def test_a_method_added_later_is_translated_without_anyone_wrapping_it():
    @postgres_boundary
    class Store:
        settings = SETTINGS

        def new_method(self) -> None:
            raise dropped()

        def new_stream(self) -> Iterator[int]:
            yield 1
            raise dropped()

    with pytest.raises(ServiceUnavailable):
        Store().new_method()
    stream = Store().new_stream()
    assert next(stream) == 1
    with pytest.raises(ServiceUnavailable):
        next(stream)


def test_a_decorator_it_cannot_see_through_is_refused():
    def other(method: Any) -> Any:
        def helper(*args: Any) -> Any:
            return list(method(*args))

        helper.__wrapped__ = method  # type: ignore[attr-defined]
        return helper

    with pytest.raises(TypeError, match="cannot translate"):

        @postgres_boundary
        class Store:
            @other
            def rows(self) -> Iterator[int]:
                yield 1


def test_message_copy_turns_a_unique_violation_into_a_conflict_without_the_key():
    conflict = psycopg.errors.UniqueViolation(
        f'duplicate key value violates unique constraint "client_messages_pkey"\n{LEAK}'
    )
    copy = MessageCopy(FakeConnection(conflict), SETTINGS)  # type: ignore[arg-type]
    with pytest.raises(MessageConflict) as raised:
        copy.write(("6f1c0a52-0000-4000-8000-000000000001",))  # type: ignore[arg-type]
    assert "client_messages_pkey" in str(raised.value)
    assert_clean(raised.value)


def test_message_copy_translates_other_errors():
    copy = MessageCopy(FakeConnection(dropped()), SETTINGS)  # type: ignore[arg-type]
    with pytest.raises(ServiceUnavailable) as raised:
        copy.write(("6f1c0a52-0000-4000-8000-000000000001",))  # type: ignore[arg-type]
    assert_clean(raised.value)


@pytest.mark.parametrize(
    ("error", "ours", "shape"),
    [
        (
            psycopg.errors.QueryCanceled,
            StoreError,
            "PostgreSQL cancelled a statement (DATABASE_STATEMENT_TIMEOUT_MS is 600000 ms): ",
        ),
        (
            psycopg.errors.LockNotAvailable,
            LockTimeout,
            "held the session lock longer than DATABASE_LOCK_TIMEOUT_MS (60000 ms): ",
        ),
        (psycopg.errors.UndefinedTable, SchemaNotReady, "run `dnd-client migrate up` ("),
        (psycopg.OperationalError, ServiceUnavailable, "cannot reach PostgreSQL ("),
        (psycopg.errors.NotNullViolation, StoreError, "PostgreSQL: "),
    ],
)
def test_messages_keep_their_shape_and_only_the_first_line(error, ours, shape):
    translated = postgres_error(error(f"the first line\n{LEAK}"), SETTINGS)
    assert type(translated) is ours
    assert isinstance(translated, DndError)
    assert shape in str(translated)
    assert "the first line" in str(translated)
    assert_clean(translated)


def test_a_password_in_the_first_line_is_scrubbed():
    translated = postgres_error(
        psycopg.OperationalError(f'connection to "dnd:{PASSWORD}@db.example" failed'), SETTINGS
    )
    assert PASSWORD not in str(translated)
    assert "***" in str(translated)
