"""The watcher notices a subscription that redis-py re-established by itself.

A client that retries (a Sentinel client does: worker/connections.py) reconnects a
PubSub and subscribes it again with no error reaching the caller; the notifications
published meanwhile are lost, and the Redis it now speaks to may not publish any (a
restart, a promoted replica: notify-keyspace-events is not replicated). The watcher
starts again when its ReconnectFlag is set (worker/watch.py).
"""

from __future__ import annotations

import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from tests.servers import RedisServer
from worker.watch import ReconnectFlag


def test_a_silent_resubscription_sets_the_flag(own_redis: RedisServer) -> None:
    client = redis.Redis.from_url(own_redis.url(), protocol=2, retry=Retry(NoBackoff(), 3))
    client.config_set("notify-keyspace-events", "Kz")
    pubsub = client.pubsub(ignore_subscribe_messages=True)
    pubsub.psubscribe("__keyspace@0__:*")
    flag = ReconnectFlag.on(pubsub)
    pubsub.get_message(timeout=0.1)
    assert not flag.is_set()

    client.zadd("before", {"m": 1})
    assert _next_event(pubsub) == b"zadd"
    assert not flag.is_set()

    assert client.client_kill_filter(_type="pubsub") == 1
    client.zadd("after", {"m": 1})
    # redis-py reconnects and subscribes again without an error: only the flag tells.
    for _ in range(5):
        pubsub.get_message(timeout=0.1)
    assert flag.is_set()
    client.zadd("later", {"m": 1})
    assert _next_event(pubsub) == b"zadd"  # listening again, "after" lost
    pubsub.close()
    client.close()


def test_no_flag_without_a_subscription() -> None:
    assert not ReconnectFlag.on(None).is_set()


def _next_event(pubsub: redis.client.PubSub) -> bytes | None:
    for _ in range(20):
        message = pubsub.get_message(timeout=0.1)
        if message is not None:
            data = message["data"]
            return data if isinstance(data, bytes) else None
    return None
