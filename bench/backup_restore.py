"""Backup/restore benchmark: the engine against the floor of what the servers can take.

    python bench/backup_restore.py [--sessions N] [--messages M] [--repeat K] [--json] [--keep]
                                   [--cluster]

Makes its own PostgreSQL database and Redis key prefix (random names), fills Redis with
N x M messages in the contract layout, and measures, in this order:

  bare COPY (floor)  the same rows, parsed beforehand, COPYed from one connection
  cold backup        `dnd-client backup --all --local` in a child process
                     (these two K times, each into an empty client_messages; best counts)
  unchanged backup   the same command again, nothing changed
  full re-backup     `backup --all --full --local`: every message merged again (the
                     path of late and edited messages)
  full restore       `dnd-client restore --all --local`, our Redis keys deleted first
  bare write (floor) the restored members, scores and hashes, built beforehand, written
                     again to another prefix with pipelined ZADDs of 5000 members

With --cluster, the same against a Redis Cluster of 3 primaries the benchmark starts
itself (REDIS_CLUSTER=1 for the children; needs the repository on PYTHONPATH).

The database and the keys are dropped at the end, also on error or Ctrl-C (not with
--keep). Exit status 0 whatever the targets; 1 when something could not be measured.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any, cast
from urllib.parse import urlsplit, urlunsplit

import orjson
import psycopg
import redis
from psycopg import sql

# The worker package of this checkout, whatever `pip install -e` points at: a bench run
# from a second worktree (the code before a change, measured beside the code after it)
# must time its own tree's code, which code_version() names.
REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from worker import migrate  # noqa: E402
from worker.connections import DataRedis, connect_cluster, connect_postgres, connect_redis  # noqa: E402
from worker.errors import DndError  # noqa: E402
from worker.keys import RedisKeys  # noqa: E402
from worker.models import MessageRow, Session  # noqa: E402
from worker.pg_store import PostgresStore  # noqa: E402
from worker.records import RecordRejected, parse_message, parse_session_hash  # noqa: E402
from worker.settings import Settings  # noqa: E402
from worker.sql import QUERIES  # noqa: E402

RSS_LIMIT_MB = 300.0
ADMIN_URL = "postgresql://postgres@127.0.0.1:5432/postgres"
REDIS_URL = "redis://127.0.0.1:6379/0"
EPOCH = datetime(1970, 1, 1)
PHRASES = [
    "The goblin lunges from the shadows, rusty blade first.",
    "I roll for perception before we open the door.",
    "Roll initiative! The gate creaks open and three kobolds pour out.",
    "Thorin casts Shield of Faith on Élodie and steps forward.",
    "The dragon's breath scorches the stone — make a DEX save, DC 15.",
    "You find 37 gold pieces, a silver locket and a note: 'Meet me at the well'.",
    "Short rest: everyone regains hit dice. 🎲",
]
# A child is started through this stub, a fresh small process: Linux carries the RSS
# high-water mark of the address space a process had before exec into its ru_maxrss,
# so a child forked straight from this (big) process would report our size, not its own.
STUB = """
import os, signal, sys, time
started = time.perf_counter()
pid = os.posix_spawn(sys.executable, [sys.executable, *sys.argv[2:]], os.environ)
signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the child from the terminal
signal.signal(signal.SIGTERM, lambda *_: os.kill(pid, signal.SIGTERM))
_, status, usage = os.wait4(pid, 0)
with open(sys.argv[1], "w") as out:
    out.write(f"{usage.ru_maxrss} {time.perf_counter() - started}")
sys.exit(os.waitstatus_to_exitcode(status))
"""


class BenchError(RuntimeError):
    """Something could not be measured (a run failed, data went missing)."""


@dataclass
class Phase:
    seconds: float  # children: the run's own duration (persistence_snapshots.duration_ms)
    items: int = 0  # messages moved (0: not a throughput figure)
    wall: float | None = None  # children: process start to exit, interpreter start included
    rss_mb: float | None = None  # children: peak RSS
    runs: list[float] = field(default_factory=list)  # every repeat's seconds


def log(text: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {text}", file=sys.stderr, flush=True)


# -- test data --------------------------------------------------------------


def iso(us: int) -> str:
    """Epoch microseconds as the application writes them: microseconds and "Z"."""
    return (EPOCH + timedelta(microseconds=us)).isoformat(timespec="microseconds") + "Z"


def message(sid: str, index: int, at_us: int, rng: random.Random) -> bytes:
    """One realistic zset member (~200-300 bytes); one in ten carries tool calls."""
    kind = index % 10
    role, tool_calls, player = "assistant", None, None
    content: str | None = rng.choice(PHRASES)
    if kind in (0, 3, 6):
        role, player = "user", f"player-{rng.randrange(6)}"
    elif kind == 2:
        call = {"name": "roll_dice", "arguments": f'{{"dice":"1d20+{rng.randrange(6)}"}}'}
        content, tool_calls = None, [{"id": f"call_{rng.getrandbits(48):012x}", "function": call}]
    elif kind == 5:
        role, content = "tool", f'{{"roll":{rng.randrange(1, 21)},"dice":"1d20"}}'
    elif kind == 8:
        role = "system"
    return orjson.dumps(
        {"id": str(uuid.uuid4()), "session_id": sid, "created_at": iso(at_us), "role": role,
         "content": content, "tool_calls": tool_calls, "player_id": player}
    )  # fmt: skip


def fill(r: redis.Redis, keys: RedisKeys, sessions: int, messages: int) -> tuple[list[str], int]:
    """N sessions x M messages, pipelined; returns the sorted IDs and the members' bytes."""
    rng = random.Random(20260212)
    ids, total_bytes = [], 0
    pipe = r.pipeline(transaction=False)
    for n in range(sessions):
        sid = str(uuid.uuid4())
        at = 1_767_600_000_000_000 + rng.randrange(30 * 86_400_000_000)  # January 2026
        pipe.hset(keys.session(sid), mapping={
            "id": sid, "name": f"Campaign {n}", "creator_id": f"user-{rng.randrange(5000)}",
            "mcp_server_url": "http://mcp.internal:9000/sse", "websocket_key": uuid.uuid4().hex,
            "max_players": str(rng.randint(2, 8)), "status": "active",
            "settings": '{"dice":"d20","difficulty":"hard","house_rules":["flanking"]}',
            "created_at": iso(at), "updated_at": iso(at + messages * 20_000_000),
        })  # fmt: skip
        members: dict[bytes, int] = {}
        for i in range(messages):
            at += rng.randrange(500_000, 30_000_000)
            member = message(sid, i, at, rng)
            members[member] = at // 1000  # the score: created_at in epoch milliseconds
            total_bytes += len(member)
            if len(members) >= 5000 or i == messages - 1:
                pipe.zadd(keys.messages(sid), members)
                members = {}
        pipe.sadd(keys.sessions, sid)
        ids.append(sid)
        if len(pipe) >= 60:
            pipe.execute()
    pipe.execute()
    return sorted(ids), total_bytes


def delete_prefix(r: redis.Redis, prefix: str) -> None:
    """DEL (not UNLINK: memory is freed before the next timed phase) every key of a prefix."""
    batch = []
    for key in r.scan_iter(match=f"{prefix}*", count=1000):
        batch.append(key)
        if len(batch) >= 500:
            r.delete(*batch)
            batch = []
    if batch:
        r.delete(*batch)


# -- the floors -------------------------------------------------------------


def read_rows(
    r: redis.Redis, keys: RedisKeys, ids: list[str]
) -> tuple[list[Session], list[MessageRow]]:
    """Sessions and message rows parsed as the engine parses them, in its order (untimed)."""
    sessions, rows = [], []
    for sid in ids:
        fields = cast(dict[bytes, bytes], r.hgetall(keys.session(sid)))
        sessions.append(parse_session_hash(sid, fields)[0])
        for raw in cast(list[bytes], r.zrange(keys.messages(sid), 0, -1)):
            row, lossy = parse_message(sid, raw)
            if lossy:
                raise BenchError(f"a generated message is lossy: {lossy}")
            rows.append(row)
    return sessions, rows


def bare_copy(conn: psycopg.Connection[Any], rows: list[MessageRow]) -> float:
    with conn.cursor() as cur:
        started = time.perf_counter()
        with cur.copy(QUERIES["copy_messages"]) as copy:
            for row in rows:
                copy.write_row(row)
        return time.perf_counter() - started


def bare_write(r: redis.Redis, keys: RedisKeys, source: RedisKeys, ids: list[str],
               settings: Settings) -> tuple[float, int]:  # fmt: skip
    """Read what the restore wrote under ``source``, delete it, write it again under ``keys``.

    Untimed: reading the hashes and members (integer scores, as the restore writes them)
    and cutting them into the restore's round trips (chunk_messages members, batch_sessions
    hashes). Timed: the writes.
    """
    chunk, batch_sessions = settings.chunk_messages, settings.batch_sessions
    hashes = {sid: cast(dict[Any, Any], r.hgetall(source.session(sid))) for sid in ids}
    chunks: list[list[tuple[str, dict[bytes, int]]]] = [[]]
    room = chunk
    for sid in ids:
        reply = r.zrange(source.messages(sid), 0, -1, withscores=True)
        pairs = cast(list[tuple[bytes, float]], reply)
        items = [(member, int(score)) for member, score in pairs]
        while items:
            take, items = items[:room], items[room:]
            chunks[-1].append((keys.messages(sid), dict(take)))
            room -= len(take)
            if not room:
                chunks.append([])
                room = chunk
    delete_prefix(r, source.prefix)  # Redis as the restore found it: our keys gone
    batches = [ids[i : i + batch_sessions] for i in range(0, len(ids), batch_sessions)]
    started = time.perf_counter()
    for pieces in chunks:
        pipe = r.pipeline(transaction=False)
        for key, mapping in pieces:
            pipe.zadd(key, mapping)
        pipe.execute()
    for batch in batches:
        pipe = r.pipeline(transaction=False)
        for sid in batch:
            pipe.hset(keys.session(sid), mapping=hashes[sid])
        pipe.sadd(keys.sessions, *batch)
        pipe.execute()
    return time.perf_counter() - started, sum(len(m) for c in chunks for _k, m in c)


# -- PostgreSQL -------------------------------------------------------------


@contextlib.contextmanager
def bench_database(admin_url: str, keep: bool) -> Iterator[str]:
    name = f"dnd_bench_{uuid.uuid4().hex[:10]}"
    with psycopg.connect(admin_url, autocommit=True) as admin:
        admin.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    log(f"database {name}")
    try:
        yield urlunsplit(urlsplit(admin_url)._replace(path=f"/{name}"))
    finally:
        if keep:
            log(f"--keep: database {name} left in place")
        else:
            with psycopg.connect(admin_url, autocommit=True) as admin:
                drop = sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)")
                admin.execute(drop.format(sql.Identifier(name)))


def settle(conn: psycopg.Connection[Any], *, empty: bool = False) -> None:
    """Make each timed phase start from the same server state (untimed).

    ``empty``: TRUNCATE client_sessions, and with it (FK CASCADE) client_messages and the
    per-session tables (watermarks, ...): empty, with their real indexes. VACUUM ANALYZE:
    hint bits, visibility map and statistics for the rows just written, as autovacuum
    would leave them. CHECKPOINT: no dirty buffers or WAL debt carried into the next phase.
    """
    if empty:
        conn.execute("TRUNCATE client_sessions CASCADE")
    conn.execute("VACUUM ANALYZE")
    conn.execute("CHECKPOINT")


# -- child processes --------------------------------------------------------


def run_cli(args: list[str], env: dict[str, str], expect_messages: int) -> Phase:
    """`python -m worker ARGS --output json` (= dnd-client ARGS) in a child of its own."""
    with tempfile.TemporaryDirectory() as tmp:
        out, err, usage = (Path(tmp, name) for name in ("stdout", "stderr", "usage"))
        with out.open("wb") as stdout, err.open("wb") as stderr:
            cmd = [sys.executable, "-c", STUB, str(usage), "-m", "worker", *args, "--output",
                   "json"]  # fmt: skip
            proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdin=subprocess.DEVNULL,
                                    stdout=stdout, stderr=stderr)  # fmt: skip
            try:
                proc.wait()
            finally:
                if proc.returncode is None:  # interrupted: stop the child, then go on unwinding
                    proc.terminate()
                    proc.wait()
        if proc.returncode != 0:
            raise BenchError(f"{' '.join(args)} exited {proc.returncode}: "
                             f"{err.read_text().strip() or out.read_text()}")  # fmt: skip
        maxrss_kb, wall = usage.read_text().split()
        run = json.loads(out.read_text())
    if run["status"] != "completed" or run["message_count"] != expect_messages:
        raise BenchError(f"{' '.join(args)}: run {run['status']} with {run['message_count']} "
                         f"messages; expected completed with {expect_messages}")  # fmt: skip
    return Phase(run["duration_ms"] / 1000, expect_messages, float(wall), int(maxrss_kb) / 1024)


# -- the run ----------------------------------------------------------------


def code_version() -> str:
    """The commit, and a digest of worker/ as it is (the tree may hold uncommitted work)."""
    imported = Path(migrate.__file__).resolve().parent
    if imported != REPO / "worker":
        raise BenchError(f"the worker package timed is {imported}, not this tree's {REPO}")
    git = ["git", "describe", "--always", "--dirty"]
    commit = subprocess.run(git, cwd=REPO, capture_output=True, text=True).stdout.strip()
    digest = hashlib.sha256()
    for path in sorted((REPO / "worker").rglob("*")):
        if path.suffix in (".py", ".sql"):
            digest.update(path.read_bytes())
    return f"{commit or '?'} worker/{digest.hexdigest()[:10]}"


@contextlib.contextmanager
def data_redis(args: argparse.Namespace) -> Iterator[tuple[str, DataRedis, dict[str, str]]]:
    """The Redis to fill: --redis-url, or a cluster of 3 primaries started for the run."""
    if not args.cluster:
        yield args.redis_url, connect_redis(args.redis_url), {}
        return
    from tests.cluster import redis_cluster

    with tempfile.TemporaryDirectory() as folder, redis_cluster(Path(folder), 3, 0) as cluster:
        log(f"started a Redis Cluster of 3 primaries: {cluster.primaries()}")
        yield cluster.url, connect_cluster(cluster.url), {"REDIS_CLUSTER": "1"}


def bench(args: argparse.Namespace) -> dict[str, Any]:
    with data_redis(args) as (redis_url, r, extra_env):
        return bench_on(args, redis_url, r, extra_env)


def bench_on(
    args: argparse.Namespace, redis_url: str, r: Any, extra_env: dict[str, str]
) -> dict[str, Any]:
    tag = uuid.uuid4().hex[:8]
    keys, floor_keys = RedisKeys(f"bench-{tag}:"), RedisKeys(f"bench-{tag}-floor:")
    total = args.sessions * args.messages
    figures: dict[str, Any] = {"sessions": args.sessions, "messages_per_session": args.messages}
    figures["redis"] = "cluster of 3 primaries" if args.cluster else "one Redis"
    try:
        with bench_database(args.admin_url, args.keep) as db_url:
            env = {**os.environ, "DATABASE_URL": db_url, "REDIS_URL": redis_url,
                   "REDIS_KEY_PREFIX": keys.prefix, **extra_env}  # fmt: skip
            settings = Settings.from_env(env)  # the children's settings, batch sizes included
            migrate.up(settings)
            log(f"filling {keys.prefix}*: {args.sessions} sessions x {args.messages} messages")
            ids, size = fill(r, keys, args.sessions, args.messages)
            figures["avg_message_bytes"] = round(size / total)
            figures["batch_sessions"] = settings.batch_sessions
            figures["code"] = code_version()
            figures["load_average"] = round(os.getloadavg()[0], 2)  # before we add to it
            with connect_postgres(settings) as conn:
                sessions, rows = read_rows(r, keys, ids)
                copies, colds = [], []
                for k in range(1, args.repeat + 1):
                    settle(conn, empty=True)
                    PostgresStore(conn, settings).upsert_sessions(sessions)  # for the FK
                    settle(conn)
                    copies.append(bare_copy(conn, rows))
                    settle(conn, empty=True)
                    colds.append(run_cli(["backup", "--all", "--local"], env, total))
                    log(f"pair {k}/{args.repeat}: bare COPY {copies[-1]:.2f} s, "
                        f"cold backup {colds[-1].seconds:.2f} s")  # fmt: skip
                del rows
                best = min(colds, key=lambda phase: phase.seconds)
                best.runs = [phase.seconds for phase in colds]
                best.rss_mb = max(phase.rss_mb or 0.0 for phase in colds)
                figures["cold backup"] = best
                figures["bare COPY (floor)"] = Phase(min(copies), total, runs=copies)
                settle(conn)  # the last cold backup's rows, as the next phases find them
                figures["unchanged backup"] = run_cli(["backup", "--all", "--local"], env, 0)
                # Every message read again and merged through the staging tables: the
                # path continuous backups take for late or edited messages.
                figures["full re-backup"] = run_cli(
                    ["backup", "--all", "--full", "--local"], env, 0
                )
                delete_prefix(r, keys.prefix)
                settle(conn)
                figures["full restore"] = run_cli(["restore", "--all", "--local"], env, total)
            seconds, written = bare_write(r, floor_keys, keys, ids, settings)
            if written != total:
                raise BenchError(f"the restore brought back {written} of {total} messages")
            figures["bare write (floor)"] = Phase(seconds, total)
    finally:
        if args.keep:
            log(f"--keep: Redis keys {keys.prefix}* and {floor_keys.prefix}* left in place")
        else:
            delete_prefix(r, keys.prefix)
            delete_prefix(r, floor_keys.prefix)
        r.close()
    return figures


def targets(fig: dict[str, Any]) -> list[tuple[str, float, str, bool]]:
    """(check, measured, target, met) for each target."""
    cold, unchanged = fig["cold backup"].seconds, fig["unchanged backup"].seconds
    backup = fig["bare COPY (floor)"].seconds / cold
    restore = fig["bare write (floor)"].seconds / fig["full restore"].seconds
    speedup = cold / max(unchanged, 0.001)
    rss = max(
        fig[name].rss_mb or 0.0 for name in ("cold backup", "unchanged backup", "full restore")
    )
    return [
        ("cold backup throughput / bare COPY throughput", backup, ">= 0.80", backup >= 0.8),
        ("cold backup time / unchanged backup time", speedup, ">= 20", speedup >= 20),
        ("restore throughput / bare write throughput", restore, ">= 0.80", restore >= 0.8),
        ("peak RSS of the child processes, MB", rss, f"< {RSS_LIMIT_MB:.0f}", rss < RSS_LIMIT_MB),
    ]


def report(fig: dict[str, Any]) -> str:
    floors = {"cold backup": ("bare COPY (floor)", ">= 0.80"),
              "full restore": ("bare write (floor)", ">= 0.80")}  # fmt: skip
    table = [("phase", "seconds", "wall s", "items/s", "peak RSS", "vs floor", "target")]
    for name, p in fig.items():
        if not isinstance(p, Phase):
            continue
        vs, target = "", ""
        if name in floors:
            vs, target = f"{fig[floors[name][0]].seconds / p.seconds:.2f}", floors[name][1]
        elif name == "unchanged backup":
            speedup = fig["cold backup"].seconds / max(p.seconds, 0.001)
            vs, target = f"cold/{speedup:.0f}", "cold/20"
        table.append((
            name, f"{p.seconds:.2f}", "" if p.wall is None else f"{p.wall:.2f}",
            f"{p.items / p.seconds:,.0f}" if p.items else "",
            "" if p.rss_mb is None else f"{p.rss_mb:.0f} MB", vs, target,
        ))  # fmt: skip
    widths = [max(len(row[i]) for row in table) for i in range(len(table[0]))]
    lines = [f"{fig['redis']}: {fig['sessions']} sessions x {fig['messages_per_session']} messages "
             f"({fig['avg_message_bytes']} bytes each on average), code {fig['code']}, load "
             f"{fig['load_average']}; best of {len(fig['cold backup'].runs)}", ""]  # fmt: skip
    for row in table:
        cells = [row[0].ljust(widths[0])] + [
            c.rjust(w) for c, w in zip(row[1:], widths[1:], strict=True)
        ]
        lines.append("  ".join(cells).rstrip())
    lines.append("")
    for check, value, target, met in targets(fig):
        lines.append(f"{'PASS' if met else 'MISS'}  {check}: {value:.2f} (target {target})")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description="Backup/restore benchmark (see bench/README.md)")
    add = parser.add_argument
    add("--sessions", type=int, default=1000)
    add("--messages", type=int, default=1000, help="messages per session")
    add("--repeat", type=int, default=1, help="cold backup/bare COPY pairs; the best counts")
    add(
        "--admin-url",
        default=os.getenv("DND_BENCH_DATABASE_URL", ADMIN_URL),
        help="a PostgreSQL URL that may CREATE DATABASE (env DND_BENCH_DATABASE_URL)",
    )
    add(
        "--redis-url",
        default=os.getenv("DND_BENCH_REDIS_URL", REDIS_URL),
        help="env DND_BENCH_REDIS_URL",
    )
    add("--cluster", action="store_true", help="start a Redis Cluster of 3 primaries and use it")
    add("--json", action="store_true", help="print the figures as JSON")
    add("--keep", action="store_true", help="leave the database and the keys (debugging)")
    args = parser.parse_args()
    if min(args.sessions, args.messages, args.repeat) < 1:
        parser.error("--sessions, --messages and --repeat must be at least 1")
    # SIGTERM unwinds like Ctrl-C, so that the database and the keys are cleaned up.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    try:
        fig = bench(args)
    except KeyboardInterrupt:
        log("interrupted")
        return 130
    except (BenchError, DndError, RecordRejected, psycopg.Error, redis.RedisError) as exc:
        log(f"error: {exc}")
        return 1
    if args.json:
        checks = [{"check": c, "value": v, "target": t, "met": m} for c, v, t, m in targets(fig)]
        data = {k: asdict(v) if isinstance(v, Phase) else v for k, v in fig.items()}
        print(json.dumps({**data, "targets": checks}, indent=2))
    else:
        print(report(fig))
    return 0


if __name__ == "__main__":
    sys.exit(main())
