"""continuous_pending against a real PostgreSQL and Redis: marking, claiming, releasing, draining.

The property that matters: a change seen while its session's backup runs keeps the
session pending (never lost between "read" and "mark clean"), and a claim whose
drain is gone can be taken at once.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

import psycopg

from tests.factories import message, session_fields, write_session
from worker import continuous, runs
from worker.sharding import shard_of


def _rows(conn: psycopg.Connection[Any]) -> dict[str, tuple[Any, ...]]:
    cur = conn.execute(
        "SELECT session_id::text, claimed_by, changed_at, changed_again, retry_after "
        "FROM continuous_pending"
    )
    return {row[0]: row[1:] for row in cur.fetchall()}


def test_a_change_seen_during_a_backup_keeps_the_session_pending(services, pg_conn):
    pg = services.pg
    sid = "6f1c0a52-0000-4000-8000-000000000001"
    first = datetime.now(UTC) - timedelta(seconds=5)
    pg.mark_pending({sid: (0, first)})
    pg.mark_pending(
        {sid: (0, first + timedelta(seconds=3))}
    )  # a later change: one row, oldest kept
    assert _rows(pg_conn)[sid][1] == first

    with runs.owning(pg, "drain:a") as mine:
        assert mine
        assert pg.claim_pending(0, "drain:a", 10) == [sid]
        assert pg.claim_pending(0, "drain:b", 10) == []  # claimed by a live drain
        again = datetime.now(UTC)
        pg.mark_pending({sid: (0, again)})  # written while the backup runs
        row = _rows(pg_conn)[sid]
        assert row[0] == "drain:a"
        assert row[1] == first  # the oldest unsaved change is still the first
        assert row[2] == again
        pg.release_done("drain:a", [sid], pause_s=1.0)

    claimed_by, changed_at, changed_again, retry_after = _rows(pg_conn)[sid]
    assert claimed_by is None
    assert changed_at == again  # pending from the change the backup may have missed
    assert changed_again is None
    assert retry_after > datetime.now(UTC)  # after the pause
    assert pg.claim_pending(0, "drain:c", 10) == []
    pg_conn.execute("UPDATE continuous_pending SET retry_after = now()")
    with runs.owning(pg, "drain:c"):
        assert pg.claim_pending(0, "drain:c", 10) == [sid]
        pg.release_done("drain:c", [sid], pause_s=1.0)
    assert _rows(pg_conn) == {}  # nothing changed during that one: done


def test_claims_of_a_drain_that_is_gone_are_taken_at_once(services, pg_conn):
    pg = services.pg
    sid = "6f1c0a52-0000-4000-8000-000000000002"
    pg.mark_pending({sid: (1, datetime.now(UTC))})
    # Claimed by a drain whose owner lock nobody holds (its worker died).
    assert pg.claim_pending(1, "drain:dead", 10) == [sid]
    assert pg.drainable_shards() == [1]
    with runs.owning(pg, "drain:alive"):
        assert pg.claim_pending(1, "drain:alive", 10) == [sid]
        assert pg.drainable_shards() == []
        pg.release_failed("drain:alive", [sid], failed=False, backoff_s=0)
        assert pg.drainable_shards() == [1]  # given back at once


def test_a_drain_backs_sessions_up_without_a_run_record(services, redis_client, keys, pg_conn):
    sid = write_session(redis_client, keys, session_fields(), [])
    redis_client.zadd(keys.messages(sid), {b"x": 0})  # kept aside: not a JSON message
    sid2 = session_fields()["id"]
    write_session(redis_client, keys, session_fields(sid2), [message(sid2, i) for i in range(3)])
    shards = services.settings.backup_shards
    now = datetime.now(UTC)
    services.pg.mark_pending({s: (shard_of(s, shards), now) for s in (sid, sid2)})
    reports = [continuous.drain(services, n) for n in range(shards)]
    assert sum(r.sessions for r in reports) == 2
    assert sum(r.messages for r in reports) == 3
    assert sum(r.kept for r in reports) == 1
    assert _rows(pg_conn) == {}
    assert pg_conn.execute("SELECT count(*) FROM persistence_snapshots").fetchone() == (0,)
    activity = pg_conn.execute(
        "SELECT sum(backups), sum(sessions), sum(messages), sum(kept_records) "
        "FROM continuous_activity"
    ).fetchone()
    assert activity == (len({shard_of(s, shards) for s in (sid, sid2)}), 2, 3, 1)
    kept = pg_conn.execute(
        "SELECT count(*) FROM persistence_kept_records WHERE session_id = %s", (sid,)
    ).fetchone()
    assert kept == (1,)

    # Written again just after its backup: it waits for the rest of the pause.
    services.pg.mark_pending({sid2: (shard_of(sid2, shards), datetime.now(UTC))}, pause_s=60)
    retry_after = _rows(pg_conn)[sid2][3]
    assert retry_after > datetime.now(UTC) + timedelta(seconds=50)
    services.pg.mark_pending({sid: (shard_of(sid, shards), datetime.now(UTC))}, pause_s=0)
    assert _rows(pg_conn)[sid][3] is None
