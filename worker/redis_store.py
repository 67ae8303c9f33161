"""The Redis store: the application's data, in the layout of docs/contract.md §1.

It takes a client (``decode_responses=False``: members are kept as the exact
bytes the application wrote) and the key names, and speaks in bytes, floats and
the dataclasses of :mod:`worker.models`. Bulk reads go through pipelines; the
swap that makes a restored session visible is one Lua script, so a reader sees
the old session or the new one, never half of either.

The client may be a ``RedisCluster`` (REDIS_CLUSTER=1): every command then names
one key, or keys of one slot, and pipelines are split per node by redis-py. The
swap is then made key by key in a reader-safe order (:mod:`worker.cluster_swap`).
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import redis
import redis.cluster

from worker.cluster_swap import swap_in
from worker.connections import DataRedis, one_line, redis_errors
from worker.errors import StoreError
from worker.keys import RedisKeys
from worker.models import Watermark

# Pages a backup's reader thread may hold ahead of the COPY (memory: at most
# this many pages of BACKUP_CHUNK_MESSAGES members).
PREFETCH_PAGES = 4
# The first pages of this many sessions are read in one pipeline (one round
# trip; in a cluster, one per node, all nodes at once), each at most
# BACKUP_CHUNK_MESSAGES / FIRST_PAGES_AT_ONCE members: memory stays within one
# page's worth. Longer sessions go on page by page.
FIRST_PAGES_AT_ONCE = 32
_DONE = object()

# Staging keys of a restore expire if the restore dies before swapping them in.
STAGING_TTL_S = 3600

# KEYS: session hash, messages zset, staging zset, sessions set, and where to
# keep the replaced hash and messages
# ARGV: force ("1"/"0"), session id, expected staged members, keep replaced
# ("1"/"0"), seconds the kept keys live, field, value, ...
# Returns 1 when swapped in, 2 when swapped in and the session it replaced was
# kept (renamed, not deleted: every write the application made before the swap
# is there), 0 when the session exists and force is off, -1 when the staging
# key is not complete (expired, or a concurrent restore). Every check comes
# before the first write: a script that fails half-way keeps what it already wrote.
_COMMIT_SESSION = """
if ARGV[1] ~= '1' and redis.call('EXISTS', KEYS[1], KEYS[2]) > 0 then
    redis.call('DEL', KEYS[3])
    return 0
end
local expected = tonumber(ARGV[3])
if expected > 0 and redis.call('ZCARD', KEYS[3]) ~= expected then
    redis.call('DEL', KEYS[3])
    return -1
end
local answer = 1
if ARGV[4] == '1' and redis.call('EXISTS', KEYS[1], KEYS[2]) > 0 then
    redis.call('DEL', KEYS[5], KEYS[6])
    local old = redis.call('HGETALL', KEYS[1])
    if #old > 0 then
        redis.call('HSET', KEYS[5], unpack(old))
        redis.call('EXPIRE', KEYS[5], ARGV[5])
    end
    if redis.call('EXISTS', KEYS[2]) == 1 then
        redis.call('RENAME', KEYS[2], KEYS[6])
        redis.call('EXPIRE', KEYS[6], ARGV[5])
    end
    answer = 2
end
redis.call('DEL', KEYS[1])
redis.call('HSET', KEYS[1], unpack(ARGV, 6))
if expected > 0 then
    redis.call('RENAME', KEYS[3], KEYS[2])
    redis.call('PERSIST', KEYS[2])
else
    redis.call('DEL', KEYS[2])
end
redis.call('SADD', KEYS[4], ARGV[2])
return answer
"""


class _Handoff:
    """A bounded queue between the read-ahead thread and its consumer, which may stop it."""

    def __init__(self) -> None:
        self._queue: queue.Queue[object] = queue.Queue(maxsize=PREFETCH_PAGES)
        self.stop = threading.Event()

    def put(self, item: object) -> bool:
        """Hand ``item`` over; False when the consumer stopped listening."""
        while not self.stop.is_set():
            try:
                self._queue.put(item, timeout=0.1)
            except queue.Full:
                continue
            return True
        return False

    def get(self) -> object:
        return self._queue.get()


@dataclass(frozen=True, slots=True)
class Probe:
    """A cheap look at one session: enough to tell whether a backup must read it."""

    session_id: str
    fields: dict[bytes, bytes]  # the session hash; empty when there is none
    listed: bool  # a member of the sessions set
    message_count: int  # ZCARD of the messages zset
    # ZCOUNT of members scored up to the watermark's max_score, when there is one.
    count_to_watermark: int | None
    # Why the session could not be probed (a key of the wrong type), if it could not.
    error: str | None = None

    @property
    def exists(self) -> bool:
        return bool(self.fields) or self.listed or self.message_count > 0


@dataclass(frozen=True, slots=True)
class SessionCommit:
    """A restored session, ready to be swapped in."""

    session_id: str
    fields: Mapping[str, str]
    staged_members: int


# KEYS: a marker; ARGV: the value it must hold. Deletes it only if it holds it.
_CLEAR_MARKER = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
    return redis.call('DEL', KEYS[1])
end
return 0
"""


@dataclass(frozen=True, slots=True)
class SweepProbe:
    """What the sweep compares with a session's watermark: cheap to read."""

    session_id: str
    fields: dict[bytes, bytes]
    message_count: int
    top_score: float | None


class RedisStore:
    def __init__(self, client: DataRedis, keys: RedisKeys, url: str) -> None:
        self.client = client
        self.keys = keys
        self._url = url
        # A Redis Cluster (REDIS_CLUSTER=1): a session's keys live in different
        # slots, so no command or script may name two of them (CROSSSLOT).
        self.cluster = isinstance(client, redis.cluster.RedisCluster)
        self._commit = client.register_script(_COMMIT_SESSION)
        self._clear_marker = client.register_script(_CLEAR_MARKER)

    def _staging(self, run_id: str, session_id: str) -> str:
        if self.cluster:
            return self.keys.restore_staging_in_slot(run_id, session_id)
        return self.keys.restore_staging(run_id, session_id)

    def ping(self) -> None:
        with redis_errors(self._url):
            self.client.ping()

    # -- listing ------------------------------------------------------------

    def session_members(self, page_size: int = 5000) -> Iterator[bytes]:
        """Every member of the sessions set, raw (SSCAN: never one huge reply).

        SSCAN may return a member twice; callers de-duplicate.
        """
        with redis_errors(self._url):
            yield from self.client.sscan_iter(self.keys.sessions, count=page_size)

    def session_members_page(self, cursor: int, count: int = 500) -> tuple[int, list[bytes]]:
        """One SSCAN step over the sessions set: (next cursor, members); cursor 0 ends."""
        with redis_errors(self._url):
            next_cursor, members = self.client.sscan(self.keys.sessions, cursor, count=count)
        return int(next_cursor), [bytes(m) for m in members]  # type: ignore[arg-type]

    # -- backup -------------------------------------------------------------

    def probe(
        self, session_ids: Sequence[str], watermarks: Mapping[str, Watermark]
    ) -> dict[str, Probe]:
        """Probe many sessions in one round trip."""
        with redis_errors(self._url):
            pipe = self.client.pipeline(transaction=False)
            for session_id in session_ids:
                messages_key = self.keys.messages(session_id)
                pipe.sismember(self.keys.sessions, session_id)
                pipe.hgetall(self.keys.session(session_id))
                pipe.zcard(messages_key)
                mark = watermarks.get(session_id)
                if mark is not None and mark.max_score is not None:
                    pipe.zcount(messages_key, "-inf", repr(mark.max_score))
            # A key of the wrong type (WRONGTYPE) fails its session, not the batch.
            replies = iter(pipe.execute(raise_on_error=False))
        probes = {}
        for session_id in session_ids:
            listed, fields, count = next(replies), next(replies), next(replies)
            mark = watermarks.get(session_id)
            to_mark = None
            if mark is not None:
                to_mark = next(replies) if mark.max_score is not None else 0
            errors = [
                r for r in (listed, fields, count, to_mark) if isinstance(r, redis.ResponseError)
            ]
            if errors:
                probes[session_id] = Probe(
                    session_id, {}, False, 0, None, error=one_line(str(errors[0]))
                )
                continue
            probes[session_id] = Probe(
                session_id=session_id,
                fields=fields,
                listed=bool(listed),
                message_count=int(count),
                count_to_watermark=None if to_mark is None else int(to_mark),
            )
        return probes

    def read_messages(
        self, session_id: str, after_score: float | None, chunk: int
    ) -> Iterator[list[tuple[bytes, float]]]:
        """A session's messages in score order, ``chunk`` at a time, each member once.

        Pages by score, not by index: a message added or removed while we read
        cannot shift the pages and make us skip one. When a page ends, all the
        members sharing its last score are fetched in the same round trip as the
        next page, which starts strictly after that score. ``after_score``
        (exclusive) reads only messages newer than a watermark.
        """
        key = self.keys.messages(session_id)
        low = "-inf" if after_score is None else f"({after_score!r}"
        with redis_errors(self._url):
            page: list[tuple[bytes, float]] = self.client.zrangebyscore(  # type: ignore[assignment]
                key, low, "+inf", start=0, num=chunk, withscores=True
            )
        yield from self._pages_after(key, page, chunk, chunk)

    def _pages_after(
        self, key: str, page: list[tuple[bytes, float]], asked: int, chunk: int
    ) -> Iterator[list[tuple[bytes, float]]]:
        """``page`` (``asked`` members were asked for), then the pages after it."""
        while page:
            if len(page) < asked:
                yield page
                return
            last = page[-1][1]
            with redis_errors(self._url):
                pipe = self.client.pipeline(transaction=False)
                pipe.zrangebyscore(key, repr(last), repr(last), withscores=True)
                pipe.zrangebyscore(key, f"({last!r}", "+inf", start=0, num=chunk, withscores=True)
                group, next_page = pipe.execute()
            have = {member for member, score in page if score == last}
            page.extend((member, score) for member, score in group if member not in have)
            yield page
            page, asked = next_page, chunk

    def read_members(self, session_id: str, chunk: int) -> Iterator[list[bytes]]:
        """``read_messages`` of the whole session without the scores (verify needs none).

        The same pages by score, each member once, but the members' scores are
        not sent: Redis writing scores as text and redis-py reading them back
        cost about 7 ms per 10,000 members (ZRANGE of 10,000 members: 10.3 ms
        with scores, 2.9 ms without). Only each full page's
        last score, which the next page starts after, is asked for, in the same
        round trip (the page's last member, with its score). If the two
        disagree (the zset changed between the two commands), the rest is read
        with its scores, as read_messages reads it.
        """
        key = self.keys.messages(session_id)
        low = "-inf"
        _none, page, tail = self._members_from(key, low, chunk, None)
        while page:
            if len(page) < chunk:
                yield page
                return
            if not tail or tail[0][0] != page[-1]:
                with redis_errors(self._url):
                    again: list[tuple[bytes, float]] = self.client.zrangebyscore(  # type: ignore[assignment]
                        key, low, "+inf", start=0, num=chunk, withscores=True
                    )
                for scored in self._pages_after(key, again, chunk, chunk):
                    yield [member for member, _score in scored]
                return
            last = tail[0][1]
            low = f"({last!r}"
            group, next_page, next_tail = self._members_from(key, low, chunk, last)
            # The page's members scored ``last`` are its tail, and in ``group``.
            have = set(page[-len(group) :]) if group else set()
            page.extend(member for member in group if member not in have)
            yield page
            page, tail = next_page, next_tail

    def _members_from(
        self, key: str, low: str, chunk: int, last: float | None
    ) -> tuple[list[bytes], list[bytes], list[tuple[bytes, float]]]:
        """In one round trip: with ``last``, every member scored ``last``; then a
        page of members from ``low``, and its last member with its score."""
        with redis_errors(self._url):
            pipe = self.client.pipeline(transaction=False)
            if last is not None:
                pipe.zrangebyscore(key, repr(last), repr(last))
            pipe.zrangebyscore(key, low, "+inf", start=0, num=chunk)
            pipe.zrangebyscore(key, low, "+inf", start=chunk - 1, num=1, withscores=True)
            replies = pipe.execute()
        group = replies.pop(0) if last is not None else []
        page, tail = replies
        return group, page, tail

    def read_many(
        self, requests: Sequence[tuple[str, float | None]], chunk: int
    ) -> Iterator[tuple[int, list[tuple[bytes, float]]]]:
        """``read_messages`` of several sessions in turn: (index of the request, page).

        A thread reads ahead, a few pages at most, while the caller works on the
        page it has: a backup then waits on Redis far less (the thread waits
        instead, without the GIL) and keeps PostgreSQL's COPY fed.
        """
        pages = _Handoff()
        reader = threading.Thread(
            target=self._read_ahead, args=(requests, chunk, pages), name="redis-read-ahead",
            daemon=True,
        )  # fmt: skip
        reader.start()
        try:
            while True:
                item = pages.get()
                if item is _DONE:
                    return
                if isinstance(item, BaseException):
                    raise item
                yield item  # type: ignore[misc]
        finally:
            pages.stop.set()
            reader.join()

    def _read_ahead(
        self, requests: Sequence[tuple[str, float | None]], chunk: int, pages: _Handoff
    ) -> None:
        """The reader thread of ``read_many``: pages into ``pages``, then _DONE or the error."""
        try:
            for start in range(0, len(requests), FIRST_PAGES_AT_ONCE):
                group = requests[start : start + FIRST_PAGES_AT_ONCE]
                if not self._read_group(start, group, chunk, pages):
                    return
            pages.put(_DONE)
        except BaseException as exc:  # noqa: BLE001 - handed to the consumer, raised there
            pages.put(exc)

    def _read_group(
        self,
        start: int,
        group: Sequence[tuple[str, float | None]],
        chunk: int,
        pages: _Handoff,
    ) -> bool:
        """The first pages of ``group`` in one pipeline, then the rest of each; False: stopped."""
        first = max(chunk // FIRST_PAGES_AT_ONCE, 10)
        with redis_errors(self._url):
            pipe = self.client.pipeline(transaction=False)
            for session_id, after in group:
                low = "-inf" if after is None else f"({after!r}"
                pipe.zrangebyscore(
                    self.keys.messages(session_id), low, "+inf", start=0, num=first,
                    withscores=True,
                )  # fmt: skip
            firsts = pipe.execute()
        for offset, ((session_id, _after), page) in enumerate(zip(group, firsts, strict=True)):
            key = self.keys.messages(session_id)
            for part in self._pages_after(key, page, first, chunk):
                if not pages.put((start + offset, part)):
                    return False
        return True

    # -- restore ------------------------------------------------------------

    def existing(self, session_ids: Sequence[str]) -> set[str]:
        """The sessions that have a hash or messages in Redis."""
        with redis_errors(self._url):
            pipe = self.client.pipeline(transaction=False)
            for session_id in session_ids:
                # One key per command: in a cluster the two are in different slots.
                pipe.exists(self.keys.session(session_id))
                pipe.exists(self.keys.messages(session_id))
            replies = iter(pipe.execute())
        return {sid for sid in session_ids if next(replies) + next(replies)}

    def stage(self, run_id: str, members: Mapping[str, Mapping[bytes, int]]) -> None:
        """Add members to the staging zsets of several sessions, in one round trip."""
        with redis_errors(self._url):
            pipe = self.client.pipeline(transaction=False)
            for session_id, scored in members.items():
                if scored:
                    key = self._staging(run_id, session_id)
                    pipe.zadd(key, scored)
                    pipe.expire(key, STAGING_TTL_S)
            pipe.execute()

    def with_keys(self, keys: RedisKeys) -> RedisStore:
        """The same Redis, read under other key names (a restore's replaced sessions)."""
        return RedisStore(self.client, keys, self._url)

    def commit(
        self,
        run_id: str,
        commits: Sequence[SessionCommit],
        *,
        force: bool,
        keep_replaced: bool = False,
    ) -> list[int]:
        """Swap staged sessions in, each atomically; one round trip for all.

        Returns the script's answer per session (1 swapped in, 2 swapped in with
        the replaced session kept under ``keys.restore_replaced(run_id)``, 0
        exists, -1 the staging key was incomplete).
        """
        if self.cluster:
            assert isinstance(self.client, redis.cluster.RedisCluster)
            with redis_errors(self._url):
                return swap_in(self.client, self.keys, run_id, commits, force=force)
        replaced = self.keys.restore_replaced(run_id)
        keep = "1" if force and keep_replaced else "0"
        with redis_errors(self._url):
            pipe = self.client.pipeline(transaction=False)
            for commit in commits:
                sid = commit.session_id
                args: list[str | int] = [
                    "1" if force else "0", sid, commit.staged_members, keep, STAGING_TTL_S,
                ]  # fmt: skip
                for name, value in commit.fields.items():
                    args += [name, value]
                self._commit(
                    keys=[
                        self.keys.session(sid),
                        self.keys.messages(sid),
                        self.keys.restore_staging(run_id, sid),
                        self.keys.sessions,
                        replaced.session(sid),
                        replaced.messages(sid),
                    ],
                    args=args,
                    client=pipe,
                )
            return [int(answer) for answer in pipe.execute()]

    def discard_replaced(self, run_id: str, session_ids: Sequence[str]) -> None:
        """Delete what a forced restore kept of the sessions it replaced."""
        if not session_ids:
            return
        replaced = self.keys.restore_replaced(run_id)
        with redis_errors(self._url):
            self.client.delete(
                *(
                    key
                    for sid in session_ids
                    for key in (replaced.session(sid), replaced.messages(sid))
                )
            )

    def discard_staging(self, run_id: str, session_ids: Sequence[str]) -> None:
        if not session_ids:
            return
        with redis_errors(self._url):
            self.client.delete(*(self._staging(run_id, sid) for sid in session_ids))

    # -- continuous protection -----------------------------------------------

    def sweep_probe(self, session_ids: Sequence[str]) -> list[SweepProbe]:
        """Hash, ZCARD and top score of many sessions, in one round trip.

        A session whose keys cannot be read (a key of the wrong type) is left
        out: the scheduled backup reports it.
        """
        with redis_errors(self._url):
            pipe = self.client.pipeline(transaction=False)
            for session_id in session_ids:
                key = self.keys.messages(session_id)
                pipe.hgetall(self.keys.session(session_id))
                pipe.zcard(key)
                pipe.zrange(key, -1, -1, withscores=True)
            replies = iter(pipe.execute(raise_on_error=False))
        probes = []
        for session_id in session_ids:
            fields, count, top = next(replies), next(replies), next(replies)
            if any(isinstance(r, redis.ResponseError) for r in (fields, count, top)):
                continue
            score = float(top[0][1]) if top else None
            probes.append(SweepProbe(session_id, fields, int(count), score))
        return probes

    def put_marker(self, key: str, value: str, ttl_s: int) -> str | None:
        """SET ``key`` to ``value`` unless it exists; None when set, else what it holds."""
        with redis_errors(self._url):
            for _ in range(3):
                if self.client.set(key, value, nx=True, ex=ttl_s):
                    return None
                held = self.client.get(key)
                if held is not None:
                    return held.decode() if isinstance(held, bytes) else str(held)
                # It expired between the two commands: try again.
        return None

    def clear_marker(self, key: str, value: str) -> None:
        """Delete ``key`` if it still holds ``value`` (not a marker set after it)."""
        with redis_errors(self._url):
            self._clear_marker(keys=[key], args=[value])

    def drop_markers(self, keys: Sequence[str]) -> None:
        """Delete markers whatever they hold."""
        if keys:
            with redis_errors(self._url):
                self.client.delete(*keys)

    def notify_flags(self) -> str | None:
        """notify-keyspace-events of the server; None when CONFIG is refused."""
        try:
            with redis_errors(self._url):
                reply = self.client.config_get("notify-keyspace-events")
        except StoreError:
            return None  # renamed away, or the ACL forbids it (a managed Redis)
        values: dict[Any, Any] = dict(reply)
        value = values.get(b"notify-keyspace-events", values.get("notify-keyspace-events", b""))
        return value.decode() if isinstance(value, bytes) else str(value)

    def set_notify_flags(self, flags: str) -> bool:
        """CONFIG SET notify-keyspace-events; False when refused."""
        try:
            with redis_errors(self._url):
                self.client.config_set("notify-keyspace-events", flags)
        except StoreError:
            return False
        return True

    def subscribe_sessions(self) -> Any:
        """A subscription to the keyspace notifications of every session key."""
        # One Redis (a cluster's notifications are per node: worker/watch_cluster.py).
        assert isinstance(self.client, redis.Redis)
        db = int(self.client.connection_pool.connection_kwargs.get("db", 0) or 0)
        with redis_errors(self._url):
            pubsub = self.client.pubsub(ignore_subscribe_messages=True)  # type: ignore[no-untyped-call]
            pubsub.psubscribe(f"__keyspace@{db}__:{self.keys.session_pattern}")
        return pubsub
