"""The run layer's pure parts: the table of kinds, options, scopes, batches."""

from __future__ import annotations

import uuid

import pytest

from worker import runs
from worker.engine import Engine
from worker.models import RUN_KINDS, BackupOptions, RestoreOptions, VerifyOptions
from worker.sharding import shard_of


def test_every_kind_has_one_line_in_the_table():
    assert tuple(runs.KINDS) == RUN_KINDS
    for kind, spec in runs.KINDS.items():
        assert spec.kind == kind
        assert spec.options.kind == kind
        assert issubclass(spec.engine, Engine)


@pytest.mark.parametrize(
    ("kind", "data", "expected"),
    [
        ("backup", {"full": True}, BackupOptions(full=True)),
        ("restore", {}, RestoreOptions(force=False)),
        ("verify", None, VerifyOptions()),
    ],
)
def test_options_travel_as_json_objects(kind, data, expected):
    options = runs.options_for(kind, data)
    assert options == expected
    assert runs.options_for(kind, options.as_dict()) == options


def test_only_a_forced_restore_is_forced():
    assert RestoreOptions(force=True).forced
    assert not RestoreOptions().forced
    assert not BackupOptions(full=True).forced
    assert not VerifyOptions(quick=True).forced


def test_unknown_options_are_refused():
    with pytest.raises(TypeError):
        runs.options_for("backup", {"force": True})


def test_scope_of():
    assert runs.scope_of(None) == "all"
    assert runs.scope_of(["a"]) == "session"
    assert runs.scope_of(["a", "b"]) == "list"


def test_batches_group_sessions_by_shard_in_order_and_respect_the_size():
    ids = sorted(str(uuid.UUID(int=n * 7919 + 1)) for n in range(100))
    batches = runs.cut_batches(ids, 4, 10)
    assert sorted(sid for b in batches for sid in b.session_ids) == ids
    assert all(1 <= len(b.session_ids) <= 10 for b in batches)
    assert [b.shard for b in batches] == sorted(b.shard for b in batches)
    for batch in batches:
        assert {shard_of(sid, 4) for sid in batch.session_ids} == {batch.shard}
        assert batch.session_ids == sorted(batch.session_ids)


def test_one_shard_keeps_the_given_order():
    ids = [str(uuid.UUID(int=n)) for n in range(5)]
    assert [b.session_ids for b in runs.cut_batches(ids, 1, 2)] == [ids[:2], ids[2:4], ids[4:]]


def test_no_sessions_no_batches():
    assert runs.cut_batches([], 8, 200) == []


def _ids(n):
    return sorted(str(uuid.UUID(int=k * 104_729 + 3)) for k in range(n))


def test_a_run_under_the_cap_keeps_the_batch_size():
    ids = _ids(1000)
    assert runs.cut_batches(ids, 4, 10, 1000) == runs.cut_batches(ids, 4, 10)


@pytest.mark.parametrize(("sessions", "shards", "size", "cap"), [
    (10_000, 8, 20, 64), (10_000, 8, 200, 8), (5_001, 3, 7, 100), (999, 1, 1, 10),
])  # fmt: skip
def test_a_big_run_gets_bigger_batches_and_at_most_the_cap(sessions, shards, size, cap):
    ids = _ids(sessions)
    batches = runs.cut_batches(ids, shards, size, cap)
    assert len(batches) <= cap
    assert sorted(sid for b in batches for sid in b.session_ids) == ids
    for batch in batches:
        assert {shard_of(sid, shards) for sid in batch.session_ids} == {batch.shard}
    grown = max(len(b.session_ids) for b in batches)
    assert grown > size
    # The smallest size that fits: one session less per batch would need more batches.
    smaller = runs.cut_batches(ids, shards, grown - 1)
    assert len(smaller) > cap


def test_more_shards_than_the_cap_makes_one_batch_per_shard():
    ids = _ids(500)
    batches = runs.cut_batches(ids, 16, 5, 4)
    assert len(batches) == len({shard_of(sid, 16) for sid in ids})
    assert sorted(sid for b in batches for sid in b.session_ids) == ids


def test_a_million_sessions_cut_to_256_batches():
    per_shard = [125_000] * 8
    size = runs.batch_size_within(per_shard, 200, 256)
    assert size == 3907  # 8 x ceil(125,000 / 3907) = 8 x 32 = 256; 3906 would make 8 x 33
    assert sum(-(-n // size) for n in per_shard) == 256
