"""What a backup does with one session: decided from a probe of Redis and a watermark.

Pure logic, no I/O. The probe (worker.redis_store.Probe) is a cheap look at the
session in Redis; the watermark (worker.models.Watermark) is what the last
backup saw. From the two, :func:`plan_session` decides:

- whether the session row must be written (its hash changed, or ``full``), and
  what is kept aside (a hash that cannot be stored, a session with no hash);
- which of its messages to read:

  ``NONE``    nothing: the counts are what the watermark says;
  ``NEW``     everything, through the fast COPY: nothing of it is stored yet;
  ``APPEND``  only members scored above the watermark, through the fast COPY:
              every new member is newer than everything stored;
  ``MERGE``   everything, merged row by row: members appeared or went at or
              below the watermark's score (a message arrived late with an old
              timestamp), ``full`` was asked for, or the fast path met an ID
              that is already stored (``safe``).

This is the heart of incremental backups: tests/unit/test_backup_plan.py covers
every branch.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

from worker.keys import RedisKeys
from worker.models import KeptRecord, Session, Watermark
from worker.records import RecordRejected, encode_raw_hash, hash_digest, parse_session_hash
from worker.redis_store import Probe


class MessagePlan(enum.Enum):
    NONE = "none"  # no message to read
    NEW = "new"  # nothing in PostgreSQL yet: COPY everything
    APPEND = "append"  # only messages scored above the watermark: COPY them
    MERGE = "merge"  # rescan all messages and merge them

    @property
    def copies(self) -> bool:
        """Read through the fast COPY path (nothing read can be stored yet)."""
        return self in (MessagePlan.NEW, MessagePlan.APPEND)


@dataclass(frozen=True, slots=True)
class SessionPlan:
    """What one backup run does with one session."""

    session_id: str
    messages: MessagePlan
    # What the last backup saw (None: never backed up).
    mark: Watermark | None
    # A changed, valid session row to upsert (None: leave the stored row alone).
    session: Session | None = None
    # The hash digest to remember in the next watermark.
    digest: bytes | None = None
    # APPEND: read only members scored above this.
    after_score: float | None = None
    # Records kept aside while planning: the hash, or a session without one.
    kept: tuple[KeptRecord, ...] = ()
    # Why the session's messages are not backed up, for the operator.
    notes: tuple[str, ...] = ()
    # The session could not be looked at (the run fails it)...
    failed: str | None = None
    # ...or vanished from Redis since the run listed it (the run skips it).
    skipped: bool = False

    @property
    def row_stored(self) -> bool:
        """True when PostgreSQL holds (or this run writes) the session's row."""
        return self.session is not None or self.mark is not None


@dataclass(frozen=True, slots=True)
class _HashOutcome:
    session: Session | None
    digest: bytes | None
    kept: tuple[KeptRecord, ...]


def plan_session(
    probe: Probe,
    mark: Watermark | None,
    keys: RedisKeys,
    *,
    full: bool = False,
    explicit: bool = False,
    safe: bool = False,
) -> SessionPlan:
    """Decide what to do with one session (see the module docstring).

    ``explicit``: the session was asked for by name, so one missing from Redis
    is a failure (in a run over the sessions set it merely vanished since the
    listing). ``safe``: never use the fast COPY path.
    """
    sid = probe.session_id
    if probe.error is not None:
        return SessionPlan(sid, MessagePlan.NONE, mark, failed=_unreadable(sid, probe.error))
    if not probe.fields and not probe.exists:
        return _vanished(sid, mark, explicit=explicit)
    outcome = _plan_hash(probe, mark, keys, full=full)
    row_stored = outcome.session is not None or mark is not None
    if not row_stored:
        notes = _unstored_messages_note(probe.message_count)
        return SessionPlan(
            sid, MessagePlan.NONE, mark, digest=outcome.digest, kept=outcome.kept, notes=notes
        )
    messages, after_score = _plan_messages(probe, mark, full=full, safe=safe)
    return SessionPlan(
        sid,
        messages,
        mark,
        session=outcome.session,
        digest=outcome.digest,
        after_score=after_score,
        kept=outcome.kept,
    )


def _unreadable(sid: str, error: str) -> str:
    return f"cannot read session {sid} from Redis: {error}"


def _vanished(sid: str, mark: Watermark | None, *, explicit: bool) -> SessionPlan:
    if explicit:
        return SessionPlan(sid, MessagePlan.NONE, mark, failed=f"session {sid} not found in Redis")
    return SessionPlan(
        sid,
        MessagePlan.NONE,
        mark,
        notes=("removed from Redis since the run listed it",),
        skipped=True,
    )


def missing_hash_reason(listed: bool, message_count: int) -> str:
    """Why a session that exists in Redis (listed, or with messages) is not storable."""
    if listed:
        return "listed in the sessions set but has no session hash"
    return f"has {message_count} messages but no session hash"


def _plan_hash(
    probe: Probe, mark: Watermark | None, keys: RedisKeys, *, full: bool
) -> _HashOutcome:
    """The session row to write (if it changed) and what to keep aside about the hash."""
    sid = probe.session_id
    remembered = mark.hash_digest if mark else None
    if not probe.fields:
        reason = missing_hash_reason(probe.listed, probe.message_count)
        kept = KeptRecord(
            kind="session_id",
            redis_key=keys.session(sid),
            raw=sid.encode(),
            reason=reason,
            session_id=sid,
        )
        return _HashOutcome(None, remembered, (kept,))
    digest = hash_digest(probe.fields)
    if not full and mark is not None and mark.hash_digest == digest:
        return _HashOutcome(None, remembered, ())
    try:
        session, lossy = parse_session_hash(sid, probe.fields)
    except RecordRejected as rejected:
        return _HashOutcome(None, remembered, (kept_hash(keys, probe, rejected.reason),))
    extra = (kept_hash(keys, probe, lossy),) if lossy else ()
    return _HashOutcome(session, digest, extra)


def kept_hash(keys: RedisKeys, probe: Probe, reason: str) -> KeptRecord:
    """A session hash kept aside, raw, with the reason."""
    return KeptRecord(
        kind="session",
        redis_key=keys.session(probe.session_id),
        raw=encode_raw_hash(probe.fields),
        reason=reason,
        session_id=probe.session_id,
    )


def _unstored_messages_note(message_count: int) -> tuple[str, ...]:
    if not message_count:
        return ()
    return (f"its {message_count} messages are not backed up until the session hash can be stored",)


def _plan_messages(
    probe: Probe, mark: Watermark | None, *, full: bool, safe: bool
) -> tuple[MessagePlan, float | None]:
    """Which messages to read, and (APPEND) above which score."""
    if mark is None:
        return (MessagePlan.MERGE if safe else MessagePlan.NEW), None
    if full or probe.count_to_watermark != mark.message_count:
        # Members at or below the watermark's score were added (a late message
        # with an old timestamp) or removed: rescan everything.
        return MessagePlan.MERGE, None
    if probe.message_count > mark.message_count:
        return (MessagePlan.MERGE, None) if safe else (MessagePlan.APPEND, mark.max_score)
    return MessagePlan.NONE, None
