"""Helpers of the trust tests (verify, restore drills, prune) on the command line."""

from __future__ import annotations

from typing import Any

import redis

from tests.e2e.cli_helpers import (
    OK,
    RUN_FAILED,
    UNAVAILABLE,
    USAGE,
    assert_one_error_line,
    cli,
    cli_json,
    describe,
)
from tests.factories import make_sessions

# The command-line helpers are shared with tests/e2e/test_cli_*.py.
__all__ = [
    "DIFFERENCES",
    "OK",
    "RUN_FAILED",
    "UNAVAILABLE",
    "USAGE",
    "cli",
    "cli_json",
    "describe",
    "keys_under",
    "one_error_line",
    "result_statuses",
    "runs_of",
    "seed",
]

DIFFERENCES = 11  # verify: Redis and the backup differ

one_error_line = assert_one_error_line


def seed(env, redis_client, keys, sessions=3, messages_each=4) -> list[str]:
    ids = make_sessions(redis_client, keys, sessions, messages_each)
    done = cli(env, "backup", "--all", "--local")
    assert done.returncode == OK, describe(done)
    return ids


def keys_under(client: redis.Redis, prefix: str) -> dict[bytes, object]:
    """Every key under ``prefix`` with its value, read according to its type."""
    found: dict[bytes, object] = {}
    for key in client.scan_iter(match=f"{prefix}*", count=1000):
        kind: Any = client.type(key)
        readers: dict[bytes, Any] = {
            b"set": lambda k: sorted(client.smembers(k)),
            b"hash": client.hgetall,
            b"zset": lambda k: client.zrange(k, 0, -1, withscores=True),
            b"string": client.get,
        }
        value = readers[kind](key)
        found[key] = (kind, value, client.ttl(key))
    return found


def runs_of(pg_conn, kind: str) -> list[dict]:
    with pg_conn.cursor() as cur:
        cur.execute(
            "SELECT id::text, scope, status, details FROM persistence_snapshots"
            " WHERE kind = %s ORDER BY created_at",
            (kind,),
        )
        columns = [c.name for c in cur.description or ()]
        return [dict(zip(columns, row, strict=True)) for row in cur.fetchall()]


def result_statuses(pg_conn, run_id: str) -> dict[str, str]:
    return dict(
        pg_conn.execute(
            "SELECT session_id::text, status FROM persistence_session_results"
            " WHERE snapshot_id = %s",
            (run_id,),
        ).fetchall()
    )
