"""Key names of the application's Redis layout (docs/contract.md §1), in one place.

Every key we read or write is built here. A session ID must already have been
validated as a canonical UUID (:func:`worker.records.parse_session_id`) before
it reaches these functions: an ID such as ``*`` or ``a:b`` must never become
part of a key name.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class RedisKeys:
    prefix: str

    @property
    def sessions(self) -> str:
        """SET of all session IDs."""
        return f"{self.prefix}sessions"

    def session(self, session_id: str) -> str:
        """HASH of one session."""
        return f"{self.prefix}session:{session_id}"

    def messages(self, session_id: str) -> str:
        """ZSET of a session's messages (member = JSON, score = created_at ms)."""
        return f"{self.prefix}session:{session_id}:messages"

    def restore_staging(self, run_id: str, session_id: str) -> str:
        """Where a restore assembles a session's messages before swapping them in.

        Outside the application's layout (the application never reads it) and
        given an expiry, so a crashed restore leaves nothing behind for long.
        """
        return f"{self.prefix}restore-staging:{run_id}:{session_id}:messages"

    def restore_staging_in_slot(self, run_id: str, session_id: str) -> str:
        """The staging key of a restore into a Redis Cluster.

        Its hash tag is the messages key, so it lives in that key's slot (on
        the same node) and can be renamed over it. Only the staging key's slot
        changes: the application's keys carry no hash tag (a prefix cannot
        hold braces), so they stay where the application put them.
        """
        return f"{self.prefix}restore-staging:{run_id}:{{{self.messages(session_id)}}}"

    def restore_replaced(self, run_id: str) -> RedisKeys:
        """Where a forced restore keeps the session it replaces, until history has it.

        The same layout under a prefix of its own: ``{prefix}restore-replaced:{run}:``.
        The keys expire, like staging keys.
        """
        return RedisKeys(f"{self.prefix}restore-replaced:{run_id}:")

    def backup_queued(self, session_id: str) -> str:
        """STRING: the ID of a backup_session task queued and not started yet.

        Ours, outside the application's layout, short-lived (an expiry): the
        application asking for a backup of the same session again is answered
        with that task instead of a new one (worker/tasks.py).
        """
        return f"{self.prefix}backup-queued:{session_id}"

    def drain_queued(self, shard: int) -> str:
        """STRING: the ID of a continuous drain task of this shard queued and not started yet."""
        return f"{self.prefix}continuous-drain-queued:{shard}"

    @property
    def session_pattern(self) -> str:
        """Glob of every key of a session (its hash and its messages zset)."""
        return f"{self.prefix}session:*"
