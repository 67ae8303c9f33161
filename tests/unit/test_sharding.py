"""worker.sharding: which shard a session goes to; worker.celery_config: its queue."""

import random
import uuid
from collections import Counter

import pytest

from worker.celery_config import (
    all_queues,
    build_config,
    consumed_queues,
    default_queue,
    producer_queues,
    route_task,
    shard_queue,
)
from worker.settings import Settings, get_settings
from worker.sharding import shard_of

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
    settings = Settings()
    assert shard_queue(settings, 0) != shard_queue(settings, 1)
    assert len({shard_queue(settings, n) for n in range(1024)}) == 1024
    assert default_queue(settings) not in {shard_queue(settings, n) for n in range(1024)}


def test_queue_names_follow_the_queue_prefix():
    # Workers are started with -Q on these names.
    assert shard_queue(Settings(), 0) == "dnd.shard.0"
    assert default_queue(Settings()) == "dnd.default"
    settings = Settings.from_env({"CELERY_QUEUE_PREFIX": "t7."})
    assert shard_queue(settings, 15) == "t7.shard.15"
    assert default_queue(settings) == "t7.default"


def test_all_queues_lists_the_default_queue_then_one_queue_per_shard_in_order():
    settings = Settings.from_env({"BACKUP_SHARDS": "4"})
    assert all_queues(settings) == [
        default_queue(settings),
        *(shard_queue(settings, n) for n in range(4)),
    ]
    assert len(set(all_queues(Settings.from_env({"BACKUP_SHARDS": "64"})))) == 65


def test_every_shard_of_a_session_has_a_queue():
    settings = Settings()
    queues = all_queues(settings)
    for session_id, _, _ in PINNED:
        assert shard_queue(settings, shard_of(session_id, settings.backup_shards)) in queues


# -- queues of producers in other languages (CELERY_PRODUCER_QUEUES) ----------------------


def test_workers_also_consume_celerys_default_queue():
    settings = Settings.from_env({"BACKUP_SHARDS": "4"})
    assert producer_queues(settings) == ["celery"]
    assert consumed_queues(settings) == [*all_queues(settings), "celery"]
    names = [queue.name for queue in build_config(settings)["task_queues"]]
    assert names == consumed_queues(settings)


def test_a_producer_queue_is_declared_as_celery_node_and_gocelery_declare_it():
    # They declare it durable, not auto-deleted, with no arguments (RabbitMQ
    # refuses a second declaration that differs), and publish to the default
    # exchange with the queue's name as routing key; Python producers use a
    # direct exchange named like the queue, as Celery's own default queue.
    [queue] = [q for q in build_config(Settings())["task_queues"] if q.name == "celery"]
    assert (queue.durable, queue.auto_delete, queue.exclusive) == (True, False, False)
    assert not queue.queue_arguments
    assert (queue.exchange.name, queue.exchange.type, queue.routing_key) == (
        "celery",
        "direct",
        "celery",
    )


def test_no_producer_queue_when_the_setting_is_empty():
    settings = Settings.from_env({"CELERY_PRODUCER_QUEUES": ""})
    assert producer_queues(settings) == []
    assert [q.name for q in build_config(settings)["task_queues"]] == all_queues(settings)


def test_a_producer_queue_that_is_one_of_ours_is_declared_once():
    settings = Settings.from_env({"CELERY_PRODUCER_QUEUES": "dnd.shard.3,celery,go"})
    assert producer_queues(settings) == ["celery", "go"]
    names = [q.name for q in build_config(settings)["task_queues"]]
    assert len(names) == len(set(names)) == len(all_queues(settings)) + 2


def test_our_own_tasks_never_go_to_a_producer_queue():
    # The CLI checks consumers of all_queues() only: what we send goes there.
    settings = get_settings()  # what route_task reads
    assert build_config(settings)["task_default_queue"] == default_queue(settings)
    session_id = PINNED[0][0]
    route = route_task("worker.tasks.backup_session", [session_id], {}, {})
    assert route == {"queue": shard_queue(settings, shard_of(session_id, settings.backup_shards))}
    assert route["queue"] in all_queues(settings)
    assert route["queue"] not in producer_queues(settings)
