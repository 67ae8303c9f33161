"""Verify: compare Redis and PostgreSQL, session by session. No Celery here.

For each session, in a read-only transaction holding the session's lock (so
no backup or restore of it is half-way through):

- the session's fields, field by field;
- its messages by ID, and their content by digest (worker/checksums.py): what
  is in Redis but not in the backup, in the backup but not in Redis, and what
  differs;
- the backup's integrity: the messages PostgreSQL holds must still sum to the
  checksum the last backup recorded, else the backup was changed or damaged
  since.

``quick`` compares what Redis holds with the recorded checksum only, without
reading the messages back from PostgreSQL: cheap, and enough to tell that
nothing changed since the last backup; any mismatch falls back to the full
comparison.

``as_of``: compare with the state history holds for that moment instead of
the latest backup (a restore as of that moment into a drill target must equal it).
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from operator import itemgetter
from typing import Any

import orjson

from worker.checksums import (
    MODULUS,
    MessageChecksum,
    canonical_digest,
    canonical_fingerprint,
    message_canonical,
    message_digest,
    session_digest,
)
from worker.engine import Coverage, Engine
from worker.models import Session, SessionResult, SessionStatus, VerifyOptions
from worker.records import (
    RecordRejected,
    parse_message,
    parse_session_hash,
    peek_message_id,
)
from worker.redis_store import Probe

EXAMPLES = 5  # message IDs listed per kind of difference
# Up to this many messages, verify remembers a session's message IDs, to tell
# without asking PostgreSQL that no ID is in Redis twice (memory: a few MB).
REMEMBERED_IDS = 100_000
# From this many messages in Redis, verify has PostgreSQL stage the backup's side
# of a session while it reads Redis's (see PostgresStore.verify_staging); below,
# the extra statements would cost more than they hide (measured: docs/scaling.md).
STAGE_BACKUP_FROM = 1000
# Redis's side is staged in slices of this many members, so that PostgreSQL takes
# one in while the next is digested.
STAGED_SLICE = 1000
COMPARED_FIELDS = (
    "name",
    "creator_id",
    "mcp_server_url",
    "websocket_key",
    "created_at",
    "updated_at",
    "max_players",
    "settings",
    "status",
    "deleted_at",
)


@dataclass(slots=True)
class SessionDiff:
    """How one session in Redis compares with its backup."""

    session_id: str
    in_redis: bool = False
    in_backup: bool = False
    soft_deleted: bool = False
    checked_by: str = "messages"  # or "checksum" (quick, and it matched)
    fields_differ: list[str] = field(default_factory=list)
    redis_unreadable: str | None = None  # the session hash cannot be read
    messages_in_redis: int = 0
    messages_in_backup: int = 0
    missing_from_backup: int = 0
    missing_from_redis: int = 0
    different: int = 0
    kept_aside: int = 0  # messages in Redis that cannot be stored (see kept records)
    backup_damaged: bool = False
    examples: dict[str, list[str]] = field(default_factory=dict)

    @property
    def agrees(self) -> bool:
        if self.soft_deleted and not self.in_redis:
            return True
        return (
            self.in_redis
            and self.in_backup
            and not self.fields_differ
            and self.redis_unreadable is None
            and not self.missing_from_backup
            and not self.missing_from_redis
            and not self.different
            and not self.kept_aside
            and not self.backup_damaged
        )

    def summary(self) -> str:
        if self.agrees:
            return "soft-deleted, not in Redis" if self.soft_deleted else "agree"
        if not self.in_backup:
            return "missing from the backup"
        if not self.in_redis:
            return "missing from Redis"
        parts = []
        if self.redis_unreadable:
            parts.append(f"session in Redis unreadable ({self.redis_unreadable})")
        if self.fields_differ:
            parts.append(f"fields differ: {', '.join(self.fields_differ)}")
        for count, what in (
            (self.missing_from_backup, "missing from the backup"),
            (self.missing_from_redis, "missing from Redis"),
            (self.different, "different"),
            (self.kept_aside, "kept aside (cannot be stored)"),
        ):
            if count:
                parts.append(f"{count} message(s) {what}")
        if self.backup_damaged:
            parts.append("backup damaged: its messages no longer match the recorded checksum")
        return "; ".join(parts)

    def as_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["agrees"] = self.agrees
        return data


class VerifyEngine(Engine[VerifyOptions]):
    def coverage(self) -> Coverage:
        """Every session in Redis's sessions set or (not soft-deleted) in PostgreSQL."""
        listed, _bad = self.listed_sessions()  # bad members: backups keep them aside
        ids = set(listed)
        moment = self.options.moment
        if moment is not None:
            ids.update(self.pg.session_ids_as_of(moment)[0])
            return Coverage(sorted(ids))
        for page in self.pg.live_session_ids():
            ids.update(page)
        return Coverage(sorted(ids))

    def work(self, run_id: str | None, ids: list[str], *, explicit: bool) -> list[SessionResult]:
        """Compare sessions; results carry what differs in their details."""
        results = self._attempt(ids, quick=self.options.quick)
        self.record(run_id, results)
        return results

    def _attempt(self, ids: list[str], *, quick: bool) -> list[SessionResult]:
        results = []
        self.pg.prepare_verify()
        with self.pg.transaction(read_only=True):
            self.pg.lock_sessions(ids)
            probes = self.redis.probe(ids, {})
            moment = self.options.moment
            if moment is None:
                sessions = self.pg.sessions(ids)
                recorded = self.pg.checksums(ids)
            else:
                # The state at the moment: no recorded checksum describes it.
                sessions, recorded = self.pg.sessions_as_of(ids, moment), {}
            for sid in ids:
                started = time.monotonic()
                probe = probes[sid]
                if probe.error is not None:
                    # A key of the wrong type fails its session, not the batch.
                    error = f"cannot read session {sid} from Redis: {probe.error}"
                    results.append(self.result(sid, SessionStatus.FAILED, error=error))
                    continue
                diff = self._compare(sid, probe, sessions.get(sid), recorded.get(sid), quick=quick)
                results.append(
                    self.result(
                        sid,
                        SessionStatus.COMPLETED if diff.agrees else SessionStatus.DIFFERENT,
                        messages=max(diff.messages_in_redis, diff.messages_in_backup),
                        seconds=time.monotonic() - started,
                        error=None if diff.agrees else diff.summary(),
                        details=diff.as_dict(),
                    )
                )
        return results

    def _compare(
        self,
        sid: str,
        probe: Probe,
        stored: Session | None,
        recorded: tuple[MessageChecksum, bytes] | None,
        *,
        quick: bool,
    ) -> SessionDiff:
        """How one session compares with its backup.

        Its fields, then its messages one by one; with ``quick``, only their sum
        when that matches the checksum the last backup recorded.
        """
        diff = SessionDiff(session_id=sid, in_redis=probe.exists, in_backup=stored is not None)
        if stored is not None and stored.deleted_at is not None:
            diff.soft_deleted = True
            if not probe.exists:
                return diff
        live = _live_session(sid, probe, diff)
        # A big session's backup side is staged while Redis's is read, unless a
        # quick check may make it unnecessary.
        staged = (
            stored is not None
            and probe.message_count >= STAGE_BACKUP_FROM
            and not (quick and recorded is not None)
        )
        redis_sum = self._stage(sid, probe, diff, with_backup=staged)
        if stored is None:
            return diff
        if live is not None:
            diff.fields_differ = _differing_fields(live, stored)
        if quick and recorded is not None and _matches_recorded(recorded, redis_sum, live):
            diff.checked_by = "checksum"
            diff.messages_in_backup = recorded[0].count
            return diff
        backup_sum = self._compare_backup_messages(
            sid, diff, MessageChecksum() if redis_sum is None else redis_sum, staged=staged
        )
        if recorded is not None and recorded[0] != backup_sum:
            diff.backup_damaged = True
        return diff

    def _compare_backup_messages(
        self, sid: str, diff: SessionDiff, redis_sum: MessageChecksum, *, staged: bool
    ) -> MessageChecksum:
        """Count what differs between the backup's messages and Redis's; the backup's sum.

        Paired by ID inside PostgreSQL (the Redis side was staged first), so
        memory stays flat whatever the session's size. ``redis_sum``: the sum
        of the staged digests (one per ID). PostgreSQL leaves out the stored
        rows whose fingerprint equals their staged one (canonical_fingerprint):
        their digests are the staged ones, so the backup's sum is the staged
        sum less the digests of what came back, plus the digests of the rows
        that came back.
        """
        same = MessageChecksum(redis_sum.count, redis_sum.total)
        backup_sum = MessageChecksum()
        # As of a moment (a restored copy checked against history), or as stored now.
        moment = self.options.moment
        for redis_id, redis_digest, row in self.pg.compare_staged(
            sid, moment, backup_staged=staged
        ):
            if redis_digest is not None:
                same.remove(int.from_bytes(redis_digest, "big"))
            if row is None:
                diff.missing_from_backup += 1
                _example(diff, "missing_from_backup", redis_id)
                continue
            digest = message_digest(row)
            backup_sum.add(digest)
            if redis_digest is None:
                diff.missing_from_redis += 1
                _example(diff, "missing_from_redis", row[0])
            elif redis_digest != _digest_bytes(digest):
                diff.different += 1
                _example(diff, "different", row[0])
        backup_sum = backup_sum.merge(same)
        diff.messages_in_backup = backup_sum.count
        return backup_sum

    def _stage(
        self, sid: str, probe: Probe, diff: SessionDiff, *, with_backup: bool
    ) -> MessageChecksum | None:
        """Stage the session's two sides in PostgreSQL; the sum of Redis's (None: not there).

        Redis's side a page at a time (see PostgresStore.verify_staging): the
        digests of the messages in Redis. Members the backup cannot store, and
        members after the first with the same ID (the backup keeps the first),
        count as kept aside. PostgreSQL is asked for those duplicates unless
        the IDs, remembered up to REMEMBERED_IDS, show that there are none.
        """
        with self.pg.verify_staging(sid, self.options.moment, with_backup=with_backup) as staging:
            if not probe.exists:
                return None
            total = MessageChecksum()
            seen: set[str] | None = set()
            for page in self.redis.read_members(sid, self.chunk):
                # In slices, each COPYed while the next one is digested (once
                # staging has stopped holding them: VerifyStaging).
                for start in range(0, len(page), STAGED_SLICE):
                    staged, part_total = _digest_page(
                        sid, page[start : start + STAGED_SLICE], diff, total.count
                    )
                    staging.add(staged)
                    total = total.merge(MessageChecksum(len(staged), part_total))
                    if seen is not None:
                        seen.update(map(itemgetter(0), staged))
                        if len(seen) > REMEMBERED_IDS:
                            seen = None
        if seen is None or len(seen) < total.count:
            for message_id, duplicate in self.pg.staged_duplicates():
                diff.kept_aside += 1
                _example(diff, "kept_aside", message_id)
                total.remove(int.from_bytes(duplicate, "big"))
        diff.messages_in_redis = total.count
        return total


def _digest_page(
    sid: str, page: list[bytes], diff: SessionDiff, ordinal: int
) -> tuple[list[tuple[str, int, bytes, bytes | None]], int]:
    """The staging rows of one page of members (ordinals after ``ordinal``), their digests' sum.

    Members that cannot be stored count as kept aside in ``diff``. Once per
    message of a verify: the functions are bound to local names, which saves a
    global lookup each, five times per message (5,000 members: best 27.6 ms
    before, 26.0 ms after; median 33.2 and 27.7 ms).
    """
    parse, canonical_of, digest_of, fingerprint_of = (
        parse_message,
        message_canonical,
        canonical_digest,
        canonical_fingerprint,
    )
    to_int = int.from_bytes
    staged: list[tuple[str, int, bytes, bytes | None]] = []
    append = staged.append
    page_total = 0
    for raw in page:
        try:
            row, lossy = parse(sid, raw)
        except RecordRejected:
            diff.kept_aside += 1
            _example(diff, "kept_aside", peek_message_id(raw))
            continue
        if lossy:  # stored without its unknown keys, which were kept aside
            diff.kept_aside += 1
            _example(diff, "kept_aside", row[0])
        canonical = canonical_of(row)
        digest = digest_of(canonical)
        page_total += to_int(digest, "big")
        ordinal += 1
        # tool_calls: PostgreSQL cannot write their canonical form (sorted keys).
        append((row[0], ordinal, digest, None if row[5] is not None else fingerprint_of(canonical)))
    return staged, page_total % MODULUS


def _digest_bytes(digest: int) -> bytes:
    return digest.to_bytes(16, "big")


def _live_session(sid: str, probe: Probe, diff: SessionDiff) -> Session | None:
    """The session as Redis holds it, if it can be read; why not is noted in ``diff``."""
    if probe.fields:
        try:
            live, lossy = parse_session_hash(sid, probe.fields)
        except RecordRejected as rejected:
            diff.redis_unreadable = rejected.reason
            return None
        if lossy:  # fields with no column: kept aside by backups, not stored
            diff.kept_aside += 1
        return live
    if probe.exists:  # listed, or messages left, but the hash itself is gone
        diff.redis_unreadable = (
            "listed in the sessions set but has no session hash"
            if probe.listed
            else f"has {probe.message_count} messages but no session hash"
        )
    return None


def _matches_recorded(
    recorded: tuple[MessageChecksum, bytes],
    redis_sum: MessageChecksum | None,
    live: Session | None,
) -> bool:
    """Whether Redis still holds what the last backup recorded (messages and session fields)."""
    return (
        redis_sum is not None
        and redis_sum == recorded[0]
        and live is not None
        and session_digest(live) == recorded[1]
    )


def _differing_fields(live: Session, stored: Session) -> list[str]:
    differing = []
    for name in COMPARED_FIELDS:
        left, right = getattr(live, name), getattr(stored, name)
        if name == "settings":
            left = None if left is None else orjson.loads(left)
            right = None if right is None else orjson.loads(right)
        if left != right:
            differing.append(name)
    return differing


def _example(diff: SessionDiff, kind: str, message_id: str | None) -> None:
    listed = diff.examples.setdefault(kind, [])
    if len(listed) < EXAMPLES and message_id:
        listed.append(message_id)
