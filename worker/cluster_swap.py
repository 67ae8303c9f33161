"""Swapping restored sessions into a Redis Cluster, in an order that keeps readers safe.

On one Redis a restore swaps a session in with one Lua script over its four
keys. A cluster refuses that (CROSSSLOT: the hash, the messages zset and the
sessions set hash to different slots, often on different nodes), so each key
is written by a command or script of its own, in this order:

1. the messages: staged under a key whose hash tag is the messages key (same
   slot, same node), checked complete and RENAMEd over the messages key by one
   script: the zset changes from the old messages to the new ones at once;
2. the hash: deleted and written again by one script: old fields to new at once;
3. the ID added to the sessions set, last, for all the batch's sessions at once.

A reader that finds sessions through the sessions set (or through the hash)
never sees a session that is not all there; docs/cluster.md says exactly what
a reader can observe between the steps. Each step is one pipeline for the whole
batch, which redis-py sends to every node at once (grouped per node).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Protocol

import redis.cluster

from worker.keys import RedisKeys

# KEYS: staging zset, messages zset (one slot: the staging key's hash tag).
# ARGV: force ("1"/"0"), expected staged members.
# Returns 1 swapped in, 0 the messages exist and force is off, -1 staging incomplete.
_SWAP_MESSAGES = """
if ARGV[1] ~= '1' and redis.call('EXISTS', KEYS[2]) > 0 then
    redis.call('DEL', KEYS[1])
    return 0
end
local expected = tonumber(ARGV[2])
if expected > 0 and redis.call('ZCARD', KEYS[1]) ~= expected then
    redis.call('DEL', KEYS[1])
    return -1
end
if expected > 0 then
    redis.call('RENAME', KEYS[1], KEYS[2])
    redis.call('PERSIST', KEYS[2])
else
    redis.call('DEL', KEYS[2])
end
return 1
"""

# KEYS: session hash. ARGV: field, value, ...
_REPLACE_HASH = """
redis.call('DEL', KEYS[1])
redis.call('HSET', KEYS[1], unpack(ARGV))
return 1
"""


class Commit(Protocol):
    """A restored session ready to be swapped in (redis_store.SessionCommit)."""

    @property
    def session_id(self) -> str: ...
    @property
    def fields(self) -> Mapping[str, str]: ...
    @property
    def staged_members(self) -> int: ...


def swap_in(
    client: redis.cluster.RedisCluster,
    keys: RedisKeys,
    run_id: str,
    commits: Sequence[Commit],
    *,
    force: bool,
) -> list[int]:
    """Swap staged sessions in, key by key in the safe order; the answer per session.

    1 swapped in, 0 exists (force off), -1 the staging key was incomplete.
    Errors (a node down) propagate: what was written stays written, see the
    module's docstring for what a reader can see then.
    """
    answers = [1] * len(commits) if force else _existing(client, keys, run_id, commits)
    pipe = client.pipeline(transaction=False)  # type: ignore[no-untyped-call]
    swapping = [i for i, answer in enumerate(answers) if answer == 1]
    for i in swapping:
        commit = commits[i]
        staging = keys.restore_staging_in_slot(run_id, commit.session_id)
        messages = keys.messages(commit.session_id)
        flag = "1" if force else "0"
        pipe.execute_command(
            "EVAL", _SWAP_MESSAGES, 2, staging, messages, flag, commit.staged_members
        )
    for i, answer in zip(swapping, pipe.execute(), strict=True):
        answers[i] = int(answer)
    swapped = [commits[i] for i, answer in enumerate(answers) if answer == 1]
    if not swapped:
        return answers
    pipe = client.pipeline(transaction=False)  # type: ignore[no-untyped-call]
    for commit in swapped:
        pairs = [part for item in commit.fields.items() for part in item]
        pipe.execute_command("EVAL", _REPLACE_HASH, 1, keys.session(commit.session_id), *pairs)
    pipe.execute()
    # Last: the sessions a reader lists appear only once all their keys are in place.
    client.sadd(keys.sessions, *(commit.session_id for commit in swapped))
    return answers


def _existing(
    client: redis.cluster.RedisCluster,
    keys: RedisKeys,
    run_id: str,
    commits: Sequence[Commit],
) -> list[int]:
    """1 for a session whose hash does not exist, 0 for one whose hash does.

    The messages key is checked again, atomically with its swap, by the
    swap's script. The staging keys of the sessions that exist are deleted.
    """
    pipe = client.pipeline(transaction=False)  # type: ignore[no-untyped-call]
    for commit in commits:
        pipe.exists(keys.session(commit.session_id))
    answers = [0 if found else 1 for found in pipe.execute()]
    left = [c.session_id for c, answer in zip(commits, answers, strict=True) if answer == 0]
    if left:
        client.delete(*(keys.restore_staging_in_slot(run_id, sid) for sid in left))
    return answers
