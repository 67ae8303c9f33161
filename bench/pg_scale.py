"""PostgreSQL at scale: backups and one-session operations as the tables grow.

    python bench/pg_scale.py [--stages 0,5,20] [--new-sessions 100] [--messages 1000]
                             [--append 100] [--repeat 3] [--results-sessions 2500]
                             [--results-runs 8760] [--json] [--keep] [--explain]

Makes its own database (migrated) and Redis key prefix, and for each stage grows
client_messages to that many million rows of other sessions (generated in SQL with
generate_series, with their client_sessions rows and backup_watermarks, so the engine sees
them as backed up), then measures, in this process (the engine, as a worker runs it):

  new sessions    backup --all of NEW x MESSAGES messages just written to Redis: msg/s
  appends         the same sessions with APPEND more messages each, backed up again: msg/s
  restore         restore --session --force of one 10,000-message session whose rows are
                  spread over the table (every k-th row of the load): ms
  backup          backup --session of that session, unchanged (as the watermark says): ms
  verify          verify --session of that session (messages read back from both): ms

Then persistence_snapshots and persistence_session_results grow by a year of hourly full
runs (RUNS runs x RESULTS_SESSIONS sessions), and so do the history tables (migration 0010)
as those runs would leave them (in SQL, keys and indexes rebuilt after; LOAD_CAPTURES...):

  history_captures          one capture per run per session, hourly over the past year
                            (8,760 x 2,500 = 21.9M), message_count rising, max_score never
                            falling; and one per run of the big session, whose max_score is
                            a real message's epoch ms: capture h saw its oldest N x h / RUNS
  history_session_versions  each tenth capture replaced the session row (2.2M), the big
                            session's too
  history_messages          each tenth capture, one message edited (earlier content kept)
                            and one removed, per session (4.4M); the big session's name its
                            real messages

and the last stage is measured again, with three figures more:

  as-of restore   restore --session --as-of T --force of the big session (its keys deleted
                  first, as for restore), T half an hour after its middle capture (mid-year):
                  it must bring back what history_messages_as_of counts (a strict subset): ms
  as-of verify    verify --session --as-of T of it, right after (it must agree): ms
  fold            fold_history of the oldest hour (before = oldest capture + 1 hour), as
                  the hourly retention job runs it, rolled back (each repeat folds the same): ms

Timings are the run's own (start to finish in this process, perf_counter), best and
median of --repeat; the load average is printed with each stage. The database and keys
are dropped at the end (not with --keep). Exit 0 whatever the figures; 1 when something
could not be measured; 2 on a bad argument.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import statistics
import sys
import time
import uuid
from collections.abc import Iterator
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import psycopg
import redis
from psycopg import sql

sys.path.insert(0, str(Path(__file__).resolve().parent))

from backup_restore import (
    ADMIN_URL,
    REDIS_URL,
    BenchError,
    bench_database,
    code_version,
    delete_prefix,
    fill,
    log,
    message,
)

from worker import migrate
from worker.connections import connect_postgres, connect_redis
from worker.errors import DndError
from worker.keys import RedisKeys
from worker.models import BackupOptions, RestoreOptions, Run, RunOptions, VerifyOptions
from worker.runner import run_local
from worker.services import open_services
from worker.settings import Settings
from worker.sql import QUERIES

BIG = str(uuid.UUID("00000000-0000-4000-8000-00000000b16b"))
BIG_MESSAGES = 10_000
MESSAGES_PER_BASE_SESSION = 1000
# Base rows: session n is md5('s' || n)::uuid; messages 10 ms apart from this instant.
BASE_START = "2025-01-01 00:00:00+00"

# Rows of other sessions, with every k-th row the big session's (so that its 10,000
# messages are spread over what this load adds, as a long-lived session's are).
LOAD_MESSAGES = """
INSERT INTO client_messages (id, session_id, created_at, role, content, tool_calls, player_id)
SELECT gen_random_uuid(),
       CASE WHEN i %% %(every)s = 0 THEN %(big)s::uuid
            ELSE md5('s' || (i %% %(sessions)s))::uuid END,
       %(start)s::timestamptz + (%(first)s + i) * interval '10 milliseconds',
       (ARRAY['user', 'assistant', 'tool', 'system'])[1 + i %% 4],
       'The goblin lunges from the shadows, rusty blade first. ' || md5(i::text),
       NULL,
       CASE WHEN i %% 4 = 0 THEN 'player-' || (i %% 6) END
FROM generate_series(1, %(rows)s) AS i
"""
BASE_SESSIONS = """
INSERT INTO client_sessions (id, created_at, updated_at, name, creator_id, mcp_server_url,
                             websocket_key, max_players, settings, status)
SELECT md5('s' || n)::uuid, %(start)s::timestamptz, %(start)s::timestamptz, 'Campaign ' || n,
       'user-' || (n %% 5000), 'http://mcp.internal:9000/sse', md5('k' || n), 6,
       '{"dice": "d20"}'::jsonb, 'active'
FROM generate_series(0, %(sessions)s - 1) AS n
UNION ALL
SELECT %(big)s::uuid, %(start)s::timestamptz, %(start)s::timestamptz, 'The long campaign',
       'user-1', 'http://mcp.internal:9000/sse', 'bigkey', 6, '{"dice": "d20"}'::jsonb, 'active'
ON CONFLICT (id) DO NOTHING
"""
# What a backup leaves for a session it has stored: its count and the newest score.
BASE_WATERMARKS = """
INSERT INTO backup_watermarks (session_id, hash_digest, message_count, max_score)
SELECT session_id, NULL, count(*), floor(extract(epoch FROM max(created_at)) * 1000)
FROM client_messages WHERE session_id <> %(big)s::uuid
GROUP BY session_id
ON CONFLICT (session_id) DO UPDATE SET
    message_count = EXCLUDED.message_count, max_score = EXCLUDED.max_score
"""
LOAD_RUNS = """
INSERT INTO persistence_snapshots (id, created_at, kind, scope, status, session_count,
                                   expected_sessions, finished_at, duration_ms, details)
SELECT md5('run' || h)::uuid, now() - (%(runs)s - h) * interval '1 hour' - interval '1 hour',
       'backup', 'all', 'completed', %(sessions)s, %(sessions)s,
       now() - (%(runs)s - h) * interval '1 hour' - interval '59 minutes', 60000,
       '{"mode": "celery", "trigger": "schedule"}'
FROM generate_series(1, %(runs)s) AS h
"""
LOAD_RESULTS = """
INSERT INTO persistence_session_results (snapshot_id, session_id, status, messages, kept,
                                         duration_ms, shard, worker, finished_at)
SELECT md5('run' || h)::uuid, md5('s' || s)::uuid, 'unchanged', 0, 0, 2, s %% 8,
       'celery@worker-' || (s %% 4), now() - (%(runs)s - h) * interval '1 hour'
       - interval '1 hour' + s * interval '1 millisecond'
FROM generate_series(1, %(runs)s) AS h, generate_series(0, %(sessions)s - 1) AS s
"""

# History (migrations/0010) of the same runs: one capture per run per session, session s
# at its run's start + (s + 1) ms + up to a minute (h * 37 mod 60 s: a run does not begin
# on the same microsecond every hour; %(end)s: when the load began).
# Every capture saw three new messages (and, each tenth, one removed and one edited);
# max_score is the newest message's score (epoch ms), a minute before the capture.
LOAD_CAPTURES = """
INSERT INTO history_captures (session_id, captured_at, snapshot_id, message_count, max_score,
                              hash_changed, added, removed, edited)
SELECT md5('s' || s)::uuid, at, md5('run' || h)::uuid, 20 + s %% 50 + 3 * h - h / 10,
       floor(extract(epoch FROM at) * 1000) - 60000 - s %% 1000, h %% 10 = 0, 3,
       (h %% 10 = 0)::int, (h %% 10 = 0)::int
FROM generate_series(1, %(runs)s) AS h,
     LATERAL generate_series(0, %(sessions)s - 1 + 0 * h) AS s,
     LATERAL (SELECT %(end)s::timestamptz - (%(runs)s - h) * interval '1 hour'
                     - interval '1 hour' + (h * 37 %% 60) * interval '1 second'
                     + (s + 1) * interval '1 millisecond' AS at) AS t
"""
# The session row each tenth capture replaced (its hash changed: a turn of the game).
LOAD_VERSIONS = """
INSERT INTO history_session_versions (session_id, replaced_at, snapshot_id, created_at,
                                      updated_at, name, creator_id, mcp_server_url,
                                      websocket_key, max_players, settings, status)
SELECT md5('s' || s)::uuid, at, md5('run' || 10 * j)::uuid, %(start)s::timestamptz,
       at - interval '10 hours', 'Campaign ' || s, 'user-' || (s %% 5000),
       'http://mcp.internal:9000/sse', md5('k' || s), 6,
       jsonb_build_object('dice', 'd20', 'turn', j - 1), 'active'
FROM generate_series(1, %(runs)s / 10) AS j,
     LATERAL generate_series(0, %(sessions)s - 1 + 0 * j) AS s,
     LATERAL (SELECT %(end)s::timestamptz - (%(runs)s - 10 * j) * interval '1 hour'
                     - interval '1 hour' + (10 * j * 37 %% 60) * interval '1 second'
                     + (s + 1) * interval '1 millisecond' AS at) AS t
"""
# Each tenth capture: one message edited (its earlier content kept) and one removed.
LOAD_MARKS = """
INSERT INTO history_messages (session_id, message_id, captured_at, snapshot_id, change,
                              created_at, role, content, tool_calls, player_id)
SELECT md5('s' || s)::uuid, md5(mark || '-' || j || '-' || s)::uuid, at,
       md5('run' || 10 * j)::uuid, mark,
       CASE WHEN mark = 'edited' THEN at - interval '5 hours' END,
       CASE WHEN mark = 'edited' THEN 'assistant' END,
       CASE WHEN mark = 'edited' THEN 'The goblin lunges, before a typo was fixed. '
                                      || md5(j || '-' || s) END,
       NULL, NULL
FROM generate_series(1, %(runs)s / 10) AS j,
     LATERAL generate_series(0, %(sessions)s - 1 + 0 * j) AS s,
     LATERAL (VALUES ('edited'), ('removed')) AS k (mark),
     LATERAL (SELECT %(end)s::timestamptz - (%(runs)s - 10 * j) * interval '1 hour'
                     - interval '1 hour' + (10 * j * 37 %% 60) * interval '1 second'
                     + (s + 1) * interval '1 millisecond' AS at) AS t
"""
# The big session's year, over its real messages (LOAD_MESSAGES: created_at 10 ms apart,
# k-th oldest = rank k): capture h saw the first N x h / RUNS of them (max_score = that
# message's epoch ms), so a moment of the year restores a share of them; each tenth
# capture removed the message 5 below its top and kept the earlier content of the one at
# half its top (edited), and replaced the session row. BIG_RANKED heads each LOAD_BIG_*.
BIG_RANKED = """
WITH ranked AS (
    SELECT row_number() OVER (ORDER BY created_at, id) AS k, id, created_at, role, content,
           player_id
    FROM client_messages WHERE session_id = %(big)s::uuid
),
n AS (SELECT count(*) AS n FROM ranked),
hours AS (
    SELECT h, greatest((n * h) / %(runs)s, 1) AS top,
           %(end)s::timestamptz - (%(runs)s - h) * interval '1 hour' - interval '1 hour'
           + (h * 37 %% 60) * interval '1 second' + (%(sessions)s + 1) * interval '1 millisecond'
           AS at
    FROM generate_series(1, %(runs)s) AS h, n
)
"""
LOAD_BIG_CAPTURES = """
INSERT INTO history_captures (session_id, captured_at, snapshot_id, message_count, max_score,
                              hash_changed, added, removed, edited)
SELECT %(big)s::uuid, hours.at, md5('run' || h)::uuid, top - h / 10,
       floor(extract(epoch FROM r.created_at) * 1000), h %% 10 = 0, 1,
       (h %% 10 = 0)::int, (h %% 10 = 0)::int
FROM hours JOIN ranked r ON r.k = hours.top
"""
LOAD_BIG_VERSIONS = """
INSERT INTO history_session_versions (session_id, replaced_at, snapshot_id, created_at,
                                      updated_at, name, creator_id, mcp_server_url,
                                      websocket_key, max_players, settings, status)
SELECT %(big)s::uuid, at, md5('run' || h)::uuid, %(start)s::timestamptz,
       at - interval '10 hours', 'The long campaign', 'user-1',
       'http://mcp.internal:9000/sse', 'bigkey', 6,
       jsonb_build_object('dice', 'd20', 'turn', h / 10 - 1), 'active'
FROM hours WHERE h %% 10 = 0
"""
LOAD_BIG_MARKS = """
INSERT INTO history_messages (session_id, message_id, captured_at, snapshot_id, change,
                              created_at, role, content, tool_calls, player_id)
SELECT %(big)s::uuid, r.id, hours.at, md5('run' || h)::uuid, 'edited', r.created_at,
       r.role, 'Before an edit: ' || r.content, NULL::jsonb, r.player_id
FROM hours JOIN ranked r ON r.k = greatest(hours.top / 2, 1)
WHERE h %% 10 = 0
UNION ALL
SELECT %(big)s::uuid, r.id, hours.at, md5('run' || h)::uuid, 'removed', NULL, NULL, NULL,
       NULL, NULL
FROM hours JOIN ranked r ON r.k = greatest(hours.top - 5, 1)
WHERE h %% 10 = 0
"""


@contextlib.contextmanager
def without_indexes(conn: psycopg.Connection[Any], table: str) -> Iterator[None]:
    """Drop the table's constraints (but NOT NULL / CHECK) and indexes; rebuild them after.

    Loading tens of millions of rows is several times faster into a bare heap; the
    definitions are read from the catalog, so whatever the migrations made is rebuilt.
    """
    constraints = conn.execute(
        "SELECT conname, pg_get_constraintdef(oid) FROM pg_constraint "
        "WHERE conrelid = %s::regclass AND contype IN ('p', 'u', 'f') "
        "ORDER BY contype = 'f' DESC",
        (table,),
    ).fetchall()
    indexes = conn.execute(
        "SELECT indexname, indexdef FROM pg_indexes WHERE tablename = %s "
        "AND indexname NOT IN (SELECT conname FROM pg_constraint WHERE conrelid = %s::regclass)",
        (table, table),
    ).fetchall()
    ident = sql.Identifier(table)
    for name, _ in constraints:
        conn.execute(
            sql.SQL("ALTER TABLE {} DROP CONSTRAINT {}").format(ident, sql.Identifier(name))
        )
    for name, _ in indexes:
        conn.execute(sql.SQL("DROP INDEX {}").format(sql.Identifier(name)))
    yield
    conn.execute("SET maintenance_work_mem = '512MB'")
    for _, definition in indexes:
        conn.execute(definition)
    for name, definition in reversed(constraints):  # keys first, then foreign keys
        conn.execute(
            sql.SQL("ALTER TABLE {} ADD CONSTRAINT {} " + definition).format(
                ident, sql.Identifier(name)
            )
        )


def settle(conn: psycopg.Connection[Any]) -> None:
    conn.execute("VACUUM ANALYZE")
    conn.execute("CHECKPOINT")


def one(conn: psycopg.Connection[Any], query: str, params: tuple[Any, ...]) -> Any:
    row = conn.execute(query, params).fetchone()
    if row is None:
        raise BenchError(f"no row: {query}")
    return row


def grow_messages(conn: psycopg.Connection[Any], target: int) -> int:
    """client_messages to ``target`` rows of other sessions plus the big session's 10,000."""
    others = one(conn, "SELECT count(*) FROM client_messages WHERE session_id <> %s", (BIG,))[0]
    add = max(target - others, 0)
    rows = add + BIG_MESSAGES
    every = rows // BIG_MESSAGES
    sessions = max(target // MESSAGES_PER_BASE_SESSION, 1)
    conn.execute("DELETE FROM client_messages WHERE session_id = %s", (BIG,))
    conn.execute(BASE_SESSIONS, {"start": BASE_START, "sessions": sessions, "big": BIG})
    started = time.monotonic()
    with without_indexes(conn, "client_messages"):
        conn.execute(LOAD_MESSAGES, {
            "every": every, "big": BIG, "sessions": sessions, "start": BASE_START,
            "first": others, "rows": rows,
        })  # fmt: skip
        # rows // every may exceed 10,000 by a little: the newest extra ones go.
        conn.execute(
            "DELETE FROM client_messages WHERE id IN (SELECT id FROM client_messages "
            "WHERE session_id = %s ORDER BY created_at DESC OFFSET %s)",
            (BIG, BIG_MESSAGES),
        )
        log(f"  {rows:,} rows in {time.monotonic() - started:.0f} s; indexes and keys...")
    conn.execute(BASE_WATERMARKS, {"big": BIG})
    settle(conn)
    log(f"  client_messages grown by {rows:,} rows in {time.monotonic() - started:.0f} s")
    return sessions


def grow_results(conn: psycopg.Connection[Any], runs: int, sessions: int) -> None:
    started = time.monotonic()
    params = {"runs": runs, "sessions": sessions}
    conn.execute(LOAD_RUNS, params)
    with without_indexes(conn, "persistence_session_results"):
        conn.execute(LOAD_RESULTS, params)
    settle(conn)
    log(f"  {runs:,} runs x {sessions:,} results in {time.monotonic() - started:.0f} s")


def grow_history(conn: psycopg.Connection[Any], runs: int, sessions: int) -> None:
    """The history tables as the same year of hourly runs leaves them (the SQL above)."""
    started = time.monotonic()
    [end] = one(conn, "SELECT now()", ())
    params = {"runs": runs, "sessions": sessions, "end": end, "start": BASE_START, "big": BIG}
    for table, load, big in (("history_captures", LOAD_CAPTURES, LOAD_BIG_CAPTURES),
                             ("history_session_versions", LOAD_VERSIONS, LOAD_BIG_VERSIONS),
                             ("history_messages", LOAD_MARKS, LOAD_BIG_MARKS)):  # fmt: skip
        with without_indexes(conn, table):
            conn.execute(load, params)
            conn.execute(BIG_RANKED + big, params)
        log(f"  {table} in {time.monotonic() - started:.0f} s")
    settle(conn)
    log(f"  history of {runs:,} runs x {sessions + 1:,} sessions in "
        f"{time.monotonic() - started:.0f} s")  # fmt: skip


HISTORY_TABLES = ("history_captures", "history_session_versions", "history_messages")


def table_sizes(conn: psycopg.Connection[Any]) -> dict[str, dict[str, float]]:
    out = {}
    for table in ("client_messages", "client_sessions", "backup_watermarks",
                  "persistence_snapshots", "persistence_session_results",
                  *HISTORY_TABLES):  # fmt: skip
        rows, total = one(
            conn,
            "SELECT reltuples::bigint, pg_total_relation_size(oid) FROM pg_class "
            "WHERE oid = %s::regclass",
            (table,),
        )
        out[table] = {"rows": max(int(rows), 0), "total_mb": round(total / 2**20)}
    return out


# -- measuring ----------------------------------------------------------------


def timed_run(services: Any, options: RunOptions, ids: list[str] | None) -> tuple[float, Run]:
    started = time.perf_counter()
    run = run_local(services, options, session_ids=ids)
    seconds = time.perf_counter() - started
    if run.status.value != "completed":
        raise BenchError(f"{options.kind} run {run.id} ended {run.status.value}: {run.error}")
    return seconds, run


def append(r: redis.Redis, keys: RedisKeys, ids: list[str], count: int) -> int:
    """COUNT more messages per session, newer than any fill() writes (2027)."""
    import random

    rng = random.Random(7)
    pipe = r.pipeline(transaction=False)
    at = 1_800_000_000_000_000
    for sid in ids:
        members = {}
        for i in range(count):
            at += rng.randrange(500_000, 3_000_000)
            members[message(sid, i, at, rng)] = at // 1000
        pipe.zadd(keys.messages(sid), members)
    pipe.execute()
    return count * len(ids)


def throughput(
    services: Any, r: redis.Redis, keys: RedisKeys, args: argparse.Namespace
) -> dict[str, Any]:
    new, appended = [], []
    for _ in range(args.repeat):
        ids, _ = fill(r, keys, args.new_sessions, args.messages)
        seconds, run = timed_run(services, BackupOptions(), None)
        if run.message_count != args.new_sessions * args.messages:
            raise BenchError(f"new sessions: stored {run.message_count} messages")
        new.append(run.message_count / seconds)
        added = append(r, keys, ids, args.append)
        seconds, run = timed_run(services, BackupOptions(), None)
        if run.message_count != added:
            raise BenchError(f"appends: stored {run.message_count} of {added} messages")
        appended.append(added / seconds)
        delete_prefix(r, keys.prefix)
    return {"new msg/s": summary(new, best=max), "append msg/s": summary(appended, best=max)}


def one_session(services: Any, r: redis.Redis, keys: RedisKeys, repeat: int) -> dict[str, Any]:
    restore, backup, verify = [], [], []
    for _ in range(repeat):
        r.delete(keys.messages(BIG), keys.session(BIG))
        seconds, run = timed_run(services, RestoreOptions(force=True), [BIG])
        if run.message_count != BIG_MESSAGES:
            raise BenchError(f"restore brought back {run.message_count} messages")
        restore.append(seconds * 1000)
        seconds, run = timed_run(services, BackupOptions(), [BIG])
        backup.append(seconds * 1000)
        seconds, run = timed_run(services, VerifyOptions(), [BIG])
        verify.append(seconds * 1000)
    delete_prefix(r, keys.prefix)  # the session set's member too
    best = min
    return {"restore 10k ms": summary(restore, best), "backup 10k ms": summary(backup, best),
            "verify 10k ms": summary(verify, best)}  # fmt: skip


def middle_of_history(conn: psycopg.Connection[Any]) -> datetime | None:
    """Half an hour after the big session's middle capture (None: its history not grown)."""
    [count] = one(conn, "SELECT count(*) FROM history_captures WHERE session_id = %s", (BIG,))
    if count < 100:
        return None
    [at] = one(conn, "SELECT captured_at FROM history_captures WHERE session_id = %s "
               "ORDER BY captured_at OFFSET %s LIMIT 1", (BIG, count // 2))  # fmt: skip
    return at + timedelta(minutes=30)  # type: ignore[no-any-return]


def as_of_session(conn: psycopg.Connection[Any], services: Any, r: redis.Redis,
                  keys: RedisKeys, repeat: int, moment: datetime) -> dict[str, Any]:  # fmt: skip
    """restore --session --as-of (forced, into the live data), then verify --as-of."""
    as_of = moment.isoformat()
    [expected] = one(conn, "SELECT count(*) FROM history_messages_as_of(ARRAY[%s]::uuid[], %s)",
                     (BIG, moment))  # fmt: skip
    if not 0 < expected < BIG_MESSAGES:
        raise BenchError(f"as of {as_of} history holds {expected} of the big session's messages")
    restore, verify = [], []
    for _ in range(repeat):
        r.delete(keys.messages(BIG), keys.session(BIG))
        seconds, run = timed_run(services, RestoreOptions(force=True, as_of=as_of), [BIG])
        if run.message_count != expected:
            raise BenchError(f"as-of restore brought back {run.message_count} of {expected}")
        restore.append(seconds * 1000)
        seconds, run = timed_run(services, VerifyOptions(as_of=as_of), [BIG])
        verify.append(seconds * 1000)
    delete_prefix(r, keys.prefix)
    return {"as of": as_of, "as-of messages": expected, "as-of restore ms": summary(restore, min),
            "as-of verify ms": summary(verify, min)}  # fmt: skip


def fold(conn: psycopg.Connection[Any], services: Any, repeat: int) -> dict[str, Any]:
    """fold_history of the oldest hour, as the hourly retention job runs it (rolled back)."""
    [oldest] = one(conn, "SELECT min(captured_at) FROM history_captures", ())
    before = oldest + timedelta(hours=1)
    times, folded = [], {}
    for _ in range(repeat):
        started = time.perf_counter()
        folded = services.pg.fold_history(before, dry_run=True)
        times.append((time.perf_counter() - started) * 1000)
    if not folded.get("sessions"):
        raise BenchError(f"fold_history before {before} folded nothing: {folded}")
    return {"fold ms": summary(times, min), "folded": folded}


def summary(values: list[float], best: Any) -> dict[str, Any]:
    return {"best": round(best(values), 1), "median": round(statistics.median(values), 1),
            "first": round(values[0], 1), "all": [round(v, 1) for v in values]}  # fmt: skip


EXPLAINED = {
    "restore/verify read": "SELECT * FROM client_messages WHERE session_id = ANY(%(ids)s::uuid[])",
    "merge_rejects lookup": "SELECT m.id FROM client_messages m WHERE m.id = ANY(%(mids)s::uuid[]) "
    "AND m.session_id <> %(big)s::uuid",
}


EXPLAINED_HISTORY = {
    "as-of session row": "SELECT * FROM history_sessions_as_of(%(ids)s::uuid[], %(at)s)",
    "as-of messages": "SELECT count(*) FROM history_messages_as_of(%(ids)s::uuid[], %(at)s)",
    "fold_history (rolled back)": QUERIES["fold_history"],
}


def explain(conn: psycopg.Connection[Any], moment: datetime | None) -> dict[str, str]:
    mids = [row[0] for row in conn.execute(
        "SELECT id FROM client_messages WHERE session_id = %s LIMIT 5000", (BIG,))]  # fmt: skip
    params = {"ids": [BIG], "mids": mids, "big": BIG, "at": moment}
    if moment is not None:
        [oldest] = one(conn, "SELECT min(captured_at) FROM history_captures", ())
        params["before"] = oldest + timedelta(hours=1)
    queries = EXPLAINED | (EXPLAINED_HISTORY if moment is not None else {})
    out = {}
    for name, query in queries.items():
        with conn.transaction(force_rollback=True):  # the fold deletes and updates
            plan = conn.execute("EXPLAIN (ANALYZE, BUFFERS) " + query, params).fetchall()
        # Array literals in the plan run to thousands of characters: cut long lines.
        out[name] = "\n".join(row[0][:160] for row in plan)
    return out


def stage(name: str, conn: Any, services: Any, r: redis.Redis, keys: RedisKeys,
          args: argparse.Namespace, *, history: bool = False) -> dict[str, Any]:  # fmt: skip
    """Measure; with ``history`` (grown), the as-of restore and verify and the fold too."""
    load = os.getloadavg()
    log(f"measuring: {name} (load {load[0]:.2f})")
    figures = {"stage": name, "load_average": [round(x, 2) for x in load],
               "tables": table_sizes(conn)}  # fmt: skip
    figures |= throughput(services, r, keys, args)
    # The throughput rounds just wrote (NEW x MESSAGES + APPEND) x REPEAT rows; let the
    # planner see them, as autovacuum's analyze does within its minute. Without this,
    # at the 0M stage the statistics still say the big session is the whole table and
    # its read is a Seq Scan of the 330,000 rows (30 ms more per restore and verify).
    conn.execute("ANALYZE")
    figures |= one_session(services, r, keys, args.repeat)
    moment = middle_of_history(conn) if history else None
    if moment is not None:
        figures |= as_of_session(conn, services, r, keys, args.repeat, moment)
        figures |= fold(conn, services, args.repeat)
    if args.explain:
        figures["plans"] = explain(conn, moment)
    log(f"  {json.dumps({k: v for k, v in figures.items() if k not in ('tables', 'plans')})}")
    return figures


def bench(args: argparse.Namespace) -> dict[str, Any]:
    tag = uuid.uuid4().hex[:8]
    keys = RedisKeys(f"bench-{tag}:")
    r = connect_redis(args.redis_url)
    out: dict[str, Any] = {"code": code_version(), "args": vars(args), "stages": []}
    try:
        if args.measure:
            measure_only(args, args.measure, keys, r, out)
            return out
        with bench_database(args.admin_url, args.keep) as db_url:
            env = {**os.environ, "DATABASE_URL": db_url, "REDIS_URL": args.redis_url,
                   "REDIS_KEY_PREFIX": keys.prefix}  # fmt: skip
            settings = Settings.from_env(env)
            migrate.up(settings)
            with connect_postgres(settings) as conn, open_services(settings) as services:
                conn.autocommit = True
                for millions in args.stages:
                    log(f"stage: client_messages at {millions}M rows")
                    grow_messages(conn, int(millions * 1_000_000))
                    name = f"{millions:g}M messages"
                    out["stages"].append(stage(name, conn, services, r, keys, args))
                if args.results_runs:
                    log("stage: a year of hourly runs in persistence_session_results and history")
                    grow_results(conn, args.results_runs, args.results_sessions)
                    grow_history(conn, args.results_runs, args.results_sessions)
                    name = (f"{args.stages[-1]:g}M messages + {args.results_runs:,} runs x "
                            f"{args.results_sessions:,} results and history")  # fmt: skip
                    out["stages"].append(stage(name, conn, services, r, keys, args, history=True))
    finally:
        if not args.keep:
            delete_prefix(r, keys.prefix)
        r.close()
    return out


def measure_only(args: argparse.Namespace, db_url: str, keys: RedisKeys, r: redis.Redis,
                 out: dict[str, Any]) -> None:  # fmt: skip
    """One stage on a database left by --keep, as it is (other code, same data)."""
    env = {**os.environ, "DATABASE_URL": db_url, "REDIS_URL": args.redis_url,
           "REDIS_KEY_PREFIX": keys.prefix}  # fmt: skip
    settings = Settings.from_env(env)
    with connect_postgres(settings) as conn, open_services(settings) as services:
        conn.autocommit = True
        out["stages"].append(stage(f"{db_url.rsplit('/', 1)[-1]} as it is", conn, services, r,
                                   keys, args, history=True))  # fmt: skip


ONE_SESSION = ("restore 10k ms", "backup 10k ms", "verify 10k ms", "as-of restore ms",
               "as-of verify ms")  # fmt: skip


def report(out: dict[str, Any]) -> str:
    head = ("stage", "load", "msgs", "results", "history", "new msg/s", "append msg/s",
            "restore ms", "backup ms", "verify ms", "as-of restore", "as-of verify",
            "fold ms")  # fmt: skip
    rows = [head]
    for s in out["stages"]:
        history = sum(s["tables"].get(t, {}).get("rows", 0) for t in HISTORY_TABLES)
        rows.append((
            s["stage"], f"{s['load_average'][0]:.2f}",
            f"{s['tables']['client_messages']['rows']:,}",
            f"{s['tables']['persistence_session_results']['rows']:,}", f"{history:,}",
            f"{s['new msg/s']['best']:,.0f}", f"{s['append msg/s']['best']:,.0f}",
            *(f"{s[k]['best']:.0f} / {s[k]['median']:.0f}" if k in s else "-"
              for k in (*ONE_SESSION, "fold ms")),
        ))  # fmt: skip
    widths = [max(len(row[i]) for row in rows) for i in range(len(head))]
    lines = [f"code {out['code']}; msg/s: best of {out['args']['repeat']}; ms: best / median", ""]
    for row in rows:
        lines.append(
            "  ".join(
                [row[0].ljust(widths[0])]
                + [c.rjust(w) for c, w in zip(row[1:], widths[1:], strict=True)]
            )
        )
    first, last = out["stages"][0], out["stages"][-1]
    lines.append("")
    for key in ("new msg/s", "append msg/s"):
        drop = 1 - last[key]["best"] / first[key]["best"]
        verdict = "MISS" if drop > 0.2 else "PASS"
        lines.append(
            f"{verdict}  {key}: {drop:+.0%} from {first['stage']} to {last['stage']} "
            "(target: falls < 20%)"
        )
    for key in ONE_SESSION:
        measured = [s[key]["best"] for s in out["stages"] if key in s]
        if measured:
            worst = max(measured)
            lines.append(
                f"{'MISS' if worst > 100 else 'PASS'}  {key}: at most {worst:.0f} ms "
                "(target <= 100 ms)"
            )
    lines += history_lines(out)
    for s in out["stages"]:
        for name, plan in s.get("plans", {}).items():
            lines += ["", f"-- {s['stage']}: {name}", plan]
    return "\n".join(lines)


def history_lines(out: dict[str, Any]) -> list[str]:
    lines = []
    for s in out["stages"]:
        if "as of" not in s:
            continue
        lines += ["", f"history, {s['stage']}:"]
        for table in HISTORY_TABLES:
            size = s["tables"][table]
            lines.append(f"  {table}: {size['rows']:,} rows, {size['total_mb']:,} MB")
        lines.append(f"  as of {s['as of']}: {s['as-of messages']:,} of the 10k session's "
                     "messages (restored and verified)")  # fmt: skip
        lines.append(f"  fold_history of the oldest hour (rolled back): {s['folded']}")
    return lines


def main() -> int:
    parser = argparse.ArgumentParser(description="PostgreSQL at scale (see bench/README.md)")
    add = parser.add_argument
    add("--stages", default="0,5,20", help="client_messages sizes in millions of rows")
    add("--new-sessions", type=int, default=100)
    add("--messages", type=int, default=1000, help="messages per new session")
    add("--append", type=int, default=100, help="messages appended per session")
    add("--repeat", type=int, default=3)
    add("--results-sessions", type=int, default=2500, help="sessions per run in the year of runs")
    add("--results-runs", type=int, default=8760, help="runs in the year (0: skip that stage)")
    add("--admin-url", default=os.getenv("DND_BENCH_DATABASE_URL", ADMIN_URL))
    add("--redis-url", default=os.getenv("DND_BENCH_REDIS_URL", REDIS_URL))
    add("--json", action="store_true")
    add("--keep", action="store_true")
    add("--explain", action="store_true", help="EXPLAIN ANALYZE the big session's reads")
    add("--measure", metavar="DATABASE_URL", help="measure a database left by --keep, as it is")
    args = parser.parse_args()
    try:
        args.stages = [float(x) for x in args.stages.split(",")]
    except ValueError:
        parser.error("--stages: comma-separated numbers of millions, e.g. 0,5,20")
    if min(args.new_sessions, args.messages, args.append, args.repeat) < 1:
        parser.error("--new-sessions, --messages, --append and --repeat must be at least 1")
    # SIGTERM unwinds like Ctrl-C, so that the database and the keys are cleaned up.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    try:
        out = bench(args)
    except KeyboardInterrupt:
        return 130
    except (BenchError, DndError, psycopg.Error, redis.RedisError) as exc:
        log(f"error: {exc}")
        return 1
    print(json.dumps(out, indent=2) if args.json else report(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
