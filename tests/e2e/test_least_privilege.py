"""Least privilege: the roles and ACL users of docs/security.md are enough, and no more.

A PostgreSQL cluster and a Redis of this module's own (roles and ACL users are
server-wide: never on the shared servers) get exactly the blocks of
docs/security.md. Migrations run as the plain owner role; a backup, a restore,
a verify and a drill run through the CLI as the restricted users; and what
they must not do is refused.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psycopg
import pytest
import redis

from tests.e2e.cli_helpers import OK, cli, cli_json, describe
from tests.e2e.security_helpers import doc_block, redis_7_binary, sql_statements
from tests.factories import make_sessions
from tests.postgres_cluster import PostgresCluster, postgres_cluster
from tests.servers import RedisServer
from worker.keys import RedisKeys

PASSWORDS = {
    "OWNER_PASSWORD": "owner-" + uuid.uuid4().hex,
    "RUNTIME_PASSWORD": "runtime-" + uuid.uuid4().hex,
    "BACKUP_PASSWORD": "backup-" + uuid.uuid4().hex,
    "RESTORE_PASSWORD": "restore-" + uuid.uuid4().hex,
    "DRILL_PASSWORD": "drill-" + uuid.uuid4().hex,
    "CELERY_PASSWORD": "celery-" + uuid.uuid4().hex,
}
ADMIN_PASSWORD = "admin-" + uuid.uuid4().hex
PREFIX = "dnd:"  # the prefix the documented ACL lines are written for
DRILL_PREFIX = "drill:"


@dataclass
class Stack:
    pg: PostgresCluster
    redis_server: RedisServer

    def database(self, role: str, password_name: str) -> str:
        return self.pg.url(role, PASSWORDS[password_name], db="dnd_client")

    def redis_url(self, user: str, password_name: str) -> str:
        return f"redis://{user}:{PASSWORDS[password_name]}@127.0.0.1:{self.redis_server.port}/0"

    def admin_redis(self) -> redis.Redis:
        return redis.Redis(
            host="127.0.0.1", port=self.redis_server.port, username="admin", password=ADMIN_PASSWORD
        )

    def runtime_env(self, redis_user: str, password_name: str) -> dict[str, str]:
        return {
            "DATABASE_URL": self.database("dnd_runtime", "RUNTIME_PASSWORD"),
            "REDIS_URL": self.redis_url(redis_user, password_name),
            "REDIS_KEY_PREFIX": PREFIX,
        }


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    workdir: Path = tmp_path_factory.mktemp("least-privilege")
    with postgres_cluster("super-" + uuid.uuid4().hex) as pg:
        pg.execute(*sql_statements(doc_block("postgres-server", PASSWORDS)))
        # "as dnd_owner": the owner sets its own default privileges.
        owner_url = pg.url("dnd_owner", PASSWORDS["OWNER_PASSWORD"], db="dnd_client")
        with psycopg.connect(owner_url, autocommit=True) as conn:
            for statement in sql_statements(doc_block("postgres-database", PASSWORDS)):
                # REVOKE ... FROM PUBLIC and GRANT on public need the schema's owner
                # (pg_database_owner: dnd_owner owns the database).
                conn.execute(statement.encode())
        server = RedisServer(workdir, binary=redis_7_binary())
        try:
            setup = redis.Redis(host="127.0.0.1", port=server.port)
            setup.execute_command(
                "ACL", "SETUSER", "admin", "on", f">{ADMIN_PASSWORD}", "~*", "&*", "+@all"
            )
            lines = doc_block("redis-celery", PASSWORDS).splitlines()
            lines += doc_block("redis-acl", PASSWORDS).splitlines()
            for line in lines:
                # The last line turns `default` off: `setup` is then refused.
                setup.execute_command(*line.split())
            setup.close()
            yield Stack(pg, server)
        finally:
            server.stop()


@pytest.fixture(scope="module")
def migrated(stack: Stack) -> Stack:
    owner_env = {"DATABASE_URL": stack.database("dnd_owner", "OWNER_PASSWORD")}
    done = cli(owner_env, "migrate", "up")
    assert done.returncode == OK, describe(done)
    with psycopg.connect(stack.database("dnd_owner", "OWNER_PASSWORD"), autocommit=True) as conn:
        for statement in sql_statements(doc_block("postgres-after-migrate", PASSWORDS)):
            conn.execute(statement.encode())
    return stack


def test_migrations_run_as_a_plain_owner_role(migrated: Stack) -> None:
    owner_url = migrated.database("dnd_owner", "OWNER_PASSWORD")
    with psycopg.connect(owner_url) as conn:
        row = conn.execute(
            "SELECT rolsuper, rolcreatedb, rolcreaterole FROM pg_roles WHERE rolname = current_user"
        ).fetchone()
        owners = conn.execute(
            "SELECT DISTINCT tableowner FROM pg_tables WHERE schemaname = 'public'"
        ).fetchall()
    assert row == (False, False, False)
    assert owners == [("dnd_owner",)]
    # Down and up again: rollbacks need no more than the owner has either.
    env = {"DATABASE_URL": owner_url}
    done = cli(env, "migrate", "down", "--steps", "2", "--yes")
    assert done.returncode == OK, describe(done)
    done = cli(env, "migrate", "up")
    assert done.returncode == OK, describe(done)


def test_backup_restore_verify_and_drill_as_restricted_users(migrated: Stack) -> None:
    admin = migrated.admin_redis()
    keys = RedisKeys(PREFIX)
    ids = make_sessions(admin, keys, 4, 6)
    live_before = _dump(admin, PREFIX)

    backup_env = migrated.runtime_env("dnd-backup", "BACKUP_PASSWORD")
    report = cli_json(backup_env, "backup", "--all", "--local")
    assert (report["status"], report["session_count"], report["message_count"]) == (
        "completed", 4, 24,
    )  # fmt: skip

    # Lose the live data, restore it as the restore user.
    admin.delete(*admin.keys(f"{PREFIX}*"))
    restore_env = migrated.runtime_env("dnd-restore", "RESTORE_PASSWORD")
    report = cli_json(restore_env, "restore", "--all", "--local")
    assert (report["status"], report["session_count"]) == ("completed", 4), report
    assert _dump(admin, PREFIX) == live_before

    # verify only reads Redis: the backup user is enough.
    report = cli_json(backup_env, "verify", "--all", "--local")
    assert report["agree"] is True, report

    # A drill: reads PostgreSQL, writes only under drill:* (its own user), cleans up.
    drill_url = migrated.redis_url("dnd-drill", "DRILL_PASSWORD")
    report = cli_json(
        backup_env, "restore", "--all", "--target-redis", drill_url,
        "--target-prefix", DRILL_PREFIX, "--cleanup",
    )  # fmt: skip
    assert report["restore"]["status"] == "completed", report
    assert report["restore"]["session_count"] == 4, report
    assert report["verify"]["agree"] is True, report
    assert report["cleaned_up_keys"] == 4 * 2 + 1
    assert admin.keys(f"{DRILL_PREFIX}*") == []
    assert _dump(admin, PREFIX) == live_before
    members: Any = admin.smembers(keys.sessions)
    assert sorted(ids) == sorted(m.decode() for m in members)
    admin.close()


def test_a_full_backup_through_a_worker_as_restricted_users(
    migrated: Stack, workers: Any, tmp_path: Path
) -> None:
    """The workers as the runtime role and the backup user; Celery as its own user."""
    admin = migrated.admin_redis()
    keys = RedisKeys(PREFIX)
    make_sessions(admin, keys, 5, 3)
    total = int(admin.scard(keys.sessions))
    admin.close()
    celery = (
        f"redis://dnd-celery:{PASSWORDS['CELERY_PASSWORD']}@127.0.0.1:{migrated.redis_server.port}"
    )
    env = {
        **migrated.runtime_env("dnd-backup", "BACKUP_PASSWORD"),
        "CELERY_BROKER_URL": f"{celery}/1",
        "CELERY_RESULT_BACKEND": f"{celery}/2",
        "BACKUP_SHARDS": "2",
        "BACKUP_BATCH_SESSIONS": "2",
        "BACKUP_SCHEDULE": "off",
    }
    workers(env, concurrency=2)
    report = cli_json(env, "backup", "--all", "--full")
    assert (report["status"], report["session_count"]) == ("completed", total), report
    assert report["details"]["mode"] != "local", report


@pytest.mark.parametrize(
    "statement",
    [
        "DROP TABLE client_messages",
        "ALTER TABLE client_messages ADD COLUMN x int",
        "TRUNCATE client_messages",
        "DELETE FROM client_messages",
        "DELETE FROM client_sessions",
        "TRUNCATE persistence_snapshots",
        "DROP TABLE persistence_snapshots",
        "CREATE TABLE public.intruder (id int)",
        "INSERT INTO _yoyo_migration (migration_hash, migration_id, applied_at_utc) "
        "VALUES ('x', 'x', now())",
        "DELETE FROM _yoyo_migration",
        "CREATE INDEX ON client_messages (content)",
        "COMMENT ON TABLE client_messages IS 'x'",
        "ALTER TABLE client_messages DISABLE TRIGGER ALL",
    ],
)
def test_runtime_role_cannot(migrated: Stack, statement: str) -> None:
    with (
        psycopg.connect(migrated.database("dnd_runtime", "RUNTIME_PASSWORD")) as conn,
        pytest.raises(psycopg.errors.InsufficientPrivilege),
    ):
        conn.execute(statement.encode())


def test_runtime_role_can_what_runs_need(migrated: Stack) -> None:
    """The rights the runs use, in a transaction rolled back (the previous test proves the rest)."""
    with psycopg.connect(migrated.database("dnd_runtime", "RUNTIME_PASSWORD")) as conn:
        conn.execute("DELETE FROM persistence_snapshots WHERE false")
        conn.execute("DELETE FROM persistence_kept_records WHERE false")
        conn.execute("DELETE FROM continuous_pending WHERE false")
        conn.execute("UPDATE client_messages SET content = content WHERE false")
        conn.execute("CREATE TEMPORARY TABLE scratch (id int)")
        conn.rollback()


@pytest.mark.parametrize(
    ("user", "password", "command"),
    [
        ("dnd-backup", "BACKUP_PASSWORD", ["SET", f"{PREFIX}x", "1"]),
        ("dnd-backup", "BACKUP_PASSWORD", ["DEL", f"{PREFIX}sessions"]),
        ("dnd-backup", "BACKUP_PASSWORD", ["SADD", f"{PREFIX}sessions", "x"]),
        ("dnd-backup", "BACKUP_PASSWORD", ["ZADD", f"{PREFIX}session:x:messages", "1", "m"]),
        ("dnd-backup", "BACKUP_PASSWORD", ["EVAL", "return 1", "0"]),
        ("dnd-backup", "BACKUP_PASSWORD", ["HGETALL", "other:session:x"]),
        ("dnd-backup", "BACKUP_PASSWORD", ["FLUSHALL"]),
        ("dnd-backup", "BACKUP_PASSWORD", ["CONFIG", "SET", "maxmemory", "1"]),
        ("dnd-backup", "BACKUP_PASSWORD", ["KEYS", "*"]),
        ("dnd-restore", "RESTORE_PASSWORD", ["ZADD", "other:x", "1", "m"]),
        ("dnd-restore", "RESTORE_PASSWORD", ["FLUSHDB"]),
        ("dnd-restore", "RESTORE_PASSWORD", ["EVAL", "return redis.call('SADD', 'other', 1)", "0"]),
        ("dnd-restore", "RESTORE_PASSWORD", ["ACL", "LIST"]),
        ("dnd-drill", "DRILL_PASSWORD", ["ZADD", f"{PREFIX}session:x:messages", "1", "m"]),
        ("dnd-drill", "DRILL_PASSWORD", ["HSET", f"{PREFIX}session:x", "a", "b"]),
        ("dnd-drill", "DRILL_PASSWORD", ["HGETALL", f"{PREFIX}session:x"]),
        ("dnd-drill", "DRILL_PASSWORD", ["UNLINK", f"{PREFIX}sessions"]),
        ("dnd-drill", "DRILL_PASSWORD", ["SADD", f"{PREFIX}sessions", "x"]),
    ],
)
def test_redis_user_cannot(migrated: Stack, user: str, password: str, command: list[str]) -> None:
    port = migrated.redis_server.port
    client = redis.Redis(host="127.0.0.1", port=port, username=user, password=PASSWORDS[password])
    try:
        client.ping()  # the user exists and may connect...
        # ...but not this (a command a script runs is refused as an ERR of the script)
        with pytest.raises(redis.exceptions.ResponseError, match=r"no permissions|can't access"):
            client.execute_command(*command)
    finally:
        client.close()


def test_nobody_without_a_user_name(migrated: Stack) -> None:
    client = redis.Redis(host="127.0.0.1", port=migrated.redis_server.port)
    try:
        with pytest.raises(redis.exceptions.AuthenticationError):
            client.ping()
    finally:
        client.close()


def _dump(client: redis.Redis, prefix: str) -> dict[bytes, Any]:
    """The keys under ``prefix``: the sessions set, each hash, each message's score.

    (A restore writes the messages back as JSON of its own making: compared by
    count and score here, by content through `verify`.)
    """
    found: dict[bytes, Any] = {}
    for key in client.scan_iter(match=f"{prefix}*"):
        kind = client.type(key)
        if kind == b"set":
            found[key] = sorted(client.smembers(key))
        elif kind == b"hash":
            found[key] = sorted(client.hkeys(key))
        else:
            pairs: Any = client.zrange(key, 0, -1, withscores=True)
            found[key] = sorted(score for _, score in pairs)
    return found
