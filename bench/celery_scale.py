"""Celery at scale: full backup, restore and verify of many small sessions on real workers.

    python bench/celery_scale.py [--sessions 100000] [--messages 2] [--max-batches N]
                                 [--concurrency 2] [--json]

Starts two Redis servers of its own (free ports, no persistence): one for the data (the
sessions, under a random key prefix), one for Celery's broker (db 0) and results (db 1),
so that its memory is theirs alone; a database of its own (migrated, dropped at the end);
and one `celery -A worker worker -c CONCURRENCY` consuming every shard. Then, for
full_backup (into empty tables), full_restore (the data Redis emptied first) and
full_verify (and full_backup again, nothing changed: `unchanged`), measures:

  dispatch       from `.delay()` to the coordinator's answer in application code: listing
                 the sessions, recording the run and its batches, sending the chord
  header         the chord's header: how many batch tasks (the coordinator's `batches`)
  run            the run's duration (persistence_snapshots.duration_ms)
  broker+results peak used_memory of the broker/result Redis above its baseline before the
                 phase, sampled every 50 ms from `.delay()` to the run's end

RUN_MAX_BATCHES is taken from --max-batches (default: the setting's default); a large
value (e.g. 100000) measures the uncapped cutting, BACKUP_BATCH_SESSIONS per task.
Exit 0 whatever the targets; 1 when something could not be measured.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
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

from backup_restore import ADMIN_URL, BenchError, bench_database, code_version, fill, log
from celery_bench import Process, free_port, redis_server_binary, wait_run

from worker import migrate
from worker.connections import connect_postgres
from worker.keys import RedisKeys
from worker.settings import Settings

TARGETS = {"dispatch s": 60.0, "header tasks": 500, "broker+results peak MB": 100.0}

DISPATCH = """
import json, time
from worker.tasks import {task}
started = time.perf_counter()
answer = {task}.delay().get(timeout=3600)
answer["dispatch_s"] = time.perf_counter() - started
print(json.dumps(answer))
"""


def start_redis(tmp: Path, name: str) -> tuple[Process, int]:
    port = free_port()
    args = [redis_server_binary(), "--port", str(port), "--bind", "127.0.0.1", "--save", "",
            "--appendonly", "no", "--dir", str(tmp)]  # fmt: skip
    server = Process(args, dict(os.environ), tmp / f"{name}.log")
    server.wait_for("Ready to accept connections")
    return server, port


class PeakMemory:
    """used_memory of a Redis, sampled every 50 ms on a thread, while the block runs."""

    def __init__(self, client: redis.Redis) -> None:
        self.client = client
        self.baseline = self.peak = int(client.info("memory")["used_memory"])
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    def _sample(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, int(self.client.info("memory")["used_memory"]))
            time.sleep(0.05)

    def __enter__(self) -> PeakMemory:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    @property
    def above_mb(self) -> float:
        return round((self.peak - self.baseline) / 2**20, 1)


def phase(task: str, env: dict[str, str], conn: psycopg.Connection[Any], broker: redis.Redis,
          expect: int) -> dict[str, Any]:  # fmt: skip
    import subprocess

    log(f"{task}: dispatching")
    with PeakMemory(broker) as memory:
        done = subprocess.run([sys.executable, "-c", DISPATCH.format(task=task)], env=env,
                              capture_output=True, text=True, check=False)  # fmt: skip
        if done.returncode:
            raise BenchError(f"{task}: {done.stderr[-2000:]}")
        answer = json.loads(done.stdout.strip().splitlines()[-1])
        if answer.get("status") != "running":
            raise BenchError(f"{task} did not start: {answer}")
        log(f"{task}: dispatched in {answer['dispatch_s']:.1f} s, {answer['batches']} batches")
        run = wait_run(conn, answer["run_id"], timeout=7200)
    if run["status"] != "completed" or run["sessions"] != expect:
        raise BenchError(f"{task}: run {run}; expected completed over {expect} sessions")
    figures = {
        "dispatch s": round(answer["dispatch_s"], 2),
        "header tasks": answer["batches"],
        "run s": round(run["seconds"], 1),
        "sessions/s": round(expect / run["seconds"]),
        "broker+results baseline MB": round(memory.baseline / 2**20, 1),
        "broker+results peak MB": memory.above_mb,
    }
    log(f"{task}: {figures}")
    return figures


COORDINATOR = """
import json, time
from worker.tasks import full_backup
started = time.perf_counter()
answer = full_backup.apply().get()
answer["dispatch_s"] = time.perf_counter() - started
print(json.dumps(answer))
"""


def dispatch_only(args: argparse.Namespace, env: dict[str, str], data: redis.Redis,
                  broker: redis.Redis, keys: RedisKeys) -> dict[str, Any]:  # fmt: skip
    """The coordinator alone, in a process of its own, over N IDs in the sessions set.

    No worker runs: `full_backup.apply()` lists the sessions, records the run and its
    batches and sends the chord, whose batch tasks then wait in the broker; what the
    broker holds is the header's cost in memory.
    """
    import subprocess

    pipe = data.pipeline(transaction=False)
    for n in range(args.sessions):
        pipe.sadd(keys.sessions, str(uuid.UUID(int=(n * 0x9E3779B97F4A7C15) % 2**128, version=4)))
        if len(pipe) >= 10_000:
            pipe.execute()
    pipe.execute()
    baseline = int(broker.info("memory")["used_memory"])
    done = subprocess.run([sys.executable, "-c", COORDINATOR], env=env, capture_output=True,
                          text=True, check=False)  # fmt: skip
    if done.returncode:
        raise BenchError(f"coordinator: {done.stderr[-2000:]}")
    answer = json.loads(done.stdout.strip().splitlines()[-1])
    if answer.get("status") != "running":
        raise BenchError(f"full_backup did not start: {answer}")
    queued = int(broker.info("memory")["used_memory"]) - baseline
    figures = {"dispatch s": round(answer["dispatch_s"], 2), "header tasks": answer["batches"],
               "broker+results peak MB": round(queued / 2**20, 1)}  # fmt: skip
    log(f"coordinator alone: {figures}")
    return figures


def bench(args: argparse.Namespace) -> dict[str, Any]:
    tag = uuid.uuid4().hex[:8]
    keys = RedisKeys(f"scale-{tag}:")
    tmp = Path(tempfile.mkdtemp(prefix="dnd-celery-scale-"))
    processes: list[Process] = []
    out: dict[str, Any] = {"code": code_version(), "sessions": args.sessions,
                           "messages_per_session": args.messages}  # fmt: skip
    try:
        data_server, data_port = start_redis(tmp, "data-redis")
        processes.append(data_server)
        broker_server, broker_port = start_redis(tmp, "broker-redis")
        processes.append(broker_server)
        data = redis.Redis(port=data_port)
        broker = redis.Redis(port=broker_port)
        with bench_database(args.admin_url, keep=False) as db_url:
            env = {
                **os.environ,
                "DATABASE_URL": db_url,
                "REDIS_URL": f"redis://127.0.0.1:{data_port}/0",
                "REDIS_KEY_PREFIX": keys.prefix,
                "CELERY_BROKER_URL": f"redis://127.0.0.1:{broker_port}/0",
                "CELERY_RESULT_BACKEND": f"redis://127.0.0.1:{broker_port}/1",
                "CELERY_QUEUE_PREFIX": f"s{tag}.",
                "BACKUP_SCHEDULE": "off",
            }
            if args.max_batches:
                env["RUN_MAX_BATCHES"] = str(args.max_batches)
            settings = Settings.from_env(env)
            out |= {"run_max_batches": settings.run_max_batches,
                    "batch_sessions": settings.batch_sessions,
                    "shards": settings.backup_shards}  # fmt: skip
            migrate.up(settings)
            if args.dispatch_only:
                out["load_average_before"] = [round(x, 2) for x in os.getloadavg()]
                out["coordinator"] = dispatch_only(args, env, data, broker, keys)
                out["load_average_after"] = [round(x, 2) for x in os.getloadavg()]
                return out
            started = time.monotonic()
            fill(data, keys, args.sessions, args.messages)
            log(f"filled {args.sessions:,} sessions in {time.monotonic() - started:.0f} s; "
                f"data Redis {data.info('memory')['used_memory_human']}")  # fmt: skip
            worker = Process(
                [sys.executable, "-m", "celery", "-A", "worker", "worker", "-c",
                 str(args.concurrency), "--loglevel", "INFO", "-n", f"scale{tag}@%h",
                 "--without-mingle", "--without-gossip"],
                env, tmp / "worker.log",
            )  # fmt: skip
            processes.append(worker)
            worker.wait_for("ready.")
            with connect_postgres(settings) as conn:
                conn.autocommit = True
                out["load_average_before"] = [round(x, 2) for x in os.getloadavg()]
                out["full_backup"] = phase("full_backup", env, conn, broker, args.sessions)
                if "unchanged" in args.phases:  # the hourly case: nothing changed
                    out["unchanged"] = phase("full_backup", env, conn, broker, args.sessions)
                if "restore" in args.phases:
                    data.flushdb()
                    out["full_restore"] = phase("full_restore", env, conn, broker, args.sessions)
                if "verify" in args.phases:
                    out["full_verify"] = phase("full_verify", env, conn, broker, args.sessions)
                out["load_average_after"] = [round(x, 2) for x in os.getloadavg()]
    finally:
        for process in reversed(processes):
            process.stop()
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def report(out: dict[str, Any]) -> str:
    cols = ["dispatch s", "header tasks", "run s", "sessions/s", "broker+results peak MB"]
    lines = [f"{out['sessions']:,} sessions x {out['messages_per_session']} messages, "
             f"RUN_MAX_BATCHES {out['run_max_batches']}, BACKUP_BATCH_SESSIONS "
             f"{out['batch_sessions']}, {out['shards']} shards, code {out['code']}, load "
             f"{out['load_average_before']} -> {out['load_average_after']}", ""]  # fmt: skip
    lines.append("phase".ljust(13) + "".join(c.rjust(24) for c in cols))
    names = ("coordinator", "full_backup", "unchanged", "full_restore", "full_verify")
    phases = [n for n in names if n in out]
    for name in phases:
        cells = (str(out[name].get(c, "")).rjust(24) for c in cols)
        lines.append(name.ljust(13) + "".join(cells))
    lines.append("")
    for check, limit in TARGETS.items():
        worst = max(out[n][check] for n in phases)
        lines.append(f"{'PASS' if worst <= limit else 'MISS'}  {check}: at most {worst} "
                     f"(target <= {limit:g})")  # fmt: skip
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description="Celery at scale (see bench/README.md)")
    parser.add_argument("--sessions", type=int, default=100_000)
    parser.add_argument("--messages", type=int, default=2, help="messages per session")
    parser.add_argument("--max-batches", type=int, default=0, help="RUN_MAX_BATCHES (0: default)")
    parser.add_argument("--concurrency", type=int, default=2, help="worker pool processes")
    parser.add_argument("--admin-url", default=os.getenv("DND_BENCH_DATABASE_URL", ADMIN_URL))
    parser.add_argument(
        "--phases",
        default="backup,restore,verify",
        help="which full runs after full_backup: restore, verify (comma-separated)",
    )
    parser.add_argument(
        "--dispatch-only",
        action="store_true",
        help="only the coordinator, no worker: N IDs in the sessions set",
    )
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    if min(args.sessions, args.messages, args.concurrency) < 1:
        parser.error("--sessions, --messages and --concurrency must be at least 1")
    try:
        out = bench(args)
    except KeyboardInterrupt:
        return 130
    except (BenchError, psycopg.Error, redis.RedisError) as exc:
        log(f"error: {exc}")
        return 1
    print(json.dumps(out, indent=2) if args.json else report(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
