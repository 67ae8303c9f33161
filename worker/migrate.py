"""Schema migrations, applied by yoyo from the ``migrations/`` folder.

yoyo keeps its own bookkeeping tables (``_yoyo_migration`` and friends) and a
lock table, so two `migrate up` started at once (two containers, say) apply
each migration once. The same folder works with the ``yoyo`` command itself
(see yoyo.ini and the README).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

from worker.connections import postgres_errors
from worker.errors import ConfigError, SchemaNotReady, StoreError
from worker.pg_store import PostgresStore
from worker.settings import Settings


@dataclass(frozen=True, slots=True)
class MigrationState:
    id: str
    applied: bool
    applied_at: datetime | None

    def as_dict(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "applied": self.applied,
            "applied_at": self.applied_at.isoformat() if self.applied_at else None,
        }


def migrations_dir() -> Path:
    """The migrations: inside the installed package, else the checkout's folder."""
    package = Path(__file__).resolve().parent
    for candidate in (package / "_migrations", package.parent / "migrations"):
        if candidate.is_dir():
            return candidate
    raise ConfigError(
        f"no migrations folder found (looked in {package / '_migrations'} "
        f"and {package.parent / 'migrations'})"
    )


def latest_id() -> str:
    """The newest migration this code knows: the schema it needs."""
    ids = [p.stem for p in migrations_dir().glob("*.sql") if not p.stem.endswith(".rollback")]
    return max(ids)


def require_schema(pg: PostgresStore) -> None:
    """SchemaNotReady unless the database has every migration this code needs.

    Checked when a process opens the database, so a schema behind the code (a
    release whose `migrate up` has not run yet) is one clear error, not an
    odd failure in the middle of a run.
    """
    latest = latest_id()
    if not pg.migration_applied(latest):
        raise SchemaNotReady(
            f"the database schema is older than this code (migration {latest} is not "
            "applied); run `dnd-client migrate up`"
        )


def yoyo_url(database_url: str) -> str:
    """DATABASE_URL in yoyo's dialect: the psycopg 3 backend is ``postgresql+psycopg``."""
    parts = urlsplit(database_url)
    return urlunsplit(parts._replace(scheme="postgresql+psycopg"))


@contextlib.contextmanager
def _backend(settings: Settings) -> Iterator[Any]:
    from yoyo import get_backend

    with postgres_errors(settings):
        backend = get_backend(yoyo_url(settings.database_url))
    try:
        yield backend
    finally:
        with contextlib.suppress(Exception):
            backend.connection.close()


def _migrations() -> Any:
    from yoyo import read_migrations

    return read_migrations(str(migrations_dir()))


def status(settings: Settings) -> list[MigrationState]:
    """Every migration, in order, with whether and when it was applied."""
    migrations = _migrations()
    with _backend(settings) as backend, postgres_errors(settings):
        applied_at = _applied_at(backend)
        return [MigrationState(m.id, m.id in applied_at, applied_at.get(m.id)) for m in migrations]


def up(settings: Settings) -> list[str]:
    """Apply pending migrations; returns their IDs (none: already up to date)."""
    migrations = _migrations()
    with _backend(settings) as backend, postgres_errors(settings), _yoyo_lock(backend):
        pending = backend.to_apply(migrations)
        backend.apply_migrations(pending)
        return [m.id for m in pending]


def down(settings: Settings, *, steps: int | None = 1) -> list[str]:
    """Roll back the last ``steps`` applied migrations (all when None); returns their IDs."""
    migrations = _migrations()
    with _backend(settings) as backend, postgres_errors(settings), _yoyo_lock(backend):
        applied = backend.to_rollback(migrations)  # newest first
        chosen = applied if steps is None else applied[:steps]
        backend.rollback_migrations(chosen)
        return [m.id for m in chosen]


def pending(settings: Settings) -> list[str]:
    return [state.id for state in status(settings) if not state.applied]


@contextlib.contextmanager
def _yoyo_lock(backend: Any) -> Iterator[None]:
    from yoyo.exceptions import LockTimeout as YoyoLockTimeout

    try:
        with backend.lock(timeout=60):
            yield
    except YoyoLockTimeout as exc:
        raise StoreError(
            "another migration has held yoyo's lock for 60 s; if no migration is running, "
            "a crashed one left it: `yoyo break-lock`"
        ) from exc


def _applied_at(backend: Any) -> dict[str, datetime]:
    table = backend.migration_table
    if table not in backend.list_tables():
        return {}
    cursor = backend.execute(
        f"SELECT migration_id, applied_at_utc FROM {backend.quote_identifier(table)}"
    )
    # yoyo stores naive UTC timestamps.
    return {row[0]: row[1].replace(tzinfo=UTC) for row in cursor.fetchall()}
