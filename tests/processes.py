"""Real processes for end-to-end tests: Celery workers and beat, the CLI, app code.

Every process gets the test's environment (its database, its Redis key prefix,
its own Celery queue and key prefixes), so concurrent test runs never see each
other's tasks.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Mapping
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent


def base_env(extra: Mapping[str, str]) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("DND_", "CELERY_"))}
    for name in (
        "DATABASE_URL",
        "REDIS_URL",
        "REDIS_KEY_PREFIX",
        "POSTGRES_HOST",
        "POSTGRES_USER",
        "POSTGRES_PASSWORD",
        "POSTGRES_DBNAME",
        "BACKUP_SCHEDULE",
    ):
        env.pop(name, None)
    env["PYTHONUNBUFFERED"] = "1"
    env.update(extra)
    return env


class CeleryProcess:
    """`celery -A worker worker|beat` in a process group of its own."""

    def __init__(self, env: Mapping[str, str], log_dir: Path, args: list[str], name: str):
        self.name = name
        self.log_path = log_dir / f"{name}.log"
        self._log = self.log_path.open("wb")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "celery", "-A", "worker", *args],
            cwd=REPO,
            env=base_env(env),
            stdout=self._log,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # its own process group: kill it with its children
        )

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def wait_for_log(self, text: str, timeout: float = 30) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if text in self.log():
                return
            if self.proc.poll() is not None:
                raise AssertionError(f"{self.name} exited ({self.proc.returncode}):\n{self.log()}")
            time.sleep(0.1)
        raise AssertionError(f"{self.name}: no {text!r} within {timeout} s:\n{self.log()[-3000:]}")

    def kill(self) -> None:
        """SIGKILL the whole process group: the worker and its pool processes."""
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(10)

    def stop(self, timeout: float = 20) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.kill()
        self._log.close()

    def alive(self) -> bool:
        return self.proc.poll() is None


def start_worker(
    env: Mapping[str, str],
    log_dir: Path,
    *,
    name: str | None = None,
    concurrency: int = 1,
    queues: list[str] | None = None,
    extra: list[str] | None = None,
) -> CeleryProcess:
    name = name or f"w{uuid.uuid4().hex[:6]}"
    args = [
        "worker",
        "-n",
        f"{name}@%h",
        "-c",
        str(concurrency),
        "--loglevel",
        "INFO",
        "--without-mingle",
        "--without-gossip",
    ]
    if queues:
        args += ["-Q", ",".join(queues)]
    worker = CeleryProcess(env, log_dir, args + (extra or []), name)
    worker.wait_for_log("ready.", timeout=60)
    return worker


def start_beat(env: Mapping[str, str], log_dir: Path, name: str = "beat") -> CeleryProcess:
    schedule = log_dir / f"{name}-schedule"
    beat = CeleryProcess(env, log_dir, ["beat", "--loglevel", "INFO", "-s", str(schedule)], name)
    beat.wait_for_log("beat: Starting", timeout=60)
    return beat


def run_python(env: Mapping[str, str], code: str, timeout: float = 120) -> Any:
    """Run ``code`` as application code would (its own process); it prints JSON."""
    done = subprocess.run(
        [sys.executable, "-c", code],
        cwd=REPO,
        env=base_env(env),
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )
    if done.returncode != 0:
        raise AssertionError(f"exit {done.returncode}\nstdout:{done.stdout}\nstderr:{done.stderr}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def run_cli(
    env: Mapping[str, str], *args: str, timeout: float = 180, stdin: str | None = None
) -> subprocess.CompletedProcess[str]:
    """`dnd-client ARGS` as a user types it (through bin/dnd-client of the checkout)."""
    return subprocess.run(
        [sys.executable, str(REPO / "bin" / "dnd-client"), *args],
        cwd=REPO,
        env=base_env(env),
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
        input=stdin,
    )
