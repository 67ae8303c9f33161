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
runs (RUNS runs x RESULTS_SESSIONS sessions) and the last stage is measured again.

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


def table_sizes(conn: psycopg.Connection[Any]) -> dict[str, dict[str, float]]:
    out = {}
    for table in ("client_messages", "client_sessions", "backup_watermarks",
                  "persistence_snapshots", "persistence_session_results"):  # fmt: skip
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


def summary(values: list[float], best: Any) -> dict[str, Any]:
    return {"best": round(best(values), 1), "median": round(statistics.median(values), 1),
            "first": round(values[0], 1), "all": [round(v, 1) for v in values]}  # fmt: skip


EXPLAINED = {
    "restore/verify read": "SELECT * FROM client_messages WHERE session_id = ANY(%(ids)s::uuid[])",
    "merge_rejects lookup": "SELECT m.id FROM client_messages m WHERE m.id = ANY(%(mids)s::uuid[]) "
    "AND m.session_id <> %(big)s::uuid",
}


def explain(conn: psycopg.Connection[Any]) -> dict[str, str]:
    mids = [row[0] for row in conn.execute(
        "SELECT id FROM client_messages WHERE session_id = %s LIMIT 5000", (BIG,))]  # fmt: skip
    out = {}
    for name, query in EXPLAINED.items():
        plan = conn.execute(
            "EXPLAIN (ANALYZE, BUFFERS) " + query, {"ids": [BIG], "mids": mids, "big": BIG}
        ).fetchall()
        # Array literals in the plan run to thousands of characters: cut long lines.
        out[name] = "\n".join(row[0][:160] for row in plan)
    return out


def stage(name: str, conn: Any, services: Any, r: redis.Redis, keys: RedisKeys,
          args: argparse.Namespace) -> dict[str, Any]:  # fmt: skip
    load = os.getloadavg()
    log(f"measuring: {name} (load {load[0]:.2f})")
    figures = {"stage": name, "load_average": [round(x, 2) for x in load],
               "tables": table_sizes(conn)}  # fmt: skip
    figures |= throughput(services, r, keys, args)
    figures |= one_session(services, r, keys, args.repeat)
    if args.explain:
        figures["plans"] = explain(conn)
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
                    log("stage: a year of hourly runs in persistence_session_results")
                    grow_results(conn, args.results_runs, args.results_sessions)
                    name = (f"{args.stages[-1]:g}M messages + {args.results_runs:,} runs x "
                            f"{args.results_sessions:,} results")  # fmt: skip
                    out["stages"].append(stage(name, conn, services, r, keys, args))
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
                                   keys, args))  # fmt: skip


def report(out: dict[str, Any]) -> str:
    head = ("stage", "load", "msgs", "results", "new msg/s", "append msg/s", "restore ms",
            "backup ms", "verify ms")  # fmt: skip
    rows = [head]
    for s in out["stages"]:
        rows.append((
            s["stage"], f"{s['load_average'][0]:.2f}",
            f"{s['tables']['client_messages']['rows']:,}",
            f"{s['tables']['persistence_session_results']['rows']:,}",
            f"{s['new msg/s']['best']:,.0f}", f"{s['append msg/s']['best']:,.0f}",
            *(f"{s[k]['best']:.0f} / {s[k]['median']:.0f}"
              for k in ("restore 10k ms", "backup 10k ms", "verify 10k ms")),
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
    for key in ("restore 10k ms", "backup 10k ms", "verify 10k ms"):
        worst = max(s[key]["best"] for s in out["stages"])
        lines.append(
            f"{'MISS' if worst > 100 else 'PASS'}  {key}: at most {worst:.0f} ms (target <= 100 ms)"
        )
    for s in out["stages"]:
        for name, plan in s.get("plans", {}).items():
            lines += ["", f"-- {s['stage']}: {name}", plan]
    return "\n".join(lines)


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
