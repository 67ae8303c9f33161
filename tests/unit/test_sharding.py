"""worker.sharding: which shard and queue a session goes to."""

import random
import uuid
from collections import Counter

import pytest

from worker.sharding import all_queues, queue_name, shard_of

# Computed once from the current algorithm. A change of algorithm would send
# sessions to other shards than running workers and earlier runs expect.
PINNED = [
    ("123e4567-e89b-12d3-a456-426614174000", 8, 0),
    ("123e4567-e89b-12d3-a456-426614174000", 1024, 496),
    ("00000000-0000-0000-0000-000000000000", 8, 5),
    ("00000000-0000-0000-0000-000000000000", 2, 1),
    ("00000000-0000-0000-0000-000000000000", 1024, 853),
    ("ffffffff-ffff-ffff-ffff-ffffffffffff", 8, 2),
    ("ffffffff-ffff-ffff-ffff-ffffffffffff", 16, 10),
    ("6ba7b810-9dad-11d1-80b4-00c04fd430c8", 8, 7),
    ("6ba7b810-9dad-11d1-80b4-00c04fd430c8", 16, 15),
    ("6ba7b810-9dad-11d1-80b4-00c04fd430c8", 1024, 959),
]


@pytest.mark.parametrize(("session_id", "shards", "shard"), PINNED)
def test_shard_of_is_stable_across_versions(session_id, shards, shard):
    assert shard_of(session_id, shards) == shard


def test_shard_of_is_a_pure_function_of_the_id():
    rng = random.Random(7)
    ids = [str(uuid.UUID(int=rng.getrandbits(128), version=4)) for _ in range(200)]
    assert [shard_of(s, 8) for s in ids] == [shard_of(s, 8) for s in list(ids)]


def test_shard_of_with_one_shard_is_always_zero():
    rng = random.Random(1)
    for _ in range(100):
        assert shard_of(str(uuid.UUID(int=rng.getrandbits(128), version=4)), 1) == 0


@pytest.mark.parametrize("shards", [1, 2, 3, 7, 8, 64, 1024])
def test_shard_of_is_in_range(shards):
    rng = random.Random(shards)
    for _ in range(500):
        shard = shard_of(str(uuid.UUID(int=rng.getrandbits(128), version=4)), shards)
        assert 0 <= shard < shards


def test_shard_of_spreads_sessions_evenly():
    rng = random.Random(2026)
    counts = Counter(
        shard_of(str(uuid.UUID(int=rng.getrandbits(128), version=4)), 8) for _ in range(10_000)
    )
    assert sorted(counts) == list(range(8))
    # 1,250 expected per shard; the standard deviation is about 33.
    assert all(1_100 <= count <= 1_400 for count in counts.values()), counts


def test_shard_of_spreads_sequential_looking_ids_too():
    # IDs that differ only in their last bytes must not all land on one shard.
    ids = [f"00000000-0000-0000-0000-{n:012x}" for n in range(800)]
    counts = Counter(shard_of(s, 8) for s in ids)
    assert len(counts) == 8
    assert max(counts.values()) < 200


@pytest.mark.parametrize("shards", [0, -1])
def test_shard_of_rejects_fewer_than_one_shard(shards):
    with pytest.raises(ValueError, match="at least 1"):
        shard_of("123e4567-e89b-12d3-a456-426614174000", shards)


def test_shard_of_rejects_an_id_that_is_not_a_uuid():
    with pytest.raises(ValueError):  # noqa: PT011 - uuid.UUID's own message
        shard_of("not-a-uuid", 8)


def test_queue_names_are_distinct_per_shard():
    assert queue_name(0) != queue_name(1)
    assert queue_name(3) == queue_name(3)
    assert len({queue_name(n) for n in range(1024)}) == 1024


def test_queue_name_is_the_documented_shard_queue():
    # Workers are started with -Q on these names.
    assert queue_name(0) == "dnd.shard.0"
    assert queue_name(15) == "dnd.shard.15"


def test_all_queues_lists_one_queue_per_shard_in_order():
    assert all_queues(4) == [queue_name(0), queue_name(1), queue_name(2), queue_name(3)]
    assert len(set(all_queues(64))) == 64
    assert all_queues(1) == [queue_name(0)]


def test_every_shard_of_a_session_has_a_queue():
    queues = all_queues(8)
    for session_id, _, _ in PINNED:
        assert queue_name(shard_of(session_id, 8)) in queues
