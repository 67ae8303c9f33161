"""worker/watch_cluster.py against a real 3-primary cluster with a replica each.

The module starts its own cluster: its last test kills a primary.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterator
from typing import Any

import pytest
import redis.cluster

from tests.cluster import RedisCluster, redis_cluster
from worker.watch_cluster import REDISCOVER_EVERY_S, ClusterKeyspaceWatcher, KeyChange, Resync


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisCluster]:
    with redis_cluster(tmp_path_factory.mktemp("watch"), primaries=3, replicas=1) as started:
        yield started


@pytest.fixture
def rc(cluster: RedisCluster) -> Iterator[Any]:
    client = redis.cluster.RedisCluster.from_url(cluster.url)
    yield client
    client.close()


def keys_on_each_primary(rc: Any, prefix: str, per_primary: int = 3) -> dict[str, list[str]]:
    """Key names under ``prefix``, ``per_primary`` on each primary (by slot)."""
    found: dict[str, list[str]] = {node.name: [] for node in rc.get_primaries()}
    while any(len(names) < per_primary for names in found.values()):
        key = f"{prefix}session:{uuid.uuid4()}:messages"
        owner = rc.get_node_from_key(key).name
        if len(found[owner]) < per_primary:
            found[owner].append(key)
    return found


def collect(
    watcher: ClusterKeyspaceWatcher, wanted: set[bytes], timeout: float
) -> tuple[dict[bytes, KeyChange], list[Resync]]:
    seen: dict[bytes, KeyChange] = {}
    resyncs: list[Resync] = []
    for event in watcher.events(timeout=timeout):
        if isinstance(event, Resync):
            resyncs.append(event)
        else:
            seen[event.key] = event
            if wanted <= seen.keys():
                break
    return seen, resyncs


def wait_listening(watcher: ClusterKeyspaceWatcher) -> Resync:
    event = next(watcher.events(timeout=30))
    assert isinstance(event, Resync)
    return event


def test_writes_on_every_primary_are_seen(rc: Any) -> None:
    prefix = f"dndtest:{uuid.uuid4().hex[:12]}:"
    per_node = keys_on_each_primary(rc, prefix)
    with ClusterKeyspaceWatcher(rc, prefix) as watcher:
        first = wait_listening(watcher)
        assert len(first.primaries) == 3
        rc.set("other:key", "not ours")  # outside the prefix: not reported
        for names in per_node.values():
            for key in names:
                rc.zadd(key, {b"m": 1})
        wanted = {k.encode() for names in per_node.values() for k in names}
        seen, _ = collect(watcher, wanted, timeout=10)
    assert set(seen) == wanted
    assert {seen[k.encode()].node for names in per_node.values() for k in names} == set(per_node)
    assert all(change.event == b"zadd" for change in seen.values())
    rc.delete(*wanted, "other:key")


def test_a_refresh_of_the_cluster_view_loses_no_change(rc: Any) -> None:
    """Changes published, then the client's view of the nodes refreshed, then read.

    A refresh (the watcher's own every REDISCOVER_EVERY_S, or the application's
    on a redirection) marks the connections of the cluster client's pools for
    reconnection: a subscription on one of them was reconnected on its next
    read, and what waited unread on the old connection was gone.
    """
    prefix = f"dndtest:{uuid.uuid4().hex[:12]}:"
    per_node = keys_on_each_primary(rc, prefix, 1)
    wanted = {k.encode() for keys in per_node.values() for k in keys}
    with ClusterKeyspaceWatcher(rc, prefix) as watcher:
        wait_listening(watcher)
        for keys in per_node.values():
            rc.zadd(keys[0], {b"m": 1})
        time.sleep(0.2)  # published: waiting on the watcher's connections
        rc.nodes_manager.initialize()
        seen, _ = collect(watcher, wanted, timeout=10)
    assert set(seen) == wanted
    rc.delete(*(k.decode() for k in wanted))


def test_after_a_failover_the_new_primary_is_heard(cluster: RedisCluster, rc: Any) -> None:
    prefix = f"dndtest:{uuid.uuid4().hex[:12]}:"
    with ClusterKeyspaceWatcher(rc, prefix) as watcher:
        wait_listening(watcher)
        old = watcher.primaries[0]
        replica = cluster.replica_of(int(old.rsplit(":", 1)[1]))
        promoted = cluster.client(replica)
        try:
            promoted.execute_command("CLUSTER", "FAILOVER")
            deadline = time.monotonic() + 30
            while promoted.execute_command("ROLE")[0] != b"master":
                assert time.monotonic() < deadline, "the replica was not promoted"
                time.sleep(0.05)
        finally:
            promoted.close()
        cluster.wait_ok()
        # Within the default rediscovery period, the watcher says the primaries changed...
        events = watcher.events(timeout=REDISCOVER_EVERY_S * 3)
        resync = next((e for e in events if isinstance(e, Resync)), None)
        assert resync is not None, "no Resync after the failover"
        assert f"127.0.0.1:{replica}" in resync.primaries
        assert old not in resync.primaries
        # ... and hears the new primary.
        rc.nodes_manager.initialize()
        key = keys_on_each_primary(rc, prefix)[f"127.0.0.1:{replica}"][0]
        rc.zadd(key, {b"m": 1})
        seen, _ = collect(watcher, {key.encode()}, timeout=10)
    assert seen[key.encode()].node == f"127.0.0.1:{replica}"
    rc.delete(key)


def test_a_killed_primary_is_followed_to_its_successor(cluster: RedisCluster, rc: Any) -> None:
    prefix = f"dndtest:{uuid.uuid4().hex[:12]}:"
    with ClusterKeyspaceWatcher(rc, prefix) as watcher:
        wait_listening(watcher)
        victim = watcher.primaries[-1]
        port = int(victim.rsplit(":", 1)[1])
        replica = cluster.replica_of(port)
        cluster.node_by_port(port).kill()
        # The dropped connection makes the watcher ask at once, until a replica took over.
        resync = next(e for e in watcher.events(timeout=60) if isinstance(e, Resync))
        assert "dropped" in resync.reason
        assert f"127.0.0.1:{replica}" in resync.primaries
        rc.nodes_manager.initialize()
        key = keys_on_each_primary(rc, prefix)[f"127.0.0.1:{replica}"][0]
        rc.zadd(key, {b"m": 1})
        seen, _ = collect(watcher, {key.encode()}, timeout=10)
    assert seen[key.encode()].node == f"127.0.0.1:{replica}"
