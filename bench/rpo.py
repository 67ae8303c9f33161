"""Recovery point under load: how long a message written to Redis takes to be in PostgreSQL.

    python bench/rpo.py [--rate 1000] [--sessions 10000] [--seconds 120] [--workers 1]
                        [--kill-worker] [--restart-redis] [--json]

Starts a Redis of its own for the data (on a free port; the bench can restart it with
its data), a database of its own, `--workers` real workers (`celery -A worker worker`,
2 pool processes each) and beat, with every continuous-protection setting at its default;
Celery's broker and results go to --broker-url under a prefix of their own. It creates the
sessions (hashes, no messages), waits until the workers have backed them up, then writes
like the application: for each message one round trip with ZADD of the message's JSON
and HSET of `updated_at`, at --rate messages a second spread over the sessions at random,
for --seconds. Every message's write time is recorded; a message is visible from the first
poll (every 50 ms) that finds it committed. To find them without asking PostgreSQL for every
message not yet seen (a query that grows with the backlog and, on a busy machine, slows
into the lag it measures: 7 s a poll was seen at 2,000 msg/s), the bench adds to its own
database a statement-level trigger that copies the IDs of the rows inserted into
client_messages into an unlogged side table, which each poll empties (DELETE ... RETURNING
sees only committed rows). Printed: lag p50 / p99 / max (write -> visible), written
vs stored (after the load stops, waiting up to 120 s), drain tasks run vs messages written,
the workers' CPU, and the watcher's sweep (sessions, seconds, cost per session, plus one
sweep timed here on its own).

--kill-worker: at half time, SIGKILL the worker whose watcher is the active one (its whole
process group: the watcher and its drains), and start it again 2 s later (use --workers 2
to have another take over at once). --writers: threads sharing --rate (default 4).
--restart-redis: at half time, `SHUTDOWN SAVE` the data Redis
and start it again on the same port from its dump (its data kept, notifications setting
lost: the watcher sets it again and sweeps). Exit 0 whatever the figures; 1 when something
could not be measured.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import random
import shutil
import signal
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

from backup_restore import ADMIN_URL, REDIS_URL, REPO, BenchError, bench_database, log

POLL_S = 0.05
# The IDs of the messages the backups insert, kept for the poller (see the docstring).
SEEN_SETUP = """
CREATE UNLOGGED TABLE bench_seen (id uuid NOT NULL);
CREATE FUNCTION bench_seen_insert() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO bench_seen SELECT id FROM inserted;
    RETURN NULL;
END $$;
CREATE TRIGGER bench_seen AFTER INSERT ON client_messages
    REFERENCING NEW TABLE AS inserted FOR EACH STATEMENT EXECUTE FUNCTION bench_seen_insert();
"""
SEEN_TAKE = "DELETE FROM bench_seen RETURNING id::text"


class DataRedis:
    """redis-server on a free port, in a folder of its own; restartable with its data."""

    def __init__(self, workdir: Path) -> None:
        import socket

        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            self.port = int(probe.getsockname()[1])
        self.dir = workdir
        self.proc: subprocess.Popen[bytes] | None = None
        self.start()

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        binary = shutil.which("redis-server") or "redis-server"
        self.proc = subprocess.Popen(
            [binary, "--bind", "127.0.0.1", "--port", str(self.port), "--dir", str(self.dir),
             "--save", "", "--appendonly", "no", "--dbfilename", "dump.rdb"],
            stdout=(self.dir / "redis.log").open("ab"), stderr=subprocess.STDOUT,
            start_new_session=True,
        )  # fmt: skip
        client = redis.Redis(port=self.port, socket_connect_timeout=1)
        deadline = time.monotonic() + 60
        while True:
            try:
                client.ping()
                break
            except redis.exceptions.RedisError:  # connecting, or LOADING the dump
                if time.monotonic() > deadline:
                    raise BenchError("the data Redis did not start") from None
                time.sleep(0.05)
        client.close()

    def restart_with_data(self) -> float:
        """SHUTDOWN SAVE, then start again from the dump; seconds it was away."""
        started = time.monotonic()
        client = redis.Redis(port=self.port)
        with contextlib.suppress(redis.exceptions.ConnectionError):
            client.shutdown(save=True)
        assert self.proc is not None
        self.proc.wait(60)
        self.start()
        return time.monotonic() - started

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(30)


class Celery:
    """`celery -A worker worker|beat` in a process group of its own, logging to a file."""

    def __init__(self, env: dict[str, str], args: list[str], log_path: Path) -> None:
        self.env, self.args, self.log_path = env, args, log_path
        self.cpu_dead = 0.0
        self.proc = self._spawn()

    def _spawn(self) -> subprocess.Popen[bytes]:
        return subprocess.Popen(
            [sys.executable, "-m", "celery", "-A", "worker", *self.args],
            cwd=REPO, env=self.env, stdout=self.log_path.open("ab"), stderr=subprocess.STDOUT,
            start_new_session=True,
        )  # fmt: skip

    def wait_ready(self, text: str, timeout: float = 90) -> None:
        deadline = time.monotonic() + timeout
        while text not in self.log_path.read_text(errors="replace"):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise BenchError(f"{self.args[0]} did not start: see {self.log_path}")
            time.sleep(0.1)

    def cpu_seconds(self) -> float:
        """CPU of the process group's live processes (user + system)."""
        total = 0.0
        tick = os.sysconf("SC_CLK_TCK")
        for pid in os.listdir("/proc"):
            if not pid.isdigit():
                continue
            try:
                fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[2]) == self.proc.pid:  # process group
                total += (int(fields[11]) + int(fields[12])) / tick
        return total

    def kill(self) -> None:
        self.cpu_dead += self.cpu_seconds()
        os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait(10)

    def restart(self) -> None:
        self.proc = self._spawn()

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)


def message_json(sid: str, index: int, at_ms: int) -> tuple[str, bytes, str]:
    mid = str(uuid.uuid4())
    created = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(at_ms / 1000))
    created += f".{at_ms % 1000:03d}000Z"
    data = {
        "id": mid, "session_id": sid, "created_at": created, "role": "user",
        "content": f"message {index}: the party opens the door", "tool_calls": None,
        "player_id": "player-1",
    }  # fmt: skip
    return mid, json.dumps(data, separators=(",", ":")).encode(), created


def session_hash(sid: str) -> dict[str, str]:
    return {
        "id": sid, "name": "Bench", "creator_id": "user-1", "mcp_server_url": "http://mcp:9000",
        "websocket_key": "k", "max_players": "5", "settings": "{}",
        "created_at": "2026-01-01T00:00:00Z", "updated_at": "2026-01-01T00:00:00Z",
        "status": "active",
    }  # fmt: skip


class Load:
    """The writer and the poller: write time and visible time of every message."""

    def __init__(self, url: str, prefix: str, database_url: str, sessions: list[str]) -> None:
        self.url, self.prefix, self.database_url, self.sessions = (
            url,
            prefix,
            database_url,
            sessions,
        )
        self.written: dict[str, float] = {}
        self.session_of: dict[str, str] = {}
        self.poll_seconds: list[float] = []  # how long each look into PostgreSQL took
        self.visible: dict[str, float] = {}
        self.unseen: set[str] = set()
        self.lock = threading.Lock()
        self.write_errors = 0
        self.stop_polling = threading.Event()

    def write(self, rate: float, seconds: float, seed: int = 0) -> None:
        client = redis.Redis.from_url(self.url, socket_timeout=5)
        rng = random.Random(seed)
        start = time.monotonic()
        sent = 0
        while True:
            now = time.monotonic()
            if now - start >= seconds:
                break
            due = int((now - start) * rate) + 1
            while sent < due and time.monotonic() - start < seconds:
                sid = rng.choice(self.sessions)
                at_ms = int(time.time() * 1000)
                mid, member, created = message_json(sid, sent, at_ms)
                while True:
                    # Recorded as the write is sent (the poller must know it before
                    # a backup can store it), again for each try while Redis is away.
                    with self.lock:
                        self.written[mid] = time.monotonic()
                        self.session_of[mid] = sid
                        self.unseen.add(mid)
                    try:
                        pipe = client.pipeline(transaction=False)
                        pipe.zadd(f"{self.prefix}session:{sid}:messages", {member: at_ms})
                        pipe.hset(f"{self.prefix}session:{sid}", "updated_at", created)
                        pipe.execute()
                        break
                    except redis.exceptions.RedisError:  # the Redis restarting
                        self.write_errors += 1
                        time.sleep(0.05)
                sent += 1
            time.sleep(0.002)
        client.close()

    def poll(self) -> None:
        with psycopg.connect(self.database_url, autocommit=True) as conn:
            while not self.stop_polling.is_set():
                # The statement's snapshot is taken as it starts: what it finds was
                # committed by then (and was not at the previous poll's start).
                asked = time.monotonic()
                rows = conn.execute(SEEN_TAKE).fetchall()
                self.poll_seconds.append(time.monotonic() - asked)
                with self.lock:
                    for (mid,) in rows:
                        if mid in self.unseen:
                            self.visible[mid] = asked
                            self.unseen.discard(mid)
                time.sleep(POLL_S)


class Timeline:
    """Where the lag is, once a second (--timeline): the bench's view, the queue, the watcher.

    A row: seconds since the load started; messages written and not yet seen in
    PostgreSQL, and the age of the oldest; continuous_pending rows not claimed and the
    age of the oldest of them (the recovery point `dnd-client status` reports), rows
    claimed by drains, rows waiting out a pause or back-off; and the output buffer of
    the watcher's subscription in Redis (notifications it has not read yet).
    """

    def __init__(self, load: Load, database_url: str, redis_url: str) -> None:
        self.load, self.database_url, self.redis_url = load, database_url, redis_url
        self.rows: list[dict[str, Any]] = []
        self.stop = threading.Event()

    def run(self, started: float) -> None:
        client = redis.Redis.from_url(self.redis_url, socket_timeout=5)
        with psycopg.connect(self.database_url, autocommit=True) as conn:
            while not self.stop.wait(1.0):
                now = time.monotonic()
                with self.load.lock:
                    unseen = [self.load.written[m] for m in self.load.unseen]
                pending = conn.execute(
                    "SELECT count(*) FILTER (WHERE claimed_by IS NULL),"
                    " extract(epoch FROM now() - min(changed_at) FILTER"
                    "  (WHERE claimed_by IS NULL)),"
                    " count(*) FILTER (WHERE claimed_by IS NOT NULL),"
                    " count(*) FILTER (WHERE retry_after > now())"
                    " FROM continuous_pending"
                ).fetchone()
                assert pending is not None
                buffered = sum(int(c.get("omem", 0)) for c in client.client_list(_type="pubsub"))
                self.rows.append({
                    "t": round(now - started, 1), "unseen": len(unseen),
                    "oldest_unseen_s": round(now - min(unseen), 2) if unseen else 0.0,
                    "pending": pending[0], "pending_age_s": round(float(pending[1] or 0), 2),
                    "claimed": pending[2], "paused": pending[3], "pubsub_omem": buffered,
                })  # fmt: skip
        client.close()

    @staticmethod
    def report_rows(rows: list[dict[str, Any]]) -> str:
        lines = ["   t  unseen  oldest_s  pending  age_s  claimed  paused  pubsub_omem"]
        for r in rows:
            lines.append(
                f"{r['t']:>5}  {r['unseen']:>6}  {r['oldest_unseen_s']:>8}  {r['pending']:>7}"
                f"  {r['pending_age_s']:>5}  {r['claimed']:>7}  {r['paused']:>6}"
                f"  {r['pubsub_omem']:>11}"
            )
        return "\n".join(lines)


def unseen_sessions(
    load: Load, conn: psycopg.Connection[Any], client: redis.Redis, prefix: str
) -> dict[str, int]:
    """Why the sessions of the messages not yet in PostgreSQL are not: a diagnosis.

    ``pending``: in continuous_pending (waiting for, or in, a drain); ``missed``:
    not pending, and Redis differs from the session's watermark (a change the
    watcher has not recorded yet, as it writes what it saw every 0.25 s, or did
    not see: then the next sweep finds it); ``past_watermark``: not pending, and
    the watermark already counts what Redis holds (stored by a backup that
    committed after the last poll).
    """
    with load.lock:
        sessions = sorted({load.session_of[m] for m in load.unseen})
    if not sessions:
        return {"sessions": 0, "pending": 0, "missed": 0, "past_watermark": 0}
    pending = {
        row[0]
        for row in conn.execute(
            "SELECT session_id::text FROM continuous_pending WHERE session_id = ANY(%s::uuid[])",
            (sessions,),
        )
    }
    marks = {
        row[0]: (int(row[1]), row[2])
        for row in conn.execute(
            "SELECT session_id::text, message_count, max_score FROM backup_watermarks"
            " WHERE session_id = ANY(%s::uuid[])",
            (sessions,),
        )
    }
    pipe = client.pipeline(transaction=False)
    for sid in sessions:
        pipe.zcard(f"{prefix}session:{sid}:messages")
        pipe.zrange(f"{prefix}session:{sid}:messages", -1, -1, withscores=True)
    replies = pipe.execute()
    missed = past = 0
    for n, sid in enumerate(sessions):
        if sid in pending:
            continue
        count, top = replies[2 * n], replies[2 * n + 1]
        mark = marks.get(sid)
        if mark is None or mark[0] != count or (top and top[0][1] != mark[1]):
            missed += 1
        else:
            past += 1
    return {"sessions": len(sessions), "pending": len(pending), "missed": missed,
            "past_watermark": past}  # fmt: skip


def wait(predicate: Any, timeout: float, what: str) -> float:
    started = time.monotonic()
    while not predicate():
        if time.monotonic() - started > timeout:
            raise BenchError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(0.2)
    return time.monotonic() - started


def scalar(conn: psycopg.Connection[Any], query: str) -> Any:
    row = conn.execute(query).fetchone()
    return None if row is None else row[0]


def percentile(values: list[float], p: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(p / 100 * (len(ordered) - 1)))]


def sweep_alone(env: dict[str, str]) -> tuple[int, float]:
    """One sweep of every session timed on its own (this process): (sessions, seconds)."""
    from worker.services import open_services
    from worker.settings import Settings
    from worker.watch import Sweep

    settings = Settings.from_env(env)
    with open_services(settings) as services:
        sweep = Sweep()
        while not sweep.done:
            sweep.step(services.redis, services.pg)
        return sweep.sessions, time.monotonic() - sweep.started


def bench(args: argparse.Namespace) -> dict[str, Any]:
    tag = uuid.uuid4().hex[:8]
    prefix = f"rpo-{tag}:"
    workdir = Path(tempfile.mkdtemp(prefix="dnd-rpo-"))
    data = DataRedis(workdir)
    procs: list[Celery] = []
    try:
        with bench_database(args.admin_url, keep=False) as database_url:
            env = {k: v for k, v in os.environ.items() if not k.startswith(("DND_", "CELERY_"))}
            for name in list(env):
                if name.startswith("CONTINUOUS_") or name in ("BACKUP_SCHEDULE",):
                    del env[name]
            env.update({
                "DATABASE_URL": database_url, "REDIS_URL": data.url, "REDIS_KEY_PREFIX": prefix,
                "CELERY_BROKER_URL": args.broker_url, "CELERY_RESULT_BACKEND": args.broker_url,
                "CELERY_QUEUE_PREFIX": f"rpo{tag}.", "CELERY_KEY_PREFIX": f"rpo{tag}:",
                "CELERY_PRODUCER_QUEUES": f"rpo{tag}.celery", "PYTHONUNBUFFERED": "1",
            })  # fmt: skip
            subprocess.run([sys.executable, "-m", "worker", "migrate", "up"], cwd=REPO, env=env,
                           check=True, capture_output=True)  # fmt: skip
            with psycopg.connect(database_url, autocommit=True) as setup:
                setup.execute(SEEN_SETUP)
            client = redis.Redis.from_url(data.url)
            sessions = [str(uuid.uuid4()) for _ in range(args.sessions)]
            pipe = client.pipeline(transaction=False)
            for sid in sessions:
                pipe.sadd(f"{prefix}sessions", sid)
                pipe.hset(f"{prefix}session:{sid}", mapping=session_hash(sid))  # type: ignore[arg-type]
            pipe.execute()
            log(f"{args.sessions} sessions written; starting {args.workers} worker(s) and beat")
            for n in range(args.workers):
                worker = Celery(env, ["worker", "-n", f"rpo{n}@%h", "-c", "2", "--loglevel",
                                      "INFO", "--without-mingle", "--without-gossip"],
                                workdir / f"worker{n}.log")  # fmt: skip
                procs.append(worker)
            beat = Celery(env, ["beat", "-s", str(workdir / "beat-schedule")], workdir / "beat.log")
            procs.append(beat)
            for worker in procs[:-1]:
                worker.wait_ready("ready.")
            with psycopg.connect(database_url, autocommit=True) as conn:
                settled = wait(
                    lambda: scalar(conn, "SELECT count(*) FROM client_sessions") == args.sessions
                    and scalar(conn, "SELECT count(*) FROM continuous_pending") == 0,
                    300, "the sessions' first backup",
                )  # fmt: skip
                log(f"sessions backed up by the workers in {settled:.1f} s; load starts")
                swept = sweep_alone(env)
                fig = run_load(args, data, procs, env, database_url, prefix, sessions, conn)
                per_session = round(swept[1] / max(swept[0], 1) * 1e6, 1)
                fig["sweep_alone"] = {
                    "sessions": swept[0], "seconds": round(swept[1], 3),
                    "us_per_session": per_session,
                }  # fmt: skip
                return fig
    finally:
        for proc in procs:
            proc.stop()
        data.stop()
        if not args.keep:
            shutil.rmtree(workdir, ignore_errors=True)
        else:
            log(f"--keep: logs in {workdir}")


def run_load(
    args: argparse.Namespace, data: DataRedis, procs: list[Celery], env: dict[str, str],
    database_url: str, prefix: str, sessions: list[str], conn: psycopg.Connection[Any],
) -> dict[str, Any]:  # fmt: skip
    workers = procs[:-1]
    cpu_before = sum(w.cpu_seconds() for w in workers)
    drains_before = sum(w.log_path.read_text(errors="replace").count("continuous_drain[")
                        for w in workers) // 2  # fmt: skip
    load = Load(data.url, prefix, database_url, sessions)
    # Several writers (each its own connection and share of the rate): one alone
    # cannot offer 1,000 round trips a second on a busy 2-core machine.
    writers = [
        threading.Thread(target=load.write, args=(args.rate / args.writers, args.seconds, n))
        for n in range(args.writers)
    ]
    poller = threading.Thread(target=load.poll, daemon=True)
    timeline = Timeline(load, database_url, data.url)
    started = time.monotonic()
    for writer in writers:
        writer.start()
    poller.start()
    if args.timeline:
        threading.Thread(target=timeline.run, args=(started,), daemon=True).start()
    events: dict[str, Any] = {}
    if args.kill_worker or args.restart_redis:
        time.sleep(args.seconds / 2)
        if args.kill_worker:
            # The worker whose watcher is the active one, and its drains.
            node = str(scalar(conn, "SELECT node FROM continuous_watcher"))
            victim = next(
                (w for n, w in enumerate(workers) if node.startswith(f"rpo{n}@")), workers[0]
            )
            victim.kill()
            events["killed_at_s"] = round(time.monotonic() - started, 1)
            events["active_watcher_before"] = node
            time.sleep(2)
            victim.restart()
        if args.restart_redis:
            events["redis_away_s"] = round(data.restart_with_data(), 2)
            events["restarted_at_s"] = round(time.monotonic() - started, 1)
    for writer in writers:
        writer.join()
    load_seconds = time.monotonic() - started
    data_client = redis.Redis.from_url(data.url)
    events["unseen_at_load_end"] = unseen_sessions(load, conn, data_client, prefix)
    time.sleep(3)
    events["unseen_3s_later"] = unseen_sessions(load, conn, data_client, prefix)
    written = len(load.written)
    try:
        wait(lambda: not load.unseen, args.catch_up, "every message")
        # The last message seen, from the end of the load.
        caught_up: float | None = max(0.0, max(load.visible.values()) - started - load_seconds)
    except BenchError:
        caught_up = None  # reported: stored < written
    load.stop_polling.set()
    timeline.stop.set()
    stored = scalar(conn, "SELECT count(*) FROM client_messages")
    pipe = redis.Redis.from_url(data.url).pipeline(transaction=False)
    for sid in sessions:
        pipe.zcard(f"{prefix}session:{sid}:messages")
    in_redis = sum(pipe.execute())
    # A message never seen within the wait counts with the lag it had when the wait ended.
    end = time.monotonic()
    lags = [load.visible.get(m, end) - load.written[m] for m in load.written]
    time.sleep(1)
    cpu = sum(w.cpu_seconds() + w.cpu_dead for w in workers) - cpu_before
    drains = sum(w.log_path.read_text(errors="replace").count("continuous_drain[")
                 for w in workers) // 2 - drains_before  # fmt: skip
    activity = conn.execute(
        "SELECT coalesce(sum(backups), 0), coalesce(sum(sessions), 0) FROM continuous_activity"
    ).fetchone()
    watcher = conn.execute(
        "SELECT node, notifications, last_sweep_sessions, last_sweep_seconds "
        "FROM continuous_watcher"
    ).fetchone()
    assert activity is not None
    assert watcher is not None
    return {
        "rate": args.rate, "sessions": args.sessions, "seconds": args.seconds,
        "load_seconds": round(load_seconds, 1), "written": written, "in_redis": in_redis,
        "stored": stored,
        "caught_up_after_load_s": None if caught_up is None else round(caught_up, 1),
        "lag_p50_s": round(statistics.median(lags), 3), "lag_p99_s": round(percentile(lags, 99), 3),
        "lag_max_s": round(max(lags), 3),
        "poll_p50_s": round(statistics.median(load.poll_seconds or [0]), 3),
        "poll_max_s": round(max(load.poll_seconds or [0]), 3),
        "drain_tasks": drains, "backups": int(activity[0]),
        "sessions_backed_up": int(activity[1]), "write_retries": load.write_errors,
        "worker_cpu_s": round(cpu, 1), "worker_cpu_ms_per_message": round(cpu / written * 1000, 3),
        "watcher": {"node": watcher[0], "notifications": watcher[1],
                    "last_sweep_sessions": watcher[2], "last_sweep_seconds": watcher[3]},
        **events,
        **({"timeline": timeline.rows} if args.timeline else {}),
    }  # fmt: skip


def report(fig: dict[str, Any]) -> str:
    lines = [
        f"load              {fig['rate']} msg/s over {fig['sessions']} sessions for "
        f"{fig['seconds']} s (took {fig['load_seconds']} s)",
        f"lag (write->PG)   p50 {fig['lag_p50_s']} s   p99 {fig['lag_p99_s']} s   "
        f"max {fig['lag_max_s']} s   (target p99 <= 2 s, max <= 5 s)",
        f"written / stored  {fig['written']} written, {fig['in_redis']} in Redis, "
        f"{fig['stored']} in PostgreSQL "
        f"({'equal' if fig['written'] == fig['stored'] else 'DIFFERENT'}); all visible "
        f"{fig['caught_up_after_load_s']} s after the load stopped (None: not within --catch-up)",
        f"work              {fig['drain_tasks']} drain tasks, {fig['backups']} backups of "
        f"{fig['sessions_backed_up']} sessions, for {fig['written']} writes",
        f"worker CPU        {fig['worker_cpu_s']} s "
        f"({fig['worker_cpu_ms_per_message']} ms per message)",
        f"watcher           {fig['watcher']['node']} "
        f"notifications={fig['watcher']['notifications']}; last sweep "
        f"{fig['watcher']['last_sweep_sessions']} sessions in "
        f"{(fig['watcher']['last_sweep_seconds'] or 0):.2f} s",
        f"sweep alone       {fig['sweep_alone']['sessions']} sessions in "
        f"{fig['sweep_alone']['seconds']} s "
        f"({fig['sweep_alone']['us_per_session']} us per session)",
    ]  # fmt: skip
    for key in ("killed_at_s", "active_watcher_before", "restarted_at_s", "redis_away_s",
                "unseen_at_load_end", "unseen_3s_later"):  # fmt: skip
        if key in fig:
            lines.append(f"{key:<17} {fig[key]}")
    if "timeline" in fig:
        lines.append(Timeline.report_rows(fig["timeline"]))
    if fig.get("write_retries"):
        lines.append(f"write retries     {fig['write_retries']} (the Redis was away)")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rate", type=float, default=1000)
    parser.add_argument("--sessions", type=int, default=10_000)
    parser.add_argument("--seconds", type=float, default=120)
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--writers", type=int, default=4, help="writer threads sharing --rate")
    parser.add_argument("--kill-worker", action="store_true")
    parser.add_argument("--restart-redis", action="store_true")
    parser.add_argument("--admin-url", default=os.environ.get("DND_BENCH_DATABASE_URL", ADMIN_URL))
    parser.add_argument("--broker-url", default=os.environ.get("DND_BENCH_REDIS_URL", REDIS_URL))
    parser.add_argument(
        "--catch-up", type=float, default=180, help="seconds to wait after the load"
    )
    parser.add_argument("--json", action="store_true")
    parser.add_argument(
        "--timeline", action="store_true",
        help="print, once a second, where the lag is (see Timeline)",
    )  # fmt: skip
    parser.add_argument(
        "--keep", action="store_true", help="keep the logs (their folder is printed)"
    )
    args = parser.parse_args()
    try:
        fig = bench(args)
    except (
        BenchError,
        psycopg.Error,
        redis.exceptions.RedisError,
        subprocess.SubprocessError,
    ) as exc:
        log(f"could not measure: {exc}")
        return 1
    print(json.dumps(fig, indent=2) if args.json else report(fig))
    return 0


if __name__ == "__main__":
    sys.exit(main())
