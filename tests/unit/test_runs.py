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
