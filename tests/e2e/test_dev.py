"""`dnd-client dev`: the whole stack on one machine, started and stopped as a user does.

The first test runs with no DATABASE_URL / REDIS_URL / CELERY_* at all, so the
command really embeds PostgreSQL and Redis; the others point it at the test
services and check it starts no server of its own.
"""

from __future__ import annotations

import base64
import json
import os
import re
import shlex
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import psutil
import pytest
import redis

from tests.processes import REPO, base_env, run_cli
from worker.devstack.processes import stop_leftovers
from worker.devstack.stack import READY_LINE

URL_VARIABLES = ("REDIS_URL", "CELERY_BROKER_URL", "CELERY_RESULT_BACKEND", "DATABASE_URL")


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def port_open(url: str) -> bool:
    parts = urlsplit(url)
    with socket.socket() as probe:
        probe.settimeout(1)
        return probe.connect_ex((parts.hostname or "127.0.0.1", parts.port or 80)) == 0


def dev_env(extra: dict[str, str]) -> dict[str, str]:
    env = base_env(extra)
    for name in list(env):
        if name.startswith(("FLOWER_", "PG")) and name not in extra:
            env.pop(name)
    return env


class Dev:
    """`dnd-client dev ARGS` in the background, its stdout and stderr in files."""

    def __init__(self, tmp_path: Path, env: dict[str, str], *args: str, name: str = "dev"):
        self.out_path = tmp_path / f"{name}.out"
        self.err_path = tmp_path / f"{name}.err"
        with self.out_path.open("wb") as out, self.err_path.open("wb") as err:
            self.proc = subprocess.Popen(
                [sys.executable, str(REPO / "bin" / "dnd-client"), "dev", *args],
                cwd=REPO,
                env=dev_env(env),
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=err,
            )
        self.started = time.monotonic()

    def stdout(self) -> str:
        return self.out_path.read_text(errors="replace")

    def stderr(self) -> str:
        return self.err_path.read_text(errors="replace")

    def dump(self) -> str:
        return f"stdout:\n{self.stdout()}\nstderr:\n{self.stderr()}"

    def wait_ready(self, timeout: float = 75) -> float:
        deadline = time.monotonic() + timeout
        while READY_LINE not in self.stdout():
            if self.proc.poll() is not None:
                raise AssertionError(
                    f"dev exited ({self.proc.returncode}) before ready\n{self.dump()}"
                )
            if time.monotonic() > deadline:
                self.proc.kill()
                raise AssertionError(f"dev not ready within {timeout} s\n{self.dump()}")
            time.sleep(0.2)
        return time.monotonic() - self.started

    def exports(self) -> dict[str, str]:
        found = {}
        for line in self.stdout().splitlines():
            if line.startswith("export "):
                name, _, value = shlex.split(line[len("export ") :])[0].partition("=")
                found[name] = value
        return found

    def descendants(self) -> list[psutil.Process]:
        return psutil.Process(self.proc.pid).children(recursive=True)

    def stop(self, sig: int = signal.SIGINT, timeout: float = 60) -> int:
        self.proc.send_signal(sig)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            raise AssertionError(f"dev did not stop within {timeout} s\n{self.dump()}") from None

    def kill_if_running(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)


def assert_all_gone(processes: list[psutil.Process], timeout: float = 10) -> None:
    """Every process is gone (a zombie waiting for init to reap it counts as gone)."""
    deadline = time.monotonic() + timeout
    while True:
        alive = []
        for proc in processes:
            try:
                if proc.is_running() and proc.status() != psutil.STATUS_ZOMBIE:
                    alive.append(f"{proc.pid} {' '.join(proc.cmdline())[:100]}")
            except psutil.NoSuchProcess:
                continue
        if not alive:
            return
        if time.monotonic() > deadline:
            raise AssertionError("left running:\n" + "\n".join(alive))
        time.sleep(0.2)


def recorded_pids(data_dir: Path) -> dict[str, int]:
    payload = json.loads((data_dir / "dev.pids").read_text())
    return {entry["name"]: entry["pid"] for entry in payload["children"]}


def http_status(url: str, auth: tuple[str, str] | None = None) -> int:
    assert url.startswith("http://127.0.0.1:")
    request = urllib.request.Request(url)  # noqa: S310 (checked just above)
    if auth is not None:
        token = base64.b64encode(f"{auth[0]}:{auth[1]}".encode()).decode()
        request.add_header("Authorization", f"Basic {token}")
    try:
        with urllib.request.urlopen(request, timeout=10) as response:  # noqa: S310
            return int(response.status)
    except urllib.error.HTTPError as exc:
        return int(exc.code)


def flower_login(stdout: str) -> tuple[str, str, str]:
    found = re.search(r"Flower\s+(http://\S+)\s+user (\S+), password (\S+)", stdout)
    assert found, stdout
    return found.group(1), found.group(2), found.group(3)


def no_traceback(text: str) -> None:
    assert "Traceback" not in text, text


# -- the embedded stack ---------------------------------------------------------


def test_dev_embeds_servers_runs_backups_and_stops_clean(tmp_path):
    data_dir = tmp_path / "dev-data"
    flower_port = free_port()
    args = ("--data-dir", str(data_dir), "--flower-port", str(flower_port))
    dev = Dev(tmp_path, {}, "--demo", "5", *args, name="first")
    try:
        took = dev.wait_ready()
        print(f"first start: ready in {took:.1f} s")
        exports = dev.exports()
        assert set(exports) == set(URL_VARIABLES), dev.stdout()
        for name in URL_VARIABLES:
            assert urlsplit(exports[name]).hostname == "127.0.0.1"
        # Broker and results on the embedded Redis, on other databases than the data.
        redis_dbs = {urlsplit(exports[n]).path for n in URL_VARIABLES[:3]}
        assert redis_dbs == {"/0", "/1", "/2"}
        assert "BACKUP_SCHEDULE=*/5 * * * *" in dev.stdout()
        assert "demo: wrote 5 sessions" in dev.stderr()

        # Everything it started: the PID file and the process tree agree.
        pids = recorded_pids(data_dir)
        assert set(pids) == {"redis", "postgres", "worker", "beat", "flower"}
        started = dev.descendants()
        assert set(pids.values()) <= {p.pid for p in started}
        names = " ".join(" ".join(p.cmdline()) for p in started)
        assert "redis-server" in names
        assert "postgres" in names

        # The CLI in "another terminal", through the stack's worker (not --local).
        other = {**exports, "DND_OUTPUT": "json"}
        done = run_cli(other, "backup", "--all", timeout=60)
        assert done.returncode == 0, done.stderr
        run = json.loads(done.stdout)
        # (All 5 are counted even if beat backed them up a moment before.)
        assert (run["status"], run["session_count"]) == ("completed", 5)
        assert run["details"]["mode"] == "celery"

        # Flower asks for the printed credentials.
        url, user, password = flower_login(dev.stdout())
        assert url == f"http://127.0.0.1:{flower_port}/"
        assert http_status(url) == 401
        assert http_status(url, (user, "wrong")) == 401
        assert http_status(url, (user, password)) == 200

        # Ctrl-C: everything stops, the servers last; exit 0.
        t0 = time.monotonic()
        assert dev.stop(signal.SIGINT) == 0, dev.dump()
        print(f"first stop: {time.monotonic() - t0:.1f} s")
        assert_all_gone(started)
        for name in ("REDIS_URL", "DATABASE_URL"):
            assert not port_open(exports[name]), name
        assert not port_open(url)
        assert not (data_dir / "dev.pids").exists()
        no_traceback(dev.stderr())
    finally:
        dev.kill_if_running()

    # Again on the same data dir: the same URLs, the same data.
    again = Dev(tmp_path, {}, *args, name="second")
    try:
        took = again.wait_ready()
        print(f"second start: ready in {took:.1f} s")
        assert again.exports() == exports
        assert flower_login(again.stdout())[1:] == (user, password)
        listed = run_cli({**exports, "DND_OUTPUT": "json"}, "backup", "list")
        assert listed.returncode == 0, listed.stderr
        assert run["id"] in [r["id"] for r in json.loads(listed.stdout)]
        client = redis.Redis.from_url(exports["REDIS_URL"])
        try:
            assert client.scard("dnd:sessions") == 5
        finally:
            client.close()
        started = again.descendants()
        assert again.stop(signal.SIGINT) == 0, again.dump()
        assert_all_gone(started)
        assert not port_open(exports["DATABASE_URL"])
        no_traceback(again.stderr())
    finally:
        again.kill_if_running()


# -- servers given in the environment -------------------------------------------


def _with_password(database_url: str, password: str) -> str:
    parts = urlsplit(database_url)
    netloc = f"{parts.username}:{password}@{parts.hostname}:{parts.port}"
    return urlunsplit(parts._replace(netloc=netloc))


@pytest.mark.parametrize("as_files", [False, True], ids=["variables", "files"])
def test_dev_uses_the_servers_in_the_environment(
    tmp_path, celery_env, redis_client, keys, as_files
):
    secret = "s3cret-pw-not-for-output"
    env = {
        **celery_env,
        # Trust auth ignores it; it must never be printed all the same.
        "DATABASE_URL": _with_password(celery_env["DATABASE_URL"], secret),
        "FLOWER_BASIC_AUTH": "tester:given-flower-pw",
    }
    if as_files:  # <NAME>_FILE counts as given: nothing is embedded either
        for name in ("DATABASE_URL", "REDIS_URL", "FLOWER_BASIC_AUTH"):
            path = tmp_path / name.lower()
            path.write_text(env.pop(name) + "\n")
            env[f"{name}_FILE"] = str(path)
    data_dir = tmp_path / "dev-data"
    flower_port = free_port()
    dev = Dev(
        tmp_path,
        env,
        "--demo",
        "3",
        "--data-dir",
        str(data_dir),
        "--flower-port",
        str(flower_port),
        "--no-beat",
    )
    try:
        dev.wait_ready()
        out, err = dev.stdout(), dev.stderr()
        for text in (out, err):
            assert secret not in text
            assert "given-flower-pw" not in text
        assert "from DATABASE_URL" in out
        assert ":***@" in out
        assert "from REDIS_URL" in out
        # Nothing embedded: no server process, no server data.
        started = dev.descendants()
        commands = [" ".join(p.cmdline()) for p in started]
        assert not [c for c in commands if "redis-server" in c or "pginstall" in c], commands
        assert not (data_dir / "postgres").exists()
        assert not (data_dir / "redis").exists()
        assert set(recorded_pids(data_dir)) == {"worker", "flower"}
        # Only the settings the other terminal must share are exported.
        exports = dev.exports()
        assert not set(exports) & set(URL_VARIABLES)
        assert exports["REDIS_KEY_PREFIX"] == celery_env["REDIS_KEY_PREFIX"]
        assert exports["CELERY_QUEUE_PREFIX"] == celery_env["CELERY_QUEUE_PREFIX"]
        # The demo went to the given Redis, under the given key prefix.
        assert redis_client.scard(keys.sessions) == 3

        done = run_cli({**celery_env, "DND_OUTPUT": "json"}, "backup", "--all", timeout=60)
        assert done.returncode == 0, done.stderr
        assert json.loads(done.stdout)["session_count"] == 3

        url = f"http://127.0.0.1:{flower_port}/"
        assert http_status(url) == 401
        assert http_status(url, ("tester", "given-flower-pw")) == 200

        assert dev.stop(signal.SIGTERM) == 0, dev.dump()
        assert_all_gone(started)
        no_traceback(dev.stderr())
    finally:
        dev.kill_if_running()


def test_dev_ready_block_as_json(tmp_path, celery_env):
    """`--output json`: the ready block as one JSON object, for scripts."""
    dev = Dev(
        tmp_path,
        celery_env,
        "--output",
        "json",
        "--data-dir",
        str(tmp_path / "d"),
        "--no-beat",
        "--no-flower",
    )
    try:
        dev.wait_ready()
        block = json.loads(dev.stdout().split(READY_LINE)[0])
        assert block["worker"]["concurrency"] == 2
        assert block["beat"] is None
        assert "flower" not in block
        # Every URL came from the environment: none is exported again...
        assert not set(block["exports"]) & set(URL_VARIABLES)
        # ...but the settings another terminal must share are.
        assert block["exports"]["REDIS_KEY_PREFIX"] == celery_env["REDIS_KEY_PREFIX"]
        assert block["redis"] == celery_env["REDIS_URL"]
        assert dev.stop(signal.SIGINT) == 0, dev.dump()
    finally:
        dev.kill_if_running()


def test_dev_killed_outright_leaves_nothing_running(tmp_path, celery_env):
    args = ("--data-dir", str(tmp_path / "dev-data"), "--no-beat", "--no-flower")
    dev = Dev(tmp_path, celery_env, *args, name="killed")
    try:
        dev.wait_ready()
        started = dev.descendants()
        assert started
        os.kill(dev.proc.pid, signal.SIGKILL)
        dev.proc.wait(10)
        # The kernel tells each child its parent died (PR_SET_PDEATHSIG).
        assert_all_gone(started, timeout=30)
    finally:
        dev.kill_if_running()
    # The PID file it could not remove does not stop the next start.
    again = Dev(tmp_path, celery_env, *args, name="after-kill")
    try:
        again.wait_ready()
        started = again.descendants()
        assert again.stop() == 0, again.dump()
        assert_all_gone(started)
    finally:
        again.kill_if_running()


def test_leftovers_are_stopped_by_pid_and_start_time(tmp_path):
    """What a stack that died without its children left is stopped; nothing else is."""
    leftover = subprocess.Popen(["sleep", "300"], start_new_session=True)
    bystander = subprocess.Popen(["sleep", "300"], start_new_session=True)
    try:
        pid_file = tmp_path / "dev.pids"
        entries = [
            {
                "name": "worker",
                "pid": leftover.pid,
                "create_time": psutil.Process(leftover.pid).create_time(),
                "stop_signal": 15,
            },
            # The bystander's PID with another start time: a PID reused since.
            {
                "name": "beat",
                "pid": bystander.pid,
                "create_time": psutil.Process(bystander.pid).create_time() - 100,
                "stop_signal": 15,
            },
        ]
        pid_file.write_text(json.dumps({"supervisor": 1, "children": entries}))
        said: list[str] = []
        watched = psutil.Process(leftover.pid)
        stop_leftovers(pid_file, said.append, timeout=10)
        assert_all_gone([watched])
        assert bystander.poll() is None
        assert not pid_file.exists()
        assert "worker" in said[0]
        assert "beat" not in said[0]
    finally:
        for proc in (leftover, bystander):
            if proc.poll() is None:
                proc.kill()
                proc.wait()


def test_dev_serves_the_metrics_and_shows_the_lag(tmp_path, celery_env):
    """Beat in the stack serves /metrics; the stack's status line shows the lag."""
    port = free_port()
    dev = Dev(
        tmp_path,
        celery_env,
        "--output",
        "json",
        "--data-dir",
        str(tmp_path / "d"),
        "--no-flower",
        "--metrics-port",
        str(port),
    )
    try:
        dev.wait_ready()
        block = json.loads(dev.stdout().split(READY_LINE)[0])
        assert block["metrics"] == f"http://127.0.0.1:{port}/metrics"
        deadline = time.monotonic() + 30
        while True:
            try:
                with urllib.request.urlopen(block["metrics"], timeout=15) as answer:  # noqa: S310
                    text = answer.read().decode()
                break
            except OSError:
                assert time.monotonic() < deadline, dev.dump()
                time.sleep(0.3)
        assert 'dnd_recovery_point_seconds{shard="0"}' in text
        assert "dnd_database_up 1.0" in text
        # The first lag line comes as soon as the stack is up. Nothing was ever
        # backed up: no bound on the lag until the stack's continuous watcher is
        # up (its heartbeat); then nothing is waiting, so the lag is 0.
        while "dnd-client dev: lag " not in dev.stderr():
            assert time.monotonic() < deadline, dev.dump()
            time.sleep(0.3)
        [line] = [x for x in dev.stderr().splitlines() if x.startswith("dnd-client dev: lag ")]
        assert "lag unbounded (no full backup yet) (target 5 s) ABOVE TARGET" in line or (
            "lag 0.0 s (target 5 s)" in line and "watcher alive" in line
        ), line
        assert "0 sessions waiting" in line
        assert dev.stop(signal.SIGINT) == 0, dev.dump()
    finally:
        dev.kill_if_running()
