"""Verify of a session bigger than what it holds while the backup's side is staged.

With the defaults a user gets: no threshold lowered, no hold shortened. The
session has more messages than VerifyStaging.HOLD_WHILE_STAGING, so its first
rows are held while PostgreSQL stages the backup's side, then sent when the
hold is full, and the rest go in slices; the differences are placed in the
first page, at the hold's edge and in the last page, and each must be found
exactly once.
"""

from __future__ import annotations

import json

from tests.factories import add_messages, message, new_id, session_fields, write_session
from tests.integration.helpers import backup_run, results_by_session, verify_run
from worker import verify
from worker.models import RunStatus, SessionStatus
from worker.pg_store import VerifyStaging

COUNT = VerifyStaging.HOLD_WHILE_STAGING + 1500


def _member(msg: dict) -> bytes:
    return json.dumps(msg, separators=(",", ":"), ensure_ascii=False).encode()


def test_a_session_past_the_hold_is_compared_message_by_message(services, redis_client, keys):
    assert COUNT >= verify.STAGE_BACKUP_FROM  # the staged path, by default
    sid = new_id()
    msgs = [message(sid, i) for i in range(COUNT)]
    write_session(redis_client, keys, session_fields(sid), msgs)
    backup_run(services, session_id=sid)

    run = verify_run(services, session_id=sid)
    result = results_by_session(services, run)[sid]
    assert run.status is RunStatus.COMPLETED, run.error
    assert result.details["agrees"] is True
    assert result.details["messages_in_redis"] == result.details["messages_in_backup"] == COUNT

    # Edited: the first message, and the one right after the hold's edge.
    edited = [msgs[0], msgs[VerifyStaging.HOLD_WHILE_STAGING]]
    for old in edited:
        redis_client.zrem(keys.messages(sid), _member(old))
    add_messages(redis_client, keys, sid, [{**old, "content": "rewritten"} for old in edited])
    # Removed: one in the last page. Added: one after every other.
    removed = msgs[COUNT - 2]
    redis_client.zrem(keys.messages(sid), _member(removed))
    added = message(sid, COUNT)
    add_messages(redis_client, keys, sid, [added])

    run = verify_run(services, session_id=sid)
    result = results_by_session(services, run)[sid]
    details = result.details
    assert result.status is SessionStatus.DIFFERENT
    assert (details["different"], details["missing_from_redis"]) == (2, 1)
    assert details["missing_from_backup"] == 1
    assert sorted(details["examples"]["different"]) == sorted(m["id"] for m in edited)
    assert details["examples"]["missing_from_redis"] == [removed["id"]]
    assert details["examples"]["missing_from_backup"] == [added["id"]]
    assert (details["messages_in_redis"], details["messages_in_backup"]) == (COUNT, COUNT)
    assert details["kept_aside"] == 0
    assert details["backup_damaged"] is False
