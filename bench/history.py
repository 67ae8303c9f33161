"""What history costs: backups with and without it, and restores as of a past moment.

    python bench/history.py [--sessions N] [--messages M] [--rounds R] [--append A] [--repeat K]

Makes two PostgreSQL databases (random names; dropped at the end) and a Redis key
prefix, fills Redis with N x M messages plus one session of 10,000, and measures in
this process, with the engine (worker.runner.run_local; history is switched off
for the "without" figures through BackupEngine.record_history, a switch only this
script uses):

  cold backup        into empty tables, with and without history, alternately, K times
                     each (best counts): throughput in messages/s, and the ratio
  unchanged backup   the same again, nothing changed, with and without (best of K)
  append-only        R rounds of A new messages per session, each followed by a backup
                     into both databases (history on in one, off in the other); then
                     pg_total_relation_size of every table of ours in each: the ratio
  restore one        the 10,000-message session as of a moment before the last round,
                     into an empty prefix (best of K)
  restore all        every session as of that moment vs a plain full restore, into
                     empty prefixes (best of K each), and the ratio

Targets (issue 11): cold backup with history at most 10% slower; unchanged re-backup
unchanged; storage at most 1.1x; one 10,000-message session under 1 s; all within 1.5x.
"""

from __future__ import annotations

import argparse
import random
import sys
import time
import uuid
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import psycopg
import redis

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from backup_restore import (
    ADMIN_URL,
    REDIS_URL,
    bench_database,
    delete_prefix,
    fill,
    log,
    message,
)

from worker import migrate
from worker.backup import BackupEngine
from worker.keys import RedisKeys
from worker.models import BackupOptions, RestoreOptions, Run, RunOptions
from worker.runner import run_local
from worker.services import Services, open_services
from worker.settings import Settings

TABLES = (
    "client_sessions", "client_messages", "backup_watermarks", "backup_checksums",
    "history_captures", "history_session_versions", "history_messages",
)  # fmt: skip


def settings_for(database_url: str, prefix: str) -> Settings:
    return Settings.from_env(
        {"DATABASE_URL": database_url, "REDIS_URL": REDIS_URL, "REDIS_KEY_PREFIX": prefix}
    )


def timed(call: Callable[[], Run]) -> tuple[float, Run]:
    started = time.perf_counter()
    run = call()
    seconds = time.perf_counter() - started
    if run.status.value not in ("completed", "partial"):
        raise SystemExit(f"run {run.id} {run.status.value}: {run.error}")
    return seconds, run


def backup(services: Services, *, history: bool) -> tuple[float, Run]:
    BackupEngine.record_history = history
    try:
        return timed(lambda: run_local(services, BackupOptions()))
    finally:
        BackupEngine.record_history = True


def empty(conn: psycopg.Connection[Any]) -> None:
    conn.execute("TRUNCATE client_sessions, history_captures, history_session_versions,"
                 " history_messages, persistence_snapshots CASCADE")  # fmt: skip
    conn.execute("VACUUM ANALYZE")
    conn.execute("CHECKPOINT")


def size_of(conn: psycopg.Connection[Any]) -> int:
    conn.execute("VACUUM ANALYZE")
    total = 0
    for table in TABLES:
        [(size,)] = conn.execute("SELECT pg_total_relation_size(%s)", (table,)).fetchall()
        total += int(size)
    return total


def append(r: redis.Redis, keys: RedisKeys, ids: list[str], count: int, rng: random.Random,
           at_us: int) -> int:  # fmt: skip
    pipe = r.pipeline(transaction=False)
    for sid in ids:
        members = {}
        for i in range(count):
            at_us += 1000
            members[message(sid, i, at_us, rng)] = at_us // 1000
        pipe.zadd(keys.messages(sid), members)
    pipe.execute()
    return at_us


def restore_into(
    services: Services, prefix: str, options: RunOptions, ids: list[str] | None
) -> float:
    target = services.redis.with_keys(RedisKeys(prefix))
    on = Services(settings=services.settings, pg=services.pg, redis=target,
                  worker_name="bench")  # fmt: skip
    try:
        seconds, _run = timed(lambda: run_local(on, options, session_ids=ids))
    finally:
        client = services.redis.client
        assert isinstance(client, redis.Redis)  # the bench runs on one Redis
        delete_prefix(client, prefix)
    return seconds


def bench(args: argparse.Namespace) -> dict[str, float]:
    fig: dict[str, float] = {}
    r = redis.Redis.from_url(REDIS_URL)
    prefix = f"dndbench-hist:{uuid.uuid4().hex[:10]}:"
    keys = RedisKeys(prefix)
    try:
        with (
            bench_database(ADMIN_URL, False) as url_on,
            bench_database(ADMIN_URL, False) as url_off,
        ):
            for url in (url_on, url_off):
                migrate.up(settings_for(url, prefix))
            ids, _ = fill(r, keys, args.sessions, args.messages)
            big, _ = fill(r, keys, 1, 10_000)
            total = args.sessions * args.messages + 10_000
            log(f"{len(ids) + 1} sessions, {total} messages in Redis")
            with (
                open_services(settings_for(url_on, prefix), worker_name="bench") as on,
                open_services(settings_for(url_off, prefix), worker_name="bench") as off,
                psycopg.connect(url_on, autocommit=True) as conn_on,
                psycopg.connect(url_off, autocommit=True) as conn_off,
            ):
                best = {True: float("inf"), False: float("inf")}
                for _ in range(args.repeat):
                    for history, services, conn in ((False, off, conn_off), (True, on, conn_on)):
                        empty(conn)
                        seconds, _run = backup(services, history=history)
                        best[history] = min(best[history], seconds)
                        log(f"cold backup, history {'on' if history else 'off'}: {seconds:.2f} s")
                fig["cold_with_msgs_per_s"] = total / best[True]
                fig["cold_without_msgs_per_s"] = total / best[False]
                fig["cold_slowdown"] = best[True] / best[False] - 1

                best = {True: float("inf"), False: float("inf")}
                for _ in range(args.repeat):
                    for history, services in ((False, off), (True, on)):
                        seconds, _run = backup(services, history=history)
                        best[history] = min(best[history], seconds)
                fig["unchanged_with_s"], fig["unchanged_without_s"] = best[True], best[False]

                rng = random.Random(7)
                at_us = int(datetime.now(UTC).timestamp() * 1_000_000) - 86_400_000_000
                past = ""
                for round_no in range(args.rounds):
                    if round_no == args.rounds - 1:
                        past = datetime.now(UTC).isoformat()
                        time.sleep(0.01)
                    at_us = append(r, keys, ids + big, args.append, rng, at_us)
                    backup(off, history=False)
                    backup(on, history=True)
                fig["storage_with_bytes"] = size_of(conn_on)
                fig["storage_without_bytes"] = size_of(conn_off)
                fig["storage_ratio"] = fig["storage_with_bytes"] / fig["storage_without_bytes"]
                [(captures,)] = conn_on.execute("SELECT count(*) FROM history_captures").fetchall()
                fig["captures"] = captures

                as_of = RestoreOptions(as_of=past)
                one = min(restore_into(on, f"{prefix}r1:", as_of, big) for _ in range(args.repeat))
                fig["restore_one_10k_as_of_s"] = one
                plain = min(restore_into(on, f"{prefix}rp:", RestoreOptions(), None)
                            for _ in range(args.repeat))  # fmt: skip
                then = min(restore_into(on, f"{prefix}ra:", as_of, None)
                           for _ in range(args.repeat))  # fmt: skip
                fig["restore_all_plain_s"], fig["restore_all_as_of_s"] = plain, then
                fig["restore_all_ratio"] = then / plain
    finally:
        delete_prefix(r, prefix)
        r.close()
    return fig


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sessions", type=int, default=200)
    parser.add_argument("--messages", type=int, default=500)
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--append", type=int, default=10)
    parser.add_argument("--repeat", type=int, default=3)
    fig = bench(parser.parse_args())
    print(f"cold backup, history on    {fig['cold_with_msgs_per_s']:10.0f} messages/s")
    print(f"cold backup, history off   {fig['cold_without_msgs_per_s']:10.0f} messages/s")
    print(f"  history costs            {fig['cold_slowdown'] * 100:9.1f} %   (target <= 10 %)")
    print(f"unchanged backup, on/off   {fig['unchanged_with_s']:8.3f} s / "
          f"{fig['unchanged_without_s']:.3f} s")  # fmt: skip
    print(f"append-only storage on/off {fig['storage_with_bytes'] / 2**20:8.1f} MiB / "
          f"{fig['storage_without_bytes'] / 2**20:.1f} MiB = {fig['storage_ratio']:.3f}x "
          f"({fig['captures']:.0f} captures; target <= 1.1x)")  # fmt: skip
    print(f"restore one 10,000-message session as of a past moment "
          f"{fig['restore_one_10k_as_of_s']:.3f} s (target < 1 s)")  # fmt: skip
    print(f"restore all: plain {fig['restore_all_plain_s']:.2f} s, as of a past moment "
          f"{fig['restore_all_as_of_s']:.2f} s = {fig['restore_all_ratio']:.2f}x "
          f"(target <= 1.5x)")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
