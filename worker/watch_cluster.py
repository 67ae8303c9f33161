"""Keyspace notifications of a Redis Cluster: every primary's, following resharding and failover.

A Redis publishes a key's keyspace notifications (``__keyspace@0__:<key>``) on
the node that holds the key only, so a watcher of a cluster subscribes to every
primary. The set of primaries changes: a failover promotes a replica, a node is
added or removed. The watcher asks the cluster who its primaries are

- every ``rediscover_every_s`` seconds (a manual failover leaves the old
  primary up, as a replica, and its connection open: only asking tells), and
- at once when a subscription's connection drops (a primary died),

then subscribes to the new primaries and drops the old. Each subscription has a
connection pool of its own: on the cluster client's, every refresh of its view
of the nodes (ours, or the application's after a redirection) would reconnect
it, and what was published meanwhile would be lost. Slot migrations need
nothing: every primary is subscribed, and a migrated key shows as a change on
both sides (``del`` on the source, ``restore`` on the target).

Between a primary's failure and the subscription to its successor, changes can
be missed. The watcher says so: it yields a :class:`Resync` whenever it (re)starts
listening to a set of primaries it did not fully listen to before; the consumer
then sweeps (compares everything) instead of trusting the notifications alone.

Usage::

    with ClusterKeyspaceWatcher(cluster_client, "dnd:") as watcher:
        for event in watcher.events(timeout=None):
            if isinstance(event, Resync):
                sweep()
            else:
                mark_changed(event.key)

The nodes must publish keyspace events (``notify-keyspace-events`` with ``K``
and the classes of our keys, e.g. ``Kgzh`` or ``KA``), replicas too: a replica
promoted by a failover must publish as its primary did.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator
from dataclasses import dataclass
from types import TracebackType

import redis
import redis.cluster
import redis.exceptions

from worker.errors import StoreError

# How often the cluster is asked who its primaries are.
REDISCOVER_EVERY_S = 5.0
# How long to wait, idle, before polling the subscriptions again.
_IDLE_SLEEP_S = 0.01
# After a connection drops: how long to keep asking until the cluster has a
# reachable primary for each of its nodes' slots again (a failover takes
# cluster-node-timeout, 15 s by default, and then a moment).
RECOVER_WITHIN_S = 120.0


@dataclass(frozen=True, slots=True)
class KeyChange:
    """A key was written or removed (``event``: the command's event, e.g. ``zadd``, ``del``)."""

    key: bytes
    event: bytes
    node: str  # host:port of the primary that published it


@dataclass(frozen=True, slots=True)
class Resync:
    """Changes before this may have been missed: the consumer should sweep."""

    reason: str
    primaries: tuple[str, ...]


Event = KeyChange | Resync


class ClusterKeyspaceWatcher:
    def __init__(
        self,
        client: redis.cluster.RedisCluster,
        prefix: str,
        *,
        rediscover_every_s: float = REDISCOVER_EVERY_S,
    ) -> None:
        self.client = client
        # A cluster has database 0 only.
        self.channel_prefix = b"__keyspace@0__:"
        self.pattern = self.channel_prefix + _glob_escape(prefix).encode() + b"*"
        self.rediscover_every_s = rediscover_every_s
        self._subscriptions: dict[str, redis.client.PubSub] = {}
        # Each subscription's connection pool: its own, not the cluster client's.
        self._pools: dict[str, redis.ConnectionPool] = {}
        self._next_discovery = 0.0
        self._lost: str | None = None  # a primary whose connection dropped

    # -- the API -------------------------------------------------------------

    def events(self, *, timeout: float | None = None) -> Iterator[Event]:
        """Changes as they come, and a Resync whenever some may have been missed.

        Ends after ``timeout`` seconds (None: never). The first event is a
        Resync: nothing before the subscriptions was seen.
        """
        deadline = None if timeout is None else time.monotonic() + timeout
        while deadline is None or time.monotonic() < deadline:
            resync = self._maybe_rediscover()
            if resync is not None:
                yield resync
            got_any = False
            for name, pubsub in list(self._subscriptions.items()):
                try:
                    message = pubsub.get_message(ignore_subscribe_messages=True, timeout=0)
                except (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError):
                    # A primary went away: find who took over, and say so.
                    self._drop(name)
                    self._lost = name
                    self._next_discovery = 0.0
                    continue
                if message is not None and message.get("type") == "pmessage":
                    got_any = True
                    yield self._change(name, message)
            if not got_any:
                time.sleep(_IDLE_SLEEP_S)

    @property
    def primaries(self) -> tuple[str, ...]:
        """The primaries subscribed to now (host:port)."""
        return tuple(sorted(self._subscriptions))

    def close(self) -> None:
        for name in list(self._subscriptions):
            self._drop(name)

    def __enter__(self) -> ClusterKeyspaceWatcher:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    # -- following the cluster ---------------------------------------------------

    def _maybe_rediscover(self) -> Resync | None:
        if time.monotonic() < self._next_discovery:
            return None
        before = set(self._subscriptions)
        lost, self._lost = self._lost, None
        primaries = self._discover()
        for name in before - primaries:
            self._drop(name)
        added = primaries - set(self._subscriptions)
        for name in sorted(added):
            self._subscribe(name)
        self._next_discovery = time.monotonic() + self.rediscover_every_s
        if not before and lost is None:
            return Resync("started listening", self.primaries)
        if lost is not None:
            return Resync(f"the connection to primary {lost} dropped", self.primaries)
        if added:
            return Resync(f"new primaries: {', '.join(sorted(added))}", self.primaries)
        return None

    def _discover(self) -> set[str]:
        """The cluster's primaries now, asking again until all are reachable."""
        deadline = time.monotonic() + RECOVER_WITHIN_S
        while True:
            try:
                self.client.nodes_manager.initialize()
                primaries = {node.name for node in self.client.get_primaries()}  # type: ignore[no-untyped-call]
                for name in primaries:
                    self._client(name).ping()
                return primaries
            except (
                redis.exceptions.ConnectionError,
                redis.exceptions.TimeoutError,
                redis.exceptions.RedisClusterException,
                redis.exceptions.ClusterDownError,
            ) as exc:
                if time.monotonic() > deadline:
                    raise StoreError(
                        f"Redis Cluster: no reachable primary for every slot within "
                        f"{RECOVER_WITHIN_S:.0f} s ({type(exc).__name__})"
                    ) from exc
                time.sleep(0.2)

    def _client(self, name: str) -> redis.Redis:
        """The cluster client's own client of one node (a PubSub takes a connection of its own)."""
        node = self.client.get_node(node_name=name)  # type: ignore[no-untyped-call]
        if node is None or node.redis_connection is None:
            raise redis.exceptions.ConnectionError(f"node {name} is not known")
        client: redis.Redis = node.redis_connection
        return client

    def _subscribe(self, name: str) -> None:
        client = self._client(name)
        _require_notifications(client, name)
        # A pool of its own, with the node's settings (TLS, credentials): every
        # refresh of the cluster client's view of the nodes (ours at each
        # rediscovery, the application's on a redirection) marks the connections
        # of that client's pools for reconnection, and a subscription reconnected
        # loses what was published in between and what waited unread.
        shared = client.connection_pool
        pool = redis.ConnectionPool(
            connection_class=shared.connection_class, **shared.connection_kwargs
        )
        pubsub = redis.Redis(connection_pool=pool).pubsub()  # type: ignore[no-untyped-call]
        try:
            pubsub.psubscribe(self.pattern)
        except BaseException:
            pool.disconnect()
            raise
        self._pools[name] = pool
        self._subscriptions[name] = pubsub

    def _drop(self, name: str) -> None:
        pubsub = self._subscriptions.pop(name, None)
        pool = self._pools.pop(name, None)
        with contextlib.suppress(redis.exceptions.RedisError, OSError):
            if pubsub is not None:
                pubsub.close()
            if pool is not None:
                pool.disconnect()

    def _change(self, name: str, message: dict[str, object]) -> KeyChange:
        channel = message["channel"]
        data = message["data"]
        assert isinstance(channel, bytes)
        assert isinstance(data, bytes)
        return KeyChange(key=channel[len(self.channel_prefix) :], event=data, node=name)


def _require_notifications(client: redis.Redis, name: str) -> None:
    """Refuse a primary that publishes no keyspace events (when CONFIG may be read)."""
    try:
        config = client.config_get("notify-keyspace-events")
    except redis.exceptions.ResponseError:
        return  # CONFIG not allowed to us (ACL, renamed): trust the operator
    flags = next(iter(config.values()), b"")
    text = flags.decode() if isinstance(flags, bytes) else str(flags)
    if "K" not in text or not any(c in text for c in "Agzh"):
        raise StoreError(
            f"Redis Cluster node {name} publishes no keyspace events for our keys "
            f"(notify-keyspace-events is {text!r}; set it to 'KA' or 'Kgzh' on every node)"
        )


def _glob_escape(text: str) -> str:
    return "".join(f"\\{ch}" if ch in "*?[]\\" else ch for ch in text)
