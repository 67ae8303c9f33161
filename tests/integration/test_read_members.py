"""RedisStore.read_members: read_messages' pages without the scores, on a real Redis."""

from __future__ import annotations

from typing import Any

import pytest

from worker.redis_store import RedisStore

SID = "00000000-0000-4000-8000-000000000001"


def _fill(redis_client: Any, key: str) -> None:
    """35 members in groups of equal scores (1 to 5 members), so pages end inside groups."""
    members: dict[bytes, float] = {}
    sizes = [1, 4, 2, 3, 1, 5, 2, 1, 3, 4, 2, 1, 5, 1]  # 35 members in all
    n = 0
    for group, size in enumerate(sizes):
        for _ in range(size):
            members[f"member-{n:03d}".encode()] = 1_000.0 + group
            n += 1
    redis_client.zadd(key, members)


def _pages_with_scores(store: RedisStore, chunk: int) -> list[list[bytes]]:
    return [[member for member, _ in page] for page in store.read_messages(SID, None, chunk)]


@pytest.mark.parametrize("chunk", [1, 2, 3, 5, 10, 35, 36, 100])
def test_the_same_pages_as_read_messages(services, redis_client, keys, chunk):
    _fill(redis_client, keys.messages(SID))
    store = services.redis

    pages = list(store.read_members(SID, chunk))

    assert pages == _pages_with_scores(store, chunk)
    flat = [member for page in pages for member in page]
    assert flat == redis_client.zrange(keys.messages(SID), 0, -1)  # each once, in order


def test_a_session_without_messages_has_no_pages(services):
    assert list(services.redis.read_members(SID, 10)) == []


def test_a_change_between_the_two_reads_falls_back_to_scores(
    services, redis_client, keys, monkeypatch
):
    """The page's last member and the one asked for with its score differ: read again."""
    key = keys.messages(SID)
    _fill(redis_client, key)
    store = services.redis
    expected = _pages_with_scores(store, 10)
    real = RedisStore._members_from
    calls = []

    def changed_once(self, key, low, chunk, last):
        group, page, tail = real(self, key, low, chunk, last)
        calls.append(low)
        if len(calls) == 2:  # as if a member had been removed between the two commands
            tail = [(b"member-999", tail[0][1])]
        return group, page, tail

    monkeypatch.setattr(RedisStore, "_members_from", changed_once)
    pages = list(store.read_members(SID, 10))

    assert pages == expected
    assert len(calls) == 2  # the rest was read by read_messages' path
