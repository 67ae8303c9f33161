"""The watcher: finds sessions changed in Redis and has them backed up within seconds.

It runs as a thread in the main process of every worker (`celery -A worker
worker`), started when the worker is ready (worker/celery.py), so after the
prefork pool forked. One is active per deployment: the one holding an
advisory lock in PostgreSQL on a connection of its own; the others try again
every ELECTION_RETRY_S, so when the active one's worker dies (its connection
and lock go with it) another takes over within seconds.

The active watcher finds changes two ways:

- **keyspace notifications** (``psubscribe __keyspace@<db>__:<prefix>session:*``):
  the accelerator. If ``notify-keyspace-events`` lacks what it needs it says so
  once in the log and sets it with CONFIG SET when allowed
  (CONTINUOUS_SET_NOTIFICATIONS), else says once that it relies on the sweep.
  Notifications are fire-and-forget: lost while disconnected, gone with a
  Redis restart, refused on a managed Redis;
- **the sweep**, which does not rely on them: every CONTINUOUS_SWEEP_INTERVAL
  (and at once after becoming active or reconnecting), every session of the
  sessions set is compared with its watermark (hash digest, ZCARD, top score;
  pipelined, a page at a time, between notifications). A change no
  notification told of is found by the next sweep: its lag is at most the
  sweep interval plus a sweep plus a drain.

Changed sessions are written to continuous_pending (one row per session,
keeping the oldest change: the coalescing), then one drain task per shard is
queued at a time (a marker in Redis, cleared by the drain when it starts).
Changes whose writing failed are kept and written on the next try.

Heartbeat: the active watcher writes continuous_watcher.heartbeat_at every
HEARTBEAT_INTERVAL_S (2 s); older than STALE_AFTER_S (10 s) means no watcher
is active.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime
from typing import Any

import redis as redis_lib
from redis.cluster import RedisCluster

from worker.celery_config import CONTINUOUS_DRAIN_TASK, shard_queue
from worker.connections import connect_postgres
from worker.continuous import repeat_pause_s
from worker.errors import InvalidArgument, StoreError
from worker.models import Watermark
from worker.pg_store import PostgresStore
from worker.records import hash_digest, parse_session_id
from worker.redis_store import RedisStore, SweepProbe
from worker.services import redis_store
from worker.settings import Settings
from worker.sharding import shard_of
from worker.watch_cluster import ClusterKeyspaceWatcher, Resync

log = logging.getLogger(__name__)

HEARTBEAT_INTERVAL_S = 2.0
STALE_AFTER_S = 10.0
# A watcher that is not active tries to become it this often.
ELECTION_RETRY_S = 2.0
# Changes are written and drains queued this often.
FLUSH_INTERVAL_S = 0.25
# Sessions compared per sweep step.
SWEEP_PAGE = 500
# A queued drain's marker expires after this long if the drain never starts
# (its worker died with it reserved): then another is queued.
DRAIN_MARKER_TTL_S = 10
# Restart back-off after an error (a server down), doubling, capped.
RESTART_BACKOFF_MAX_S = 2.0
# The key of the advisory lock that elects the active watcher.
WATCHER_LOCK = "continuous-watcher"
# Keyspace events needed: K (keyspace channel), z (zset commands), h (hash
# commands); A stands for every class of event.
NEEDED_FLAGS = "Kzh"


# -- pure pieces ----------------------------------------------------------------------


def flags_to_set(current: str) -> str | None:
    """The notify-keyspace-events value to set, or None when ``current`` is enough."""
    have = set(current)
    missing = [c for c in NEEDED_FLAGS if c not in have and not (c in "zh" and "A" in have)]
    if not missing:
        return None
    return current + "".join(missing)


def session_of_channel(channel: bytes | str, channel_prefix: str) -> str | None:
    """The session ID a keyspace notification's channel names (None: not one of ours).

    ``channel_prefix``: ``__keyspace@<db>__:<key prefix>session:``; what follows
    is the session ID, or the ID and ``:messages``.
    """
    name = channel.decode("utf-8", "replace") if isinstance(channel, bytes) else channel
    if not name.startswith(channel_prefix):
        return None
    rest = name[len(channel_prefix) :]
    if rest.endswith(":messages"):
        rest = rest[: -len(":messages")]
    try:
        return parse_session_id(rest)
    except InvalidArgument:
        return None


def sweep_finds_change(probe: SweepProbe, mark: Watermark | None) -> bool:
    """Whether a session differs from what its last backup saw."""
    if mark is None:
        # Never backed up: worth a backup once it has a hash (without one it
        # cannot be stored, and a backup would only keep it aside again).
        return bool(probe.fields)
    if probe.fields and hash_digest(probe.fields) != mark.hash_digest:
        return True
    if probe.message_count != mark.message_count:
        return True
    return probe.message_count > 0 and probe.top_score != mark.max_score


def next_sweep_at(started: float, finished: float, interval: float) -> float:
    """When the next sweep starts: an interval after the last one started, never before it ended.

    So a change no notification told of waits at most ``interval`` plus one
    sweep's duration to be found (the README's bound adds a drain).
    """
    return max(started + interval, finished)


class Sweep:
    """One pass over the sessions set, a page at a time."""

    def __init__(self) -> None:
        self.started = time.monotonic()
        self.cursor = 0
        self.sessions = 0
        self.done = False

    def step(self, redis: RedisStore, pg: PostgresStore) -> list[str]:
        """Compare one page; the IDs of the sessions found changed."""
        self.cursor, members = redis.session_members_page(self.cursor, SWEEP_PAGE)
        self.done = self.cursor == 0
        ids = sorted({sid for sid in (_member_id(m) for m in members) if sid})
        if not ids:
            return []
        self.sessions += len(ids)
        marks = pg.watermarks(ids)
        return [
            p.session_id
            for p in redis.sweep_probe(ids)
            if sweep_finds_change(p, marks.get(p.session_id))
        ]


def _member_id(member: bytes) -> str | None:
    try:
        return parse_session_id(member.decode("utf-8", "replace"))
    except InvalidArgument:
        return None


# -- the watcher ----------------------------------------------------------------------


class Watcher:
    def __init__(self, settings: Settings, app: Any, node: str) -> None:
        self.settings = settings
        self.app = app
        self.node = node
        self.stopping = threading.Event()
        # Changes seen and not yet written: session ID -> (shard, first seen).
        # Kept across restarts of the loop: a failed write is tried again.
        self.changes: dict[str, tuple[int, datetime]] = {}
        self.notifications = "off"
        self._logged: set[str] = set()
        self._thread: threading.Thread | None = None

    # -- life -------------------------------------------------------------------

    def start(self) -> None:
        self._thread = threading.Thread(target=self.run, name="dnd-watcher", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 5) -> None:
        self.stopping.set()
        if self._thread is not None:
            self._thread.join(timeout)

    def run(self) -> None:
        """Try to become the active watcher; watch while it is; start again after an error."""
        backoff = 0.1
        while not self.stopping.is_set():
            try:
                with self._elected() as pg:
                    if pg is None:
                        self.stopping.wait(ELECTION_RETRY_S)
                        continue
                    log.info("continuous backup: this worker's watcher is the active one")
                    backoff = 0.1
                    self._watch(pg)
            except Exception as exc:  # noqa: BLE001 - a watcher must never die
                log.warning("continuous backup watcher: %s (starting again)", exc)
                self.stopping.wait(backoff)
                backoff = min(RESTART_BACKOFF_MAX_S, backoff * 2)

    @contextlib.contextmanager
    def _elected(self) -> Iterator[PostgresStore | None]:
        conn = connect_postgres(self.settings)
        try:
            pg = PostgresStore(conn, self.settings)
            yield pg if pg.try_owner_lock(WATCHER_LOCK) else None
        finally:
            with contextlib.suppress(Exception):
                conn.close()  # and the lock with it

    # -- the active watcher -------------------------------------------------------

    def _watch(self, pg: PostgresStore) -> None:
        redis = redis_store(self.settings)
        pubsub = None
        try:
            # Markers of drains queued before (by a watcher now gone, or restored
            # with a Redis restarted from its dump whose drains then failed)
            # would hold this shard's next drain back until they expire: forget
            # them. A drain queued twice finds nothing to claim and ends.
            redis.drop_markers(
                [redis.keys.drain_queued(n) for n in range(self.settings.backup_shards)]
            )
            pubsub = self._subscribe(redis)
            reconnected = ReconnectFlag.on(pubsub)
            started_at = datetime.now(UTC)
            channel_prefix = f"__keyspace@{_db_of(redis)}__:{redis.keys.session('')}"
            sweep: Sweep | None = Sweep()  # at once: what happened while no one watched
            next_sweep = 0.0
            next_flush = next_beat = 0.0
            while not self.stopping.is_set():
                self._listen(pubsub, channel_prefix, 0.005 if sweep else 0.1)
                if reconnected.is_set():
                    # Subscribed again by redis-py, silently: what was published
                    # meanwhile is lost, and a restarted Redis has forgotten
                    # notify-keyspace-events. Start again: check it, sweep at once.
                    raise StoreError("the subscription to keyspace notifications was lost")
                if isinstance(pubsub, ClusterSubscription) and pubsub.resync:
                    # A primary lost or the primaries changed: what it published
                    # meanwhile is lost, so sweep now rather than at the next turn.
                    pubsub.resync = False
                    next_sweep = 0.0
                now = time.monotonic()
                if now >= next_beat:
                    pg.watcher_heartbeat(self.node, started_at, self.notifications)
                    next_beat = now + HEARTBEAT_INTERVAL_S
                if sweep is None and now >= next_sweep:
                    sweep = Sweep()
                if sweep is not None:
                    self._note(sweep.step(redis, pg))
                    if sweep.done:
                        seconds = time.monotonic() - sweep.started
                        pg.watcher_swept(self.node, sweep.sessions, seconds)
                        next_sweep = next_sweep_at(
                            sweep.started,
                            time.monotonic(),
                            self.settings.continuous_sweep_interval_s,
                        )
                        sweep = None
                if now >= next_flush:
                    self._flush(pg, redis)
                    next_flush = now + FLUSH_INTERVAL_S
        finally:
            if pubsub is not None:
                with contextlib.suppress(Exception):
                    pubsub.close()
            redis.client.close()

    def _subscribe(self, redis: RedisStore) -> Any:
        """Keyspace notifications, if they are (or can be) on; None: the sweep alone."""
        if isinstance(redis.client, RedisCluster):
            return self._subscribe_cluster(redis, redis.client)
        current = redis.notify_flags()
        if current is None:
            self._once(
                "config-refused",
                "continuous backup: cannot read notify-keyspace-events (CONFIG is refused); "
                "subscribing anyway, and sweeping every %d s for what notifications miss",
            )
            self.notifications = "off"
            return redis.subscribe_sessions()
        wanted = flags_to_set(current)
        if wanted is None:
            self.notifications = "on"
            return redis.subscribe_sessions()
        if self.settings.continuous_set_notifications and redis.set_notify_flags(wanted):
            self._once(
                f"set:{current}",
                f"continuous backup: notify-keyspace-events was {current!r}; set it to "
                f"{wanted!r} (CONFIG SET; CONTINUOUS_SET_NOTIFICATIONS=0 forbids it)",
            )
            self.notifications = "enabled"
            return redis.subscribe_sessions()
        self._once(
            f"off:{current}",
            f"continuous backup: notify-keyspace-events is {current!r} (it needs "
            f"{NEEDED_FLAGS!r}) and was not changed; relying on the sweep every %d s",
        )
        self.notifications = "off"
        return None

    def _subscribe_cluster(self, redis: RedisStore, client: RedisCluster) -> Any:
        """Every primary's notifications (a cluster publishes them per node)."""
        if self.settings.continuous_set_notifications:
            # Replicas too: one may be promoted.
            for node in client.get_nodes():  # type: ignore[no-untyped-call]
                node_client = node.redis_connection
                if node_client is None:
                    continue
                with contextlib.suppress(redis_lib.exceptions.RedisError):
                    reply = node_client.config_get("notify-keyspace-events")
                    current = str(next(iter(reply.values()), ""))
                    wanted = flags_to_set(current)
                    if wanted is not None:
                        node_client.config_set("notify-keyspace-events", wanted)
                        self._once(
                            f"set:{node.name}",
                            f"continuous backup: notify-keyspace-events of {node.name} was "
                            f"{current!r}; set it to {wanted!r} (CONFIG SET; "
                            "CONTINUOUS_SET_NOTIFICATIONS=0 forbids it)",
                        )
        try:
            subscription = ClusterSubscription(
                ClusterKeyspaceWatcher(client, redis.keys.session(""))
            )
            subscription.get_message(timeout=0)  # subscribes to every primary, or raises
        except StoreError as exc:
            self._once(
                "cluster-off",
                f"continuous backup: {exc}; relying on the sweep every %d s",
            )
            self.notifications = "off"
            return None
        self.notifications = "on"
        return subscription

    def _once(self, key: str, message: str) -> None:
        if key not in self._logged:
            self._logged.add(key)
            text = message.replace("%d", str(self.settings.continuous_sweep_interval_s))
            log.warning("%s", text)

    def _listen(self, pubsub: Any, channel_prefix: str, wait_s: float) -> None:
        if pubsub is None:
            self.stopping.wait(wait_s)
            return
        deadline = time.monotonic() + wait_s
        found: list[str] = []
        while True:
            left = deadline - time.monotonic()
            message = pubsub.get_message(timeout=max(left, 0.0))
            if message is None:
                if left <= 0:
                    break
                continue
            if message.get("type") == "pmessage":
                sid = session_of_channel(message["channel"], channel_prefix)
                if sid is not None:
                    found.append(sid)
            if len(found) >= 10_000:
                break
        self._note(found)

    def _note(self, session_ids: list[str]) -> None:
        if not session_ids:
            return
        now = datetime.now(UTC)
        shards = self.settings.backup_shards
        for sid in session_ids:
            if sid not in self.changes:
                self.changes[sid] = (shard_of(sid, shards), now)

    def _flush(self, pg: PostgresStore, redis: RedisStore) -> None:
        """Write the changes seen (kept if that fails), then queue the drains needed."""
        if self.changes:
            pending = dict(self.changes)
            pg.mark_pending(pending, repeat_pause_s(self.settings))
            for sid in pending:
                if self.changes.get(sid) == pending[sid]:
                    del self.changes[sid]
        for shard in pg.drainable_shards():
            self._queue_drain(redis, shard)

    def _queue_drain(self, redis: RedisStore, shard: int) -> None:
        """One drain queued per shard at a time (the drain clears the marker as it starts)."""
        task_id = str(uuid.uuid4())
        if redis.put_marker(redis.keys.drain_queued(shard), task_id, DRAIN_MARKER_TTL_S) is None:
            self.app.send_task(
                CONTINUOUS_DRAIN_TASK,
                args=(shard,),
                task_id=task_id,
                queue=shard_queue(self.settings, shard),
            )


class ReconnectFlag:
    """Set when a subscription's connection is made again after the first time.

    redis-py's PubSub reconnects and subscribes again by itself when its
    connection drops (a Redis restarted, a network cut, an output buffer limit
    reached): no error reaches the watcher, which would go on listening to a
    Redis that may no longer publish anything (a restart resets
    notify-keyspace-events unless it is in redis.conf), finding changes only
    by the sweep. The watcher starts again when this is set.
    """

    def __init__(self) -> None:
        self._event = threading.Event()

    @classmethod
    def on(cls, pubsub: Any) -> ReconnectFlag:
        """A flag for ``pubsub``'s connection (none for a cluster's: it has resync)."""
        flag = cls()
        connection = getattr(pubsub, "connection", None)
        if connection is not None:
            # Kept as a weak reference by redis-py: the watcher holds the flag.
            connection.register_connect_callback(flag.connected)
        return flag

    def connected(self, _connection: Any) -> None:
        self._event.set()

    def is_set(self) -> bool:
        return self._event.is_set()


def _db_of(redis: RedisStore) -> int:
    if isinstance(redis.client, RedisCluster):
        return 0  # a cluster has database 0 only
    return int(redis.client.connection_pool.connection_kwargs.get("db", 0) or 0)


class ClusterSubscription:
    """A Redis Cluster's keyspace notifications, read like one PubSub (see Watcher._listen).

    worker/watch_cluster.py subscribes to every primary and follows failovers
    and resharding; when changes may have been missed (a primary lost, the
    primaries changed) it says so, and ``resync`` asks the watcher to sweep.
    """

    def __init__(self, watcher: ClusterKeyspaceWatcher) -> None:
        self.watcher = watcher
        self.resync = False

    def get_message(self, timeout: float) -> dict[str, Any] | None:
        for event in self.watcher.events(timeout=timeout):
            if isinstance(event, Resync):
                self.resync = True
                continue
            return {"type": "pmessage", "channel": b"__keyspace@0__:" + event.key}
        return None

    def close(self) -> None:
        self.watcher.close()


_watcher: Watcher | None = None


def start(settings: Settings, app: Any, node: str) -> None:
    """Start this process's watcher (once), unless CONTINUOUS_BACKUP is off."""
    global _watcher
    if not settings.continuous_backup or _watcher is not None:
        return
    _watcher = Watcher(settings, app, node)
    _watcher.start()


def stop() -> None:
    global _watcher
    if _watcher is not None:
        _watcher.stop()
        _watcher = None
