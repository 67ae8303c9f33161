"""What `dnd-client status` and one Prometheus scrape cost, as the tables grow.

    python bench/status_cost.py [--pending N] [--runs R] [--kept K] [--days D] [--repeat X]

Makes its own PostgreSQL database (random name, migrated), fills the tables the
figures are read from, then times, X times each, the figures' read
(worker.health.read_figures: a connection, one repeatable-read transaction, seven
queries) and one whole scrape (the collector and the text exposition, the broker's
worker inquiry left out). Prints the median and the worst. The database is dropped
at the end, also on an error or Ctrl-C. Exit status 0 (a measurement, not a test).

  --pending N   sessions waiting in continuous_pending (spread over 8 shards)
  --runs R      rows of persistence_snapshots (backups, restores, verifies)
  --kept K      open kept-aside records
  --days D      days of continuous_activity (one row per shard per minute)
"""

from __future__ import annotations

import argparse
import statistics
import time
import uuid
from collections.abc import Callable

import psycopg
from prometheus_client import generate_latest

from worker import migrate
from worker.health import Workers, read_figures
from worker.metrics import registry
from worker.settings import Settings

ADMIN_URL = "postgresql://postgres@127.0.0.1:5432/postgres"


def fill(url: str, pending: int, runs: int, kept: int, days: int) -> None:
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute(
            "INSERT INTO continuous_pending (session_id, shard, changed_at) "
            "SELECT gen_random_uuid(), n %% 8, now() - make_interval(secs => n %% 5) "
            "FROM generate_series(1, %s) AS n",
            (pending,),
        )
        conn.execute("INSERT INTO continuous_watcher (node, notifications) VALUES ('bench', 'on')")
        conn.execute(
            "INSERT INTO persistence_snapshots (id, kind, scope, status, created_at, finished_at) "
            "SELECT gen_random_uuid(), (ARRAY['backup','restore','verify'])[1 + n %% 3], "
            "(ARRAY['all','session'])[1 + n %% 2], "
            "(ARRAY['completed','partial','failed','completed'])[1 + n %% 4], "
            "now() - make_interval(mins => n), now() - make_interval(mins => n) + interval '1 s' "
            "FROM generate_series(1, %s) AS n",
            (runs,),
        )
        conn.execute(
            "INSERT INTO persistence_kept_records (kind, redis_key, raw, raw_sha256, preview, "
            "reason) SELECT 'message', 'k' || n, convert_to(n::text, 'UTF8'), "
            "sha256(convert_to(n::text, 'UTF8')), n::text, 'bench' "
            "FROM generate_series(1, %s) AS n",
            (kept,),
        )
        conn.execute(
            "INSERT INTO continuous_activity (minute, shard, backups, sessions, messages) "
            "SELECT date_trunc('minute', now()) - make_interval(mins => m), s, 3, 3, 40 "
            "FROM generate_series(0, %s) AS m, generate_series(0, 7) AS s",
            (days * 1440 - 1,),
        )
        conn.execute("ANALYZE")


def timed(step: Callable[[], object], repeat: int) -> tuple[float, float]:
    samples = []
    for _ in range(repeat):
        start = time.perf_counter()
        step()
        samples.append((time.perf_counter() - start) * 1000)
    return statistics.median(samples), max(samples)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pending", type=int, default=100_000)
    parser.add_argument("--runs", type=int, default=10_000)
    parser.add_argument("--kept", type=int, default=10_000)
    parser.add_argument("--days", type=int, default=7)
    parser.add_argument("--repeat", type=int, default=20)
    parser.add_argument("--admin-url", default=ADMIN_URL)
    args = parser.parse_args()

    name = f"dnd_bench_status_{uuid.uuid4().hex[:10]}"
    with psycopg.connect(args.admin_url, autocommit=True) as admin:
        admin.execute(f'CREATE DATABASE "{name}"')
    url = args.admin_url.rsplit("/", 1)[0] + f"/{name}"
    try:
        settings = Settings.from_env({"DATABASE_URL": url})
        migrate.up(settings)
        fill(url, args.pending, args.runs, args.kept, args.days)
        reg = registry(settings, lambda: Workers(0))
        read = timed(lambda: read_figures(settings), args.repeat)
        scrape = timed(lambda: generate_latest(reg), args.repeat)
        print(
            f"tables: {args.pending} pending sessions, {args.runs} runs, {args.kept} open "
            f"kept records, {args.days * 1440 * 8} continuous_activity rows"
        )
        print(f"figures read (status):   median {read[0]:.1f} ms, worst {read[1]:.1f} ms")
        print(f"whole scrape (metrics):  median {scrape[0]:.1f} ms, worst {scrape[1]:.1f} ms")
        print(f"({args.repeat} times each; a new connection every time)")
    finally:
        with psycopg.connect(args.admin_url, autocommit=True) as admin:
            admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


if __name__ == "__main__":
    main()
