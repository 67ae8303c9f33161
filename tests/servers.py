"""Servers a test starts for itself: a private redis-server, or a Sentinel group, on free ports.

The machine's shared servers are never reconfigured or restarted; a test that
must restart a Redis, lose its data, or give it options of its own starts one
here and stops it by PID.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import redis


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def wait_answering(port: int, timeout: float = 10) -> None:
    """Until a Redis (or a sentinel) on ``port`` answers PING."""
    deadline = time.monotonic() + timeout
    client = redis.Redis(host="127.0.0.1", port=port, socket_connect_timeout=1)
    try:
        while True:
            try:
                client.ping()
                return
            except redis.exceptions.ConnectionError:
                if time.monotonic() > deadline:
                    raise AssertionError(f"redis-server on {port} did not start") from None
                time.sleep(0.05)
    finally:
        client.close()


class RedisServer:
    """`redis-server` on 127.0.0.1, a port and a folder of its own; nothing kept on disk."""

    def __init__(
        self, workdir: Path, *extra: str, port: int | None = None, binary: str | None = None
    ) -> None:
        binary = binary or shutil.which("redis-server")
        if binary is None:
            raise AssertionError("redis-server is not installed (it comes with Redis)")
        self.binary = binary
        self.port = port or free_port()
        self.dir = workdir / f"redis-{self.port}"
        self.dir.mkdir(parents=True, exist_ok=True)
        self.extra = list(extra)
        self.proc: subprocess.Popen[bytes] | None = None
        self._log: Any = None
        self.start()

    def url(self, db: int = 0) -> str:
        return f"redis://127.0.0.1:{self.port}/{db}"

    def start(self) -> None:
        if self._log is not None:
            self._log.close()
        self._log = log = (self.dir / "redis.log").open("ab")
        self.proc = subprocess.Popen(
            [
                self.binary, "--bind", "127.0.0.1", "--port", str(self.port),
                "--dir", str(self.dir), "--save", "", "--appendonly", "no", *self.extra,
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )  # fmt: skip
        self.wait_ready()

    def wait_ready(self, timeout: float = 10) -> None:
        wait_answering(self.port, timeout)

    def kill(self) -> None:
        """SIGKILL: the server and everything it held in memory are gone."""
        if self.proc is not None and self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGKILL)
            self.proc.wait(10)

    def restart_empty(self) -> None:
        """Killed and started again on the same port, with none of its data."""
        self.kill()
        self.start()

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.kill()
        if self._log is not None:
            self._log.close()
            self._log = None


@contextlib.contextmanager
def redis_server(workdir: Path, *extra: str) -> Iterator[RedisServer]:
    server = RedisServer(workdir, *extra)
    try:
        yield server
    finally:
        server.stop()


class Sentinel:
    """`redis-server <config> --sentinel` on a port of its own, watching one primary."""

    def __init__(
        self, workdir: Path, master: str, primary_port: int, *, quorum: int, down_after_ms: int
    ) -> None:
        binary = shutil.which("redis-server")
        if binary is None:
            raise AssertionError("redis-server is not installed (it comes with Redis)")
        self.port = free_port()
        self.dir = workdir / f"sentinel-{self.port}"
        self.dir.mkdir(parents=True, exist_ok=True)
        # The sentinel rewrites its config (what it learns): a file of its own.
        config = self.dir / "sentinel.conf"
        config.write_text(
            f"port {self.port}\n"
            "bind 127.0.0.1\n"
            f'dir "{self.dir}"\n'
            f"sentinel monitor {master} 127.0.0.1 {primary_port} {quorum}\n"
            # The test environment's failover speed, not the product's: the
            # sentinel's defaults (30 s down-after, 3 min failover timeout)
            # are the operator's choice.
            f"sentinel down-after-milliseconds {master} {down_after_ms}\n"
            f"sentinel failover-timeout {master} 10000\n"
            f"sentinel parallel-syncs {master} 2\n"
        )
        self._log = (self.dir / "sentinel.log").open("ab")
        self.proc = subprocess.Popen(
            [binary, str(config), "--sentinel"],
            stdout=self._log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        wait_answering(self.port)

    def client(self) -> redis.Redis:
        return redis.Redis(host="127.0.0.1", port=self.port, decode_responses=True)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                os.kill(self.proc.pid, signal.SIGKILL)
                self.proc.wait(10)
        self._log.close()


class SentinelGroup:
    """A primary, its replicas (--replicaof) and sentinels watching them, all on free ports."""

    def __init__(
        self,
        workdir: Path,
        master: str = "dndtest",
        *,
        replicas: int = 2,
        sentinels: int = 3,
        quorum: int = 2,
        down_after_ms: int = 1000,
    ) -> None:
        self.master = master
        self.servers: list[RedisServer] = []
        self.sentinels: list[Sentinel] = []
        try:
            self.servers.append(RedisServer(workdir))
            primary = self.servers[0].port
            for _ in range(replicas):
                self.servers.append(RedisServer(workdir, "--replicaof", "127.0.0.1", str(primary)))
            for _ in range(sentinels):
                self.sentinels.append(
                    Sentinel(workdir, master, primary, quorum=quorum, down_after_ms=down_after_ms)
                )
            self.wait_settled(replicas, sentinels)
        except BaseException:
            self.stop()
            raise

    @property
    def addresses(self) -> str:
        """REDIS_SENTINELS: host:port,host:port."""
        return ",".join(f"127.0.0.1:{s.port}" for s in self.sentinels)

    def celery_url(self, db: int) -> str:
        """A sentinel:// URL for Celery's broker or result backend, database ``db``."""
        return ";".join(f"sentinel://127.0.0.1:{s.port}/{db}" for s in self.sentinels)

    def primary_port(self) -> int:
        """The port of the primary, as the first sentinel that answers names it."""
        for sentinel in self.sentinels:
            if sentinel.proc.poll() is not None:
                continue
            with contextlib.closing(sentinel.client()) as client:
                address: Any = client.sentinel_get_master_addr_by_name(self.master)
                return int(address[1])
        raise AssertionError("no sentinel answers")

    def server(self, port: int) -> RedisServer:
        return next(s for s in self.servers if s.port == port)

    def wait_settled(self, replicas: int, sentinels: int, timeout: float = 30) -> None:
        """Every sentinel sees the primary, its replicas in sync, and the other sentinels."""
        deadline = time.monotonic() + timeout
        while True:
            if all(self._sees_all(s, replicas, sentinels) for s in self.sentinels):
                return
            if time.monotonic() > deadline:
                raise AssertionError("the sentinels did not find every replica and each other")
            time.sleep(0.2)

    def _sees_all(self, sentinel: Sentinel, replicas: int, sentinels: int) -> bool:
        with contextlib.closing(sentinel.client()) as client:
            state: Any = client.sentinel_master(self.master)
            found: Any = client.sentinel_slaves(self.master)
        in_sync = [r for r in found if r.get("master-link-status") == "ok"]
        others = int(state.get("num-other-sentinels", 0))
        return len(in_sync) == replicas and others == sentinels - 1

    def stop(self) -> None:
        for sentinel in self.sentinels:
            sentinel.stop()
        for server in self.servers:
            server.stop()
