"""Reading many small sessions: one Redis vs a Redis Cluster, first pages grouped or not.

    PYTHONPATH=. python bench/cluster_read.py [--sessions N] [--messages M] [--repeat K]

Fills N sessions x M messages under a random prefix of the local Redis
(--redis-url) and of a Redis Cluster of 3 primaries it starts itself, then times
reading every session's messages through worker.redis_store.RedisStore, as a
backup does (BACKUP_CHUNK_MESSAGES 5000):

  grouped       read_many: the first pages of 32 sessions in one pipeline (in a
                cluster: one pipeline per node, all nodes at once), then the rest
  one by one    read_messages per session: a round trip per session (the code before)

Prints seconds (best of K) and messages per second. Keys are deleted at the end.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from tests.cluster import redis_cluster  # noqa: E402
from tests.factories import message, session_fields, write_session  # noqa: E402
from worker.connections import connect_cluster, connect_redis  # noqa: E402
from worker.keys import RedisKeys  # noqa: E402
from worker.redis_store import RedisStore  # noqa: E402

CHUNK = 5000


def fill(client: Any, keys: RedisKeys, sessions: int, messages: int) -> list[str]:
    ids = []
    for _ in range(sessions):
        sid = str(uuid.uuid4())
        write_session(client, keys, session_fields(sid), [message(sid, i) for i in range(messages)])
        ids.append(sid)
    return ids


def grouped(store: RedisStore, ids: list[str]) -> int:
    return sum(len(page) for _i, page in store.read_many([(sid, None) for sid in ids], CHUNK))


def one_by_one(store: RedisStore, ids: list[str]) -> int:
    return sum(len(page) for sid in ids for page in store.read_messages(sid, None, CHUNK))


def best(fn: Callable[[RedisStore, list[str]], int], store: RedisStore, ids: list[str],
         repeat: int, expect: int) -> float:  # fmt: skip
    times = []
    for _ in range(repeat):
        started = time.perf_counter()
        read = fn(store, ids)
        times.append(time.perf_counter() - started)
        if read != expect:
            raise SystemExit(f"read {read} messages, expected {expect}")
    return min(times)


def measure(name: str, store: RedisStore, args: argparse.Namespace) -> None:
    ids = fill(store.client, store.keys, args.sessions, args.messages)
    total = args.sessions * args.messages
    try:
        for label, fn in (("grouped", grouped), ("one by one", one_by_one)):
            seconds = best(fn, store, ids, args.repeat, total)
            print(f"{name:<24} {label:<11} {seconds:6.2f} s  {total / seconds:>10,.0f} msg/s")
    finally:
        found = list(store.client.scan_iter(match=f"{store.keys.prefix}*", count=1000))
        for start in range(0, len(found), 500):
            store.client.delete(*found[start : start + 500])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sessions", type=int, default=5000)
    parser.add_argument("--messages", type=int, default=20)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument(
        "--redis-url", default=os.getenv("DND_BENCH_REDIS_URL", "redis://127.0.0.1:6379/0")
    )
    args = parser.parse_args()
    print(f"{args.sessions} sessions x {args.messages} messages, best of {args.repeat}, "
          f"load {os.getloadavg()[0]:.1f}")  # fmt: skip
    prefix = RedisKeys(f"bench-read-{uuid.uuid4().hex[:8]}:")
    measure("one Redis", RedisStore(connect_redis(args.redis_url), prefix, args.redis_url), args)
    with tempfile.TemporaryDirectory() as folder, redis_cluster(Path(folder), 3, 0) as cluster:
        store = RedisStore(connect_cluster(cluster.url), prefix, cluster.url)
        measure("cluster of 3 primaries", store, args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
