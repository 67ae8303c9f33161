"""The backup planner (worker/backup_plan.py): what a backup does with one session.

Pure logic: a probe of Redis and the last watermark in, a plan out. Every branch
of the decision is here; the integration tests show the same decisions against
real servers.
"""

from __future__ import annotations

import pytest

from tests.factories import new_id, session_fields
from worker.backup_plan import MessagePlan, SessionPlan, plan_session
from worker.keys import RedisKeys
from worker.models import Watermark
from worker.records import hash_digest
from worker.redis_store import Probe

KEYS = RedisKeys("dnd:")


def hash_of(sid: str, **overrides: str | None) -> dict[bytes, bytes]:
    return {k.encode(): v.encode() for k, v in session_fields(sid, **overrides).items()}


def probe(
    sid: str,
    fields: dict[bytes, bytes] | None = None,
    *,
    listed: bool = True,
    count: int = 0,
    to_mark: int | None = None,
    error: str | None = None,
) -> Probe:
    return Probe(sid, fields if fields is not None else hash_of(sid), listed, count, to_mark, error)


def mark(sid: str, fields: dict[bytes, bytes] | None, count: int, top: float | None) -> Watermark:
    return Watermark(sid, None if fields is None else hash_digest(fields), count, top)


def plan(p: Probe, m: Watermark | None = None, **flags: bool) -> SessionPlan:
    return plan_session(p, m, KEYS, **flags)


def test_a_new_session_is_copied_whole() -> None:
    sid = new_id()
    result = plan(probe(sid, count=3))
    assert result.messages is MessagePlan.NEW
    assert result.session is not None
    assert result.session.id == sid
    assert result.digest == hash_digest(hash_of(sid))
    assert result.kept == ()
    assert result.failed is None
    assert not result.skipped
    assert result.row_stored


def test_a_new_session_goes_through_the_merge_when_the_fast_path_failed() -> None:
    sid = new_id()
    assert plan(probe(sid, count=3), safe=True).messages is MessagePlan.MERGE


def test_nothing_changed_reads_nothing_and_writes_no_row() -> None:
    sid = new_id()
    fields = hash_of(sid)
    result = plan(probe(sid, fields, count=5, to_mark=5), mark(sid, fields, 5, 1000.0))
    assert result.messages is MessagePlan.NONE
    assert result.session is None
    assert result.digest == hash_digest(fields)


def test_a_changed_hash_alone_rewrites_the_row_and_reads_no_message() -> None:
    sid = new_id()
    old = hash_of(sid)
    new = hash_of(sid, name="Renamed")
    result = plan(probe(sid, new, count=5, to_mark=5), mark(sid, old, 5, 1000.0))
    assert result.messages is MessagePlan.NONE
    assert result.session is not None
    assert result.session.name == "Renamed"
    assert result.digest == hash_digest(new)


def test_messages_newer_than_the_watermark_are_appended_above_its_score() -> None:
    sid = new_id()
    fields = hash_of(sid)
    result = plan(probe(sid, fields, count=8, to_mark=5), mark(sid, fields, 5, 1000.0))
    assert result.messages is MessagePlan.APPEND
    assert result.after_score == 1000.0
    assert result.session is None  # the hash did not change


def test_appends_go_through_the_merge_when_the_fast_path_failed() -> None:
    sid = new_id()
    fields = hash_of(sid)
    result = plan(probe(sid, fields, count=8, to_mark=5), mark(sid, fields, 5, 1000.0), safe=True)
    assert result.messages is MessagePlan.MERGE
    assert result.after_score is None


@pytest.mark.parametrize(
    ("count", "to_mark"),
    [
        (6, 6),  # a late message with an old timestamp (at or below the watermark)
        (4, 4),  # a message at or below the watermark was removed
        (9, 6),  # both: late old message and new ones
    ],
)
def test_a_change_at_or_below_the_watermark_rescans_everything(count: int, to_mark: int) -> None:
    sid = new_id()
    fields = hash_of(sid)
    result = plan(probe(sid, fields, count=count, to_mark=to_mark), mark(sid, fields, 5, 1000.0))
    assert result.messages is MessagePlan.MERGE


def test_full_rescans_and_rewrites_even_when_nothing_changed() -> None:
    sid = new_id()
    fields = hash_of(sid)
    result = plan(probe(sid, fields, count=5, to_mark=5), mark(sid, fields, 5, 1000.0), full=True)
    assert result.messages is MessagePlan.MERGE
    assert result.session is not None


def test_a_watermark_without_messages_counts_zero_to_its_score() -> None:
    # A session backed up before it had messages: max_score is None, the probe
    # answers 0 for "members up to the watermark".
    sid = new_id()
    fields = hash_of(sid)
    result = plan(probe(sid, fields, count=2, to_mark=0), mark(sid, fields, 0, None))
    assert result.messages is MessagePlan.APPEND
    assert result.after_score is None


def test_an_unreadable_session_fails_with_the_reason() -> None:
    sid = new_id()
    result = plan(probe(sid, {}, listed=False, error="WRONGTYPE Operation"))
    assert result.failed == f"cannot read session {sid} from Redis: WRONGTYPE Operation"
    assert result.messages is MessagePlan.NONE


def test_a_session_gone_from_redis_is_skipped_in_a_run_over_all() -> None:
    sid = new_id()
    result = plan(probe(sid, {}, listed=False))
    assert result.skipped
    assert result.failed is None
    assert result.notes == ("removed from Redis since the run listed it",)


def test_a_session_asked_for_by_name_that_is_not_in_redis_fails() -> None:
    sid = new_id()
    result = plan(probe(sid, {}, listed=False), explicit=True)
    assert result.failed == f"session {sid} not found in Redis"
    assert not result.skipped


@pytest.mark.parametrize(
    ("listed", "count", "reason"),
    [
        (True, 0, "listed in the sessions set but has no session hash"),
        (False, 4, "has 4 messages but no session hash"),
    ],
)
def test_a_session_without_a_hash_is_kept_aside(listed: bool, count: int, reason: str) -> None:
    sid = new_id()
    result = plan(probe(sid, {}, listed=listed, count=count))
    [kept] = result.kept
    assert (kept.kind, kept.reason, kept.raw, kept.redis_key) == (
        "session_id",
        reason,
        sid.encode(),
        KEYS.session(sid),
    )
    # Never stored: its messages wait for a hash that can be.
    assert not result.row_stored
    assert result.messages is MessagePlan.NONE
    if count:
        assert result.notes == (
            f"its {count} messages are not backed up until the session hash can be stored",
        )


def test_a_hash_gone_from_a_stored_session_keeps_backing_up_its_messages() -> None:
    sid = new_id()
    old = hash_of(sid)
    result = plan(probe(sid, {}, listed=True, count=7, to_mark=5), mark(sid, old, 5, 1000.0))
    assert [k.reason for k in result.kept] == ["listed in the sessions set but has no session hash"]
    assert result.messages is MessagePlan.APPEND
    assert result.digest == hash_digest(old)  # remembered as it was


def test_a_bad_hash_is_kept_aside_and_the_stored_row_is_left_alone() -> None:
    sid = new_id()
    old = hash_of(sid)
    bad = hash_of(sid, created_at="yesterday")
    result = plan(probe(sid, bad, count=5, to_mark=5), mark(sid, old, 5, 1000.0))
    [kept] = result.kept
    assert kept.kind == "session"
    assert "created_at" in kept.reason
    assert result.session is None
    assert result.digest == hash_digest(old)


def test_a_bad_hash_of_a_new_session_stores_nothing() -> None:
    sid = new_id()
    result = plan(probe(sid, hash_of(sid, name=None), count=3))
    assert [k.kind for k in result.kept] == ["session"]
    assert not result.row_stored
    assert result.messages is MessagePlan.NONE
    assert result.notes == (
        "its 3 messages are not backed up until the session hash can be stored",
    )


def test_a_hash_with_unknown_fields_is_stored_and_kept_aside() -> None:
    sid = new_id()
    result = plan(probe(sid, hash_of(sid, colour="blue"), count=1))
    assert result.session is not None
    [kept] = result.kept
    assert "colour" in kept.reason
    assert result.messages is MessagePlan.NEW


def test_copies_is_true_only_for_the_fast_paths() -> None:
    assert [p for p in MessagePlan if p.copies] == [MessagePlan.NEW, MessagePlan.APPEND]
