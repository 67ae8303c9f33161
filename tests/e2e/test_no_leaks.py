"""Nothing leaks: with a password on every service, no byte the system produces holds one.

A PostgreSQL cluster and a Redis of this test's own require passwords (the
shared servers trust everyone on 127.0.0.1): one for the database, one per
Redis user (data, broker, result store), one for Flower. Then a backup (with a
record kept aside), a restore, a verify, failures (servers down, a wrong
password) and Flower run, and everything they produced is searched for each
password, as written and URL-encoded.
"""

from __future__ import annotations

import base64
import json
import subprocess
import sys
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import quote, quote_plus

import psycopg
import pytest
import redis

from tests.e2e.cli_helpers import OK, PARTIAL, cli, describe
from tests.e2e.conftest import wait_for
from tests.e2e.security_helpers import redis_7_binary
from tests.factories import make_sessions
from tests.postgres_cluster import PostgresCluster, postgres_cluster
from tests.processes import REPO, CeleryProcess, base_env, start_beat, start_worker
from tests.servers import RedisServer, free_port
from worker.keys import RedisKeys

TAG = uuid.uuid4().hex[:12]
# Characters that URLs must encode, so both forms are searched for.
PASSWORDS = {
    "postgres": f"pg-P@ss/w:rd+{TAG}",
    "redis data": f"data-P@ss/w:rd+{TAG}",
    "redis broker": f"broker-P@ss/w:rd+{TAG}",
    "redis results": f"result-P@ss/w:rd+{TAG}",
    "flower": f"flower-P@ss/word+{TAG}",
}
ADMIN = f"admin-{TAG}"
FLOWER_PAGES = ["/", "/workers", "/tasks", "/broker", "/api/tasks", "/api/workers?refresh=1"]


def forms(password: str) -> set[str]:
    return {password, quote(password, safe=""), quote(password), quote_plus(password)}


class Collected:
    """Everything the system produced, by where it came from."""

    def __init__(self) -> None:
        self.items: list[tuple[str, str]] = []

    def add(self, where: str, text: str | bytes) -> None:
        if isinstance(text, bytes):
            text = text.decode(errors="replace")
        self.items.append((where, text))

    def cli(self, where: str, done: subprocess.CompletedProcess[str]) -> None:
        self.add(f"{where} (stdout)", done.stdout)
        self.add(f"{where} (stderr)", done.stderr)

    def leaks(self) -> list[str]:
        found = []
        for where, text in self.items:
            for name, password in PASSWORDS.items():
                for form in forms(password):
                    if form in text:
                        at = text.index(form)
                        found.append(
                            f"{name} password ({form!r}) in {where}: {text[at - 80 : at]!r}"
                        )
        return found


@pytest.fixture
def servers(tmp_path: Path) -> Iterator[tuple[PostgresCluster, RedisServer]]:
    with postgres_cluster(PASSWORDS["postgres"]) as pg:
        pg.execute("CREATE DATABASE dnd")
        server = RedisServer(tmp_path, binary=redis_7_binary())
        try:
            setup = redis.Redis(host="127.0.0.1", port=server.port)
            users = {
                "admin": ADMIN,
                "data": PASSWORDS["redis data"],
                "broker": PASSWORDS["redis broker"],
                "results": PASSWORDS["redis results"],
            }
            for user, secret in users.items():
                rights = ("~*", "&*", "+@all")
                setup.execute_command("ACL", "SETUSER", user, "on", f">{secret}", *rights)
            setup.execute_command("ACL", "SETUSER", "default", "off")
            setup.close()
            yield pg, server
        finally:
            server.stop()


def redis_url(server: RedisServer, user: str, name: str, db: int, port: int | None = None) -> str:
    password = quote(PASSWORDS[name], safe="")
    return f"redis://{user}:{password}@127.0.0.1:{port or server.port}/{db}"


@pytest.mark.timeout(600)
def test_no_password_in_anything_the_system_produces(servers, tmp_path: Path) -> None:
    pg, server = servers
    flower_port = free_port()
    env = {
        "DATABASE_URL": pg.url(db="dnd"),
        "REDIS_URL": redis_url(server, "data", "redis data", 0),
        "REDIS_KEY_PREFIX": "dnd:",
        "CELERY_BROKER_URL": redis_url(server, "broker", "redis broker", 1),
        "CELERY_RESULT_BACKEND": redis_url(server, "results", "redis results", 2),
        "FLOWER_BASIC_AUTH": f"admin:{PASSWORDS['flower']}",
        "BACKUP_SHARDS": "2",
        "BACKUP_BATCH_SESSIONS": "3",
        "BACKUP_SCHEDULE": "off",
        # The explicit backup must find the record to keep aside (exit 3, partial):
        # continuous backups (on by default) would have kept it aside first.
        "CONTINUOUS_BACKUP": "0",
        "SUPERVISE_INTERVAL": "2",
    }
    seen = Collected()
    admin = redis.Redis(host="127.0.0.1", port=server.port, username="admin", password=ADMIN)
    keys = RedisKeys("dnd:")
    ids = make_sessions(admin, keys, 7, 3)
    admin.zadd(keys.messages(ids[0]), {b"not json at all": 1})  # a record kept aside
    admin.close()

    done = cli(env, "migrate", "up")
    assert done.returncode == OK, describe(done)
    seen.cli("migrate up", done)

    processes: list[CeleryProcess] = []
    try:
        processes.append(start_worker(env, tmp_path, name="leakw", concurrency=2))
        processes.append(start_beat(env, tmp_path))
        flower = CeleryProcess(
            env, tmp_path,
            ["flower", f"--port={flower_port}", "--address=127.0.0.1"], "flower",
        )  # fmt: skip
        processes.append(flower)
        flower_url = f"http://127.0.0.1:{flower_port}"
        wait_for(lambda: _get(f"{flower_url}/healthcheck")[0] == 200, 60, message="Flower")
        _runs(env, ids, seen)
        _failures(env, pg, server, seen)
        _flower(flower_url, seen)
        _celery_views(env, seen)
        ps = subprocess.run(["ps", "-eo", "pid,args"], capture_output=True, text=True, check=True)
        seen.add("process command lines", ps.stdout)
        assert "-A worker flower" in ps.stdout
    finally:
        for process in reversed(processes):
            process.stop()
    for process in processes:
        seen.add(f"{process.name} log", process.log())
    _stored(pg, server, seen)

    assert len(seen.items) > 40
    assert seen.leaks() == []
    # The search finds a password wherever it is, in any of its forms.
    for name, url in (("postgres", env["DATABASE_URL"]), ("redis data", env["REDIS_URL"])):
        seen.add("control", url)
        assert [leak for leak in seen.leaks() if leak.startswith(name)], name
        seen.items.pop()


def _runs(env: dict[str, str], ids: list[str], seen: Collected) -> None:
    """A backup (partial: one record kept aside), a restore, a verify, on the workers."""
    for args, status in (
        (("backup", "--all"), PARTIAL),
        (("restore", "--all", "--force"), OK),
        (("verify", "--all"), OK),
        (("kept", "list"), OK),
        (("backup", "--session", ids[1]), OK),
        (("backup", "list"), OK),
        # The restore wrote the sessions back without the bad record: nothing kept now.
        (("backup", "--all", "--local", "-o", "json"), OK),
    ):
        done = cli(env, *args)
        assert done.returncode == status, describe(done)
        seen.cli(" ".join(args), done)


def _failures(
    env: dict[str, str], pg: PostgresCluster, server: RedisServer, seen: Collected
) -> None:
    """Each server down (nothing listens on its port), and a wrong password."""
    closed = free_port()
    broker_down = redis_url(server, "broker", "redis broker", 1, closed)
    results_down = redis_url(server, "results", "redis results", 2, closed)
    failures = {
        "PostgreSQL down": {"DATABASE_URL": pg.url(db="dnd").replace(str(pg.port), str(closed))},
        "Redis down": {"REDIS_URL": redis_url(server, "data", "redis data", 0, closed)},
        "broker down": {"CELERY_BROKER_URL": broker_down},
        "result store down": {"CELERY_RESULT_BACKEND": results_down},
        "wrong Redis password": {"REDIS_URL": redis_url(server, "data", "redis broker", 0)},
    }
    for what, change in failures.items():
        # The data servers down: a run in this process; Celery's: through the workers.
        local = ("--local",) if change.keys() & {"DATABASE_URL", "REDIS_URL"} else ()
        done = cli({**env, **change}, "backup", "--all", *local, "--timeout", "20")
        assert done.returncode != OK, describe(done)
        seen.cli(what, done)


def _flower(flower_url: str, seen: Collected) -> None:
    """Every page refuses no password and a wrong one; none shows a password."""
    good = ("admin", PASSWORDS["flower"])
    status, tasks_json = _get(f"{flower_url}/api/tasks", good)
    assert status == 200
    task_ids = list(json.loads(tasks_json))
    assert task_ids
    pages = FLOWER_PAGES + [f"/task/{task_id}" for task_id in task_ids]
    pages += ["/worker/leakw@" + _hostname(), f"/api/task/info/{task_ids[0]}"]
    for page in pages:
        url = flower_url + page
        assert _get(url)[0] == 401, page
        assert _get(url, ("admin", "wrong"))[0] == 401, page
        status, body = _get(url, good)
        assert status == 200, (page, body[:300])
        seen.add(f"Flower {page}", body)
    for page in ("/metrics", "/healthcheck"):
        status, body = _get(flower_url + page)
        assert status == 200
        seen.add(f"Flower {page}", body)


def _celery_views(env: dict[str, str], seen: Collected) -> None:
    """What Celery shows about itself: the configuration, stats, a bug report."""
    for args in (["inspect", "conf"], ["inspect", "stats"], ["inspect", "registered"],
                 ["report"]):  # fmt: skip
        done = subprocess.run(
            [sys.executable, "-m", "celery", "-A", "worker", *args],
            cwd=REPO, env=base_env(env), capture_output=True, text=True, timeout=60,
            check=False,
        )  # fmt: skip
        assert done.returncode == 0, done.stderr
        seen.cli("celery " + " ".join(args), done)
        if args == ["inspect", "conf"]:
            # The workers' configuration names the broker and result store (masked).
            assert "broker_url" in done.stdout, done.stdout
            assert "redis://broker:********@127.0.0.1" in done.stdout, done.stdout


def _stored(pg: PostgresCluster, server: RedisServer, seen: Collected) -> None:
    """Every key of the data, broker and result databases; the run records."""
    for db in (0, 1, 2):
        for key, value in _redis_dump(server, db):
            seen.add(f"Redis db {db} key {key!r}", f"{key!r} {value!r}")
            if db != 0:  # Celery's keys: task messages and results, base64 bodies decoded
                seen.add(f"Redis db {db} key {key!r} (decoded)", _decoded_bodies(value))
    with psycopg.connect(pg.url(db="dnd")) as conn:
        for table in ("persistence_snapshots", "persistence_session_results",
                      "persistence_kept_records", "persistence_run_batches"):  # fmt: skip
            query = f"SELECT row_to_json(t)::text FROM {table} t"
            rows = conn.execute(query.encode()).fetchall()
            assert rows, table
            seen.add(f"table {table}", "\n".join(row[0] for row in rows))


def _hostname() -> str:
    import socket

    return socket.gethostname()


def _get(url: str, auth: tuple[str, str] | None = None) -> tuple[int, str]:
    request = urllib.request.Request(url)  # noqa: S310 - 127.0.0.1 only
    if auth is not None:
        token = base64.b64encode(f"{auth[0]}:{auth[1]}".encode()).decode()
        request.add_header("Authorization", f"Basic {token}")
    try:
        with urllib.request.urlopen(request, timeout=10) as response:  # noqa: S310
            return int(response.status), response.read().decode(errors="replace")
    except urllib.error.HTTPError as exc:
        return int(exc.code), ""
    except (urllib.error.URLError, ConnectionError):
        return 0, ""


def _redis_dump(server: RedisServer, db: int) -> list[tuple[bytes, Any]]:
    client = redis.Redis(
        host="127.0.0.1", port=server.port, db=db, username="admin", password=ADMIN
    )
    found = []
    try:
        for key in client.scan_iter(count=1000):
            kind = client.type(key)
            value: Any
            if kind == b"string":
                value = client.get(key)
            elif kind == b"list":
                value = client.lrange(key, 0, -1)
            elif kind == b"hash":
                value = client.hgetall(key)
            elif kind == b"set":
                value = client.smembers(key)
            elif kind == b"zset":
                value = client.zrange(key, 0, -1, withscores=True)
            else:
                value = kind
            found.append((key, value))
    finally:
        client.close()
    return found


def _decoded_bodies(value: Any) -> str:
    """Task messages keep their body base64-encoded: decode every such body found."""
    out = []
    items = value if isinstance(value, list) else [value]
    for item in items:
        if isinstance(item, tuple):
            item = item[0]
        try:
            message = json.loads(item)
        except (TypeError, ValueError):
            continue
        body = message.get("body") if isinstance(message, dict) else None
        if isinstance(body, str):
            try:
                out.append(base64.b64decode(body).decode(errors="replace"))
            except ValueError:
                out.append(body)
    return "\n".join(out)
