"""History and point-in-time restores, on real PostgreSQL and Redis (--local runs).

The state "as of T" is what the last backup at or before T captured: a restore
as of T into a drill prefix must give exactly what a plain restore gave at T.
"""

from __future__ import annotations

import json
import threading
import time
import uuid
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from tests.conftest import delete_prefix
from tests.factories import add_messages, message, new_id, session_fields, write_session
from tests.integration.helpers import backup_run, rows, scalar
from worker.drill import run_drill, verify_target
from worker.errors import InvalidArgument
from worker.keys import RedisKeys
from worker.models import RestoreOptions, RunStatus, SessionStatus, VerifyOptions
from worker.records import parse_message, parse_session_hash
from worker.runner import run_local
from worker.runs import settle_moment


def dump(client: Any, prefix: str) -> dict[str, Any]:
    """Everything under a prefix: each session's hash and scored members, and the set."""
    keys = RedisKeys(prefix)
    listed = sorted(m.decode() for m in client.smembers(keys.sessions))
    found: dict[str, Any] = {"sessions": listed}
    for sid in listed:
        fields = client.hgetall(keys.session(sid))
        members = client.zrange(keys.messages(sid), 0, -1, withscores=True)
        found[sid] = {
            "hash": {k.decode(): v.decode() for k, v in fields.items()},
            "messages": sorted((m.decode(), s) for m, s in members),
        }
    return found


def state(client: Any, prefix: str, *, live_only: bool = False) -> dict[str, Any]:
    """What the sessions under a prefix hold, parsed: each session's row, its messages
    and their scores (so the application's own JSON and a restore's compare)."""
    keys = RedisKeys(prefix)
    found = {}
    for member in client.smembers(keys.sessions):
        sid = member.decode()
        session, _ = parse_session_hash(sid, client.hgetall(keys.session(sid)))
        if live_only and session.deleted_at is not None:
            continue
        messages = sorted(
            (parse_message(sid, raw)[0], score)
            for raw, score in client.zrange(keys.messages(sid), 0, -1, withscores=True)
        )
        found[sid] = (session, messages)
    return found


def drill(services: Any, prefix: str, as_of: str | None = None, session_id: str | None = None):
    return run_drill(
        services, target_url=None, target_prefix=prefix, as_of=as_of, session_id=session_id
    )


def moment() -> str:
    at = datetime.now(UTC)
    time.sleep(0.01)
    return at.isoformat()


@pytest.fixture
def drills(redis_server_url):
    """A key prefix for drill targets, apart from the live one; deleted afterwards."""
    prefix = f"dndtest-drill:{uuid.uuid4().hex[:12]}:"
    yield prefix
    delete_prefix(redis_server_url, prefix)


@pytest.fixture
def table(redis_client, keys):
    """Four sessions with messages, backed up: A (renamed later), B (half deleted),
    C (edited in place), D (soft-deleted)."""
    ids = {}
    for name, count in (("a", 4), ("b", 10), ("c", 5), ("d", 3)):
        sid = new_id()
        msgs = [message(sid, i) for i in range(count)]
        write_session(redis_client, keys, session_fields(sid, name=f"table {name}"), msgs)
        ids[name] = (sid, msgs)
    return ids


def damage(redis_client, keys, table) -> None:
    """The faulty client of the issue: renames, deletes half, edits in place, soft-deletes."""
    sid_a = table["a"][0]
    redis_client.hset(keys.session(sid_a), "name", "renamed by a bug")
    sid_b, msgs_b = table["b"]
    for item in msgs_b[::2]:
        redis_client.zrem(keys.messages(sid_b), json.dumps(item, separators=(",", ":")))
    sid_c, msgs_c = table["c"]
    for item in msgs_c[:2]:
        redis_client.zrem(keys.messages(sid_c), json.dumps(item, separators=(",", ":")))
        add_messages(redis_client, keys, sid_c, [{**item, "content": "griefed"}])
    redis_client.hset(keys.session(table["d"][0]), "deleted_at", "2026-03-01T00:00:00Z")


@pytest.mark.usefixtures("verify_paths")  # verify as of a moment: both paths
def test_restore_as_of_gives_the_state_then(services, redis_client, keys, table, drills):
    backup_run(services)
    at_t0 = drill(services, f"{drills}t0:")  # the latest backup, at T0
    live_t0 = state(redis_client, keys.prefix)
    t0 = moment()
    damage(redis_client, keys, table)
    # Edits in place keep every count: only a full backup reads them (continuous
    # backups run the same engine; the scenario with workers does the same).
    assert backup_run(services, full=True).status is RunStatus.COMPLETED
    t1 = moment()
    live_t1 = state(redis_client, keys.prefix, live_only=True)
    at_t1 = drill(services, f"{drills}t1:")

    past = drill(services, f"{drills}p0:", as_of=t0)
    assert past.restore.as_of == datetime.fromisoformat(t0)
    assert past.verify.status is RunStatus.COMPLETED, past.verify.error
    assert dump(redis_client, f"{drills}p0:") == dump(redis_client, f"{drills}t0:")
    assert state(redis_client, f"{drills}p0:") == live_t0
    assert table["d"][0] in dump(redis_client, f"{drills}p0:")["sessions"]

    # As of T1: the damaged state (a plain restore brings back every message
    # ever backed up: nothing is deleted from the backup).
    later = drill(services, f"{drills}p1:", as_of=t1)
    assert later.verify.status is RunStatus.COMPLETED, later.verify.error
    assert state(redis_client, f"{drills}p1:") == live_t1
    assert table["d"][0] not in live_t1
    assert at_t0.restore.session_count == 4
    assert at_t1.restore.session_count == 3

    # The current tables still serve the current state, and keep what Redis lost.
    sid_b = table["b"][0]
    assert scalar(services.pg.conn, "SELECT count(*) FROM client_messages"
                  " WHERE session_id = %s", sid_b) == 10  # fmt: skip
    # verify as of T0 proves the T0 copy, and tells the T1 copy apart.
    ok = verify_target(
        services, VerifyOptions(as_of=t0), target_url=None, target_prefix=f"{drills}p0:"
    )
    assert ok.status is RunStatus.COMPLETED, ok.error
    bad = verify_target(
        services, VerifyOptions(as_of=t0), target_url=None, target_prefix=f"{drills}p1:",
        session_id=sid_b,
    )  # fmt: skip
    assert bad.status is RunStatus.FAILED


def test_history_lists_what_changed(services, redis_client, keys, table):
    backup_run(services)
    damage(redis_client, keys, table)
    backup_run(services, full=True)
    found = services.pg.session_history(table["b"][0])
    assert [c["removed"] for c in found["captures"]] == [0, 5]
    found = services.pg.session_history(table["c"][0])
    assert [c["edited"] for c in found["captures"]] == [0, 2]
    assert [m["change"] for m in found["messages"]] == ["edited", "edited"]
    found = services.pg.session_history(table["a"][0])
    assert [c["hash_changed"] for c in found["captures"]] == [True, True]
    assert [v["name"] for v in found["versions"]] == ["table a"]


def test_a_late_message_belongs_to_the_state_from_its_capture(services, redis_client, keys, drills):
    sid = new_id()
    msgs = [message(sid, i) for i in range(5)]
    write_session(redis_client, keys, session_fields(sid), msgs)
    backup_run(services)
    t1 = moment()
    late = message(sid, 2, created_at=datetime(2026, 2, 12, 10, 0, 1, 500000, tzinfo=UTC))
    add_messages(redis_client, keys, sid, [late])
    backup_run(services)
    t2 = moment()
    captures = services.pg.session_history(sid)["captures"]
    assert [c["late"] for c in captures] == [0, 1]

    drill(services, f"{drills}x1:", as_of=t1, session_id=sid)
    drill(services, f"{drills}x2:", as_of=t2, session_id=sid)
    ids_at = {
        p: {json.loads(m)["id"] for m, _ in dump(redis_client, f"{drills}{p}:")[sid]["messages"]}
        for p in ("x1", "x2")
    }  # fmt: skip
    assert late["id"] not in ids_at["x1"]
    assert len(ids_at["x1"]) == 5
    assert late["id"] in ids_at["x2"]
    assert len(ids_at["x2"]) == 6


def test_prune_folds_history_and_refuses_older_restores(
    services, redis_client, keys, table, drills
):
    backup_run(services)
    damage(redis_client, keys, table)
    backup_run(services, full=True)
    t1 = moment()
    drill(services, f"{drills}before:", as_of=t1)
    folded = services.pg.fold_history(datetime.fromisoformat(t1))
    assert folded["sessions"] == 4
    assert folded["captures"] == 4
    drill(services, f"{drills}after:", as_of=t1)
    assert dump(redis_client, f"{drills}after:") == dump(redis_client, f"{drills}before:")
    earlier = (datetime.fromisoformat(t1) - timedelta(seconds=1)).isoformat()
    with pytest.raises(InvalidArgument, match="oldest restorable moment is"):
        settle_moment(services.pg, RestoreOptions(as_of=earlier))


def test_a_fold_cut_on_a_capture_keeps_that_capture(services, redis_client, keys, table, drills):
    """A cut that falls exactly on a session's capture: that capture is the state then."""
    backup_run(services)
    damage(redis_client, keys, table)
    backup_run(services, full=True)
    sid_b = table["b"][0]
    query = "SELECT max(captured_at) FROM history_captures WHERE session_id = %s"
    cut = scalar(services.pg.conn, query, sid_b)
    drill(services, f"{drills}before:", as_of=cut.isoformat())
    folded = services.pg.fold_history(cut)
    assert folded["captures"] >= 1  # session b's first capture went
    drill(services, f"{drills}after:", as_of=cut.isoformat())
    assert dump(redis_client, f"{drills}after:") == dump(redis_client, f"{drills}before:")
    oldest = "SELECT min(captured_at) FROM history_captures WHERE session_id = %s"
    assert scalar(services.pg.conn, oldest, sid_b) == cut


@pytest.mark.parametrize(
    ("as_of", "message"),
    [
        ("2999-01-01T00:00:00Z", "in the future"),
        ("yesterday", "cannot read"),
        ("123e4567-e89b-12d3-a456-426614174000", "no run"),
    ],
)
def test_bad_moments_are_refused(services, table, as_of, message):
    backup_run(services)
    with pytest.raises(InvalidArgument, match=message):
        settle_moment(services.pg, RestoreOptions(as_of=as_of))


def test_a_run_id_means_the_moment_it_finished(services, table):
    run = backup_run(services)
    settled = settle_moment(services.pg, RestoreOptions(as_of=run.id))
    assert settled.moment == run.finished_at


def test_forced_restore_keeps_every_write_of_a_writer(services, redis_client, keys, table):
    """Writes made while a forced restore runs are in the live session or in history."""
    sid, _msgs = table["b"]
    backup_run(services)
    t0 = moment()
    written: list[str] = []
    stop = threading.Event()

    def writer() -> None:
        index = 1000
        while not stop.is_set():
            item = message(sid, index, created_at=datetime.now(UTC))
            add_messages(redis_client, keys, sid, [item])
            written.append(item["id"])
            index += 1

    thread = threading.Thread(target=writer)
    thread.start()
    try:
        time.sleep(0.2)
        run = run_local(services, RestoreOptions(force=True, as_of=t0), session_ids=[sid])
        time.sleep(0.1)
    finally:
        stop.set()
        thread.join()
    assert run.status is RunStatus.COMPLETED, run.error
    [result] = services.pg.run_results(run.id)
    assert result.status is SessionStatus.COMPLETED
    undo = result.details["undo_as_of"]
    live = {json.loads(m)["id"] for m in redis_client.zrange(keys.messages(sid), 0, -1)}
    kept = {
        r["id"]
        for r in rows(
            services.pg.conn,
            "SELECT id::text AS id FROM history_messages_as_of(ARRAY[%s]::uuid[], %s)",
            sid,
            undo,
        )
    }
    assert written
    assert len(written) > 10
    lost = [w for w in written if w not in live and w not in kept]
    assert lost == []
    # Both sides hold writes: some were replaced (history), some came after the swap.
    assert any(w in kept and w not in live for w in written)
    assert not redis_client.keys(f"{keys.prefix}restore-replaced:*")
