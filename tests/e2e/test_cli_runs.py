"""`dnd-client backup | restore | kept ...` as a user types them, with --local (no workers).

Data goes to stdout (a table or JSON), status lines and the progress bar to
stderr; exit statuses are 0 ok, 3 partial (records kept aside), 4 failed.
"""

from __future__ import annotations

import json
import re
import sys
from datetime import datetime

from tests.e2e.cli_helpers import (
    MISSING_ID,
    OK,
    PARTIAL,
    RUN_FAILED,
    assert_one_error_line,
    cli,
    cli_bytes,
    cli_json,
    describe,
    stderr_on_tty,
    stored_counts,
    summary,
    table,
)
from tests.factories import (
    BASE_TIME,
    add_messages,
    iso,
    make_sessions,
    message,
    new_id,
    session_fields,
    write_session,
)
from tests.processes import REPO, base_env

RUN_KEYS = {
    "id",
    "kind",
    "scope",
    "status",
    "session_count",
    "message_count",
    "kept_count",
    "failed_count",
    "duration_ms",
    "created_at",
    "finished_at",
    "error",
}
DURATION = re.compile(r"\d+ ms|\d+\.\d s|\d+m\d\ds|\d+h\d\dm\d\ds")
# A message no JSON parser accepts, with a NUL and bytes that are not UTF-8.
BAD_MEMBER = b'{"id": "\x00\xff\xfe", "role": '


def _with_bad_records(redis_client, keys) -> tuple[list[str], str]:
    """Two good sessions, one with a broken message, and a set member that is no UUID."""
    good = make_sessions(redis_client, keys, 2, 3)
    sid = new_id()
    write_session(redis_client, keys, session_fields(sid), [message(sid, 0)])
    redis_client.zadd(keys.messages(sid), {BAD_MEMBER: 1})
    redis_client.sadd(keys.sessions, "not-a-session-id")
    return good, sid


def test_backup_all_prints_its_figures_and_nothing_else(env, redis_client, keys, pg_conn):
    make_sessions(redis_client, keys, 3, 4)

    done = cli(env, "backup", "--all", "--local")

    assert done.returncode == OK, describe(done)
    figures = summary(done.stdout)
    assert figures["status"] == "completed"
    assert figures["kind"] == "backup (all sessions)"
    assert (figures["sessions"], figures["messages"], figures["records kept aside"]) == (
        "3",
        "12",
        "0",
    )
    assert DURATION.fullmatch(figures["duration"]), figures
    assert done.stderr == ""  # piped: no progress bar, no status line
    assert stored_counts(pg_conn) == (3, 12)


def test_backup_all_partial_exits_3_and_says_where_the_records_are(
    env, redis_client, keys, pg_conn
):
    _with_bad_records(redis_client, keys)

    table_run = cli(env, "backup", "--all", "--local")
    assert table_run.returncode == PARTIAL, describe(table_run)
    figures = summary(table_run.stdout)
    assert (
        figures["status"],
        figures["sessions"],
        figures["messages"],
        figures["records kept aside"],
    ) == ("partial", "3", "7", "2")
    assert "dnd-client kept list" in table_run.stderr
    assert "dnd-client kept list" not in table_run.stdout

    # --full reads everything again: the same two records are kept aside, and
    # no message is new.
    run = cli_json(env, "backup", "--all", "--local", "--full", status=PARTIAL)
    assert set(run) >= RUN_KEYS | {"failed_sessions"}
    assert (run["kind"], run["scope"], run["status"]) == ("backup", "all", "partial")
    assert (run["session_count"], run["message_count"], run["kept_count"]) == (3, 0, 2)
    assert isinstance(run["duration_ms"], int)
    assert run["failed_sessions"] == []
    assert stored_counts(pg_conn) == (3, 7)


def test_backup_one_session(env, redis_client, keys, pg_conn):
    wanted, other = make_sessions(redis_client, keys, 2, 5)

    # Upper case is how some people paste a UUID; the application's keys are lower case.
    run = cli_json(env, "backup", "--session", wanted.upper(), "--local")

    assert (run["scope"], run["status"], run["session_count"], run["message_count"]) == (
        "session",
        "completed",
        1,
        5,
    )
    assert run["details"]["session_id"] == wanted
    ids = [row[0] for row in pg_conn.execute("SELECT id::text FROM client_sessions")]
    assert ids == [wanted]
    assert other not in ids

    table_run = cli(env, "backup", "--session", wanted, "--local", "--full")
    assert table_run.returncode == OK, describe(table_run)
    assert summary(table_run.stdout)["kind"] == "backup (one session)"


def test_backup_of_a_missing_session_fails_with_4(env, redis_client, keys):
    make_sessions(redis_client, keys, 1, 1)

    done = cli(env, "backup", "--session", MISSING_ID, "--local")

    assert done.returncode == RUN_FAILED, describe(done)
    assert summary(done.stdout)["status"] == "failed"
    assert [r["failed session"] for r in table(done.stdout.split("\n\n", 1)[1])] == [MISSING_ID]
    assert_one_error_line(done, "backup failed", MISSING_ID, "not found in Redis")

    run = cli_json(env, "backup", "--session", MISSING_ID, "--local", status=RUN_FAILED)
    assert (run["status"], run["failed_count"]) == ("failed", 1)
    assert [s["session_id"] for s in run["failed_sessions"]] == [MISSING_ID]
    assert "not found" in run["failed_sessions"][0]["error"]


def test_backup_list_newest_first(env, redis_client, keys):
    [sid] = make_sessions(redis_client, keys, 1, 2)
    first = cli_json(env, "backup", "--all", "--local")["id"]
    second = cli_json(env, "restore", "--all", "--local")["id"]
    third = cli_json(env, "backup", "--session", sid, "--local")["id"]

    listed = cli(env, "backup", "list")
    assert listed.returncode == OK, describe(listed)
    rows = table(listed.stdout)
    assert [r["run"] for r in rows] == [third, second, first]
    assert [(r["kind"], r["scope"], r["status"]) for r in rows] == [
        ("backup", f"session {sid[:8]}", "completed"),
        ("restore", "all", "completed"),
        ("backup", "all", "completed"),
    ]

    assert [r["run"] for r in table(cli(env, "backup", "list", "--limit", "2").stdout)] == [
        third,
        second,
    ]
    assert [r["run"] for r in table(cli(env, "backup", "list", "--kind", "backup").stdout)] == [
        third,
        first,
    ]
    runs = cli_json(env, "backup", "list", "--kind", "restore")
    assert [r["id"] for r in runs] == [second]
    assert set(runs[0]) >= RUN_KEYS
    # DND_OUTPUT chooses the format too.
    via_env = cli({**env, "DND_OUTPUT": "json"}, "backup", "list", "--limit", "1")
    assert [r["id"] for r in json.loads(via_env.stdout)] == [third]


def test_backup_list_with_no_runs(env):
    done = cli(env, "backup", "list")
    assert done.returncode == OK, describe(done)
    assert table(done.stdout) == []
    assert "no runs yet" in done.stderr
    assert cli_json(env, "backup", "list") == []


def test_backup_show(env, redis_client, keys):
    good, bad_sid = _with_bad_records(redis_client, keys)
    run_id = cli_json(env, "backup", "--all", "--local", status=PARTIAL)["id"]

    shown = cli(env, "backup", "show", run_id)
    assert shown.returncode == PARTIAL, describe(shown)  # as the run ended
    assert summary(shown.stdout)["run"] == run_id
    problems = table(shown.stdout.split("\n\n", 1)[1])
    assert [(r["session"], r["status"], r["kept"]) for r in problems] == [(bad_sid, "partial", "1")]

    payload = cli_json(env, "backup", "show", run_id, status=PARTIAL)
    assert set(payload) >= RUN_KEYS | {"sessions"}
    assert (payload["id"], payload["kept_count"]) == (run_id, 2)
    assert [s["session_id"] for s in payload["sessions"]] == [bad_sid]

    everything = cli_json(env, "backup", "show", run_id, "--sessions", "all", status=PARTIAL)
    statuses = {s["session_id"]: s["status"] for s in everything["sessions"]}
    assert statuses == {good[0]: "completed", good[1]: "completed", bad_sid: "partial"}


def _as_read(redis_client, keys, sid: str) -> tuple[dict, dict]:
    """A session as the application reads it: (hash fields, messages by ID with scores).

    Restores write timestamps back as RFC 3339 in UTC and JSON compactly
    (docs/contract.md §1), so values are compared parsed, not byte for byte.
    """

    def parsed(key: str, value: str) -> object:
        if key in ("created_at", "updated_at", "deleted_at") and value:
            return datetime.fromisoformat(value)
        return json.loads(value) if key == "settings" else value

    fields = {
        k.decode(): parsed(k.decode(), v.decode())
        for k, v in redis_client.hgetall(keys.session(sid)).items()
    }
    messages = {}
    for member, score in redis_client.zrange(keys.messages(sid), 0, -1, withscores=True):
        data = json.loads(member)
        data["created_at"] = datetime.fromisoformat(data["created_at"])
        messages[data["id"]] = (data, score)
    return fields, messages


def test_restore_all(env, redis_client, keys, key_prefix, pg_conn):
    ids = make_sessions(redis_client, keys, 3, 4)
    gone = new_id()
    write_session(
        redis_client, keys, session_fields(gone, deleted_at=iso(BASE_TIME)), [message(gone, 0)]
    )
    assert cli(env, "backup", "--all", "--local").returncode == OK
    before = {sid: _as_read(redis_client, keys, sid) for sid in ids}
    redis_client.delete(*redis_client.keys(f"{key_prefix}*"))

    done = cli(env, "restore", "--all", "--local")

    assert done.returncode == OK, describe(done)
    figures = summary(done.stdout)
    assert (figures["kind"], figures["status"], figures["sessions"], figures["messages"]) == (
        "restore (all sessions)",
        "completed",
        "3",
        "12",
    )
    assert figures["soft-deleted (never restored)"] == "1"
    assert DURATION.fullmatch(figures["duration"]), figures
    for sid, written in before.items():
        assert _as_read(redis_client, keys, sid) == written
    assert not redis_client.exists(keys.session(gone))

    # They exist now: skipped without --force, replaced with it.
    again = cli_json(env, "restore", "--all", "--local")
    assert (again["status"], again["session_count"], again["message_count"]) == ("completed", 3, 0)
    assert again["details"]["skipped"] == 3
    # ...and the summary says so, rather than looking like a restore of nothing.
    table = cli(env, "restore", "--all", "--local")
    assert summary(table.stdout)["sessions skipped"] == "3"
    forced = cli_json(env, "restore", "--all", "--local", "--force")
    assert (forced["forced"], forced["message_count"]) == (True, 12)


def test_restore_one_session(env, redis_client, keys):
    sid, other = make_sessions(redis_client, keys, 2, 3)
    assert cli(env, "backup", "--all", "--local").returncode == OK
    redis_client.hset(keys.session(sid), "name", "renamed in Redis since")
    add_messages(redis_client, keys, sid, [message(sid, 99)])
    redis_client.hset(keys.session(other), "name", "left alone")

    kept = cli(env, "restore", "--session", sid, "--local")
    assert kept.returncode == OK, describe(kept)
    assert redis_client.hget(keys.session(sid), "name") == b"renamed in Redis since"

    forced = cli(env, "restore", "--session", sid, "--local", "--force")
    assert forced.returncode == OK, describe(forced)
    figures = summary(forced.stdout)
    assert (figures["kind"], figures["sessions"], figures["messages"]) == (
        "restore (one session), forced",
        "1",
        "3",
    )
    assert redis_client.hget(keys.session(sid), "name") == b"The Sunless Citadel"
    assert redis_client.zcard(keys.messages(sid)) == 3  # the never backed-up one is gone
    assert redis_client.hget(keys.session(other), "name") == b"left alone"


def test_restore_of_a_missing_session_fails_with_4(env):
    done = cli(env, "restore", "--session", MISSING_ID, "--local")
    assert done.returncode == RUN_FAILED, describe(done)
    assert summary(done.stdout)["failed sessions"] == "1"
    assert_one_error_line(done, "restore failed", MISSING_ID, "not found in PostgreSQL")

    run = cli_json(env, "restore", "--session", MISSING_ID, "--local", "--force", status=RUN_FAILED)
    assert (run["kind"], run["status"], run["forced"]) == ("restore", "failed", True)


def test_kept_list_show_and_resolve(env, redis_client, keys):
    _, bad_sid = _with_bad_records(redis_client, keys)
    assert cli(env, "backup", "--all", "--local").returncode == PARTIAL

    listed = cli(env, "kept", "list")
    assert listed.returncode == OK, describe(listed)
    assert {(r["kind"], r["session"]) for r in table(listed.stdout)} == {
        ("message", bad_sid),
        ("session_id", "not-a-session-id"),
    }
    records = cli_json(env, "kept", "list")
    [bad] = [r for r in records if r["kind"] == "message"]
    assert bad["redis_key"] == keys.messages(bad_sid)
    assert "JSON" in bad["reason"] or "UTF-8" in bad["reason"]

    raw = cli_bytes(env, "kept", "show", str(bad["id"]), "--raw")
    assert raw.returncode == OK, raw.stderr
    assert raw.stdout == BAD_MEMBER  # the exact bytes, NUL and invalid UTF-8 included

    shown = cli(env, "kept", "show", str(bad["id"]))
    assert shown.returncode == OK, describe(shown)
    fields = {r["field"]: r["value"] for r in table(shown.stdout)}
    assert (fields["id"], fields["session_id"]) == (str(bad["id"]), bad_sid)
    assert cli_json(env, "kept", "show", str(bad["id"]))["reason"] == bad["reason"]

    resolved = cli(env, "kept", "resolve", str(bad["id"]))
    assert resolved.returncode == OK, describe(resolved)
    assert "resolved 1 record(s)" in resolved.stderr
    assert [r["kind"] for r in cli_json(env, "kept", "list")] == ["session_id"]
    everything = {r["id"]: r for r in cli_json(env, "kept", "list", "--all")}
    assert everything[bad["id"]]["resolved_at"] is not None
    assert cli_json(env, "kept", "resolve", str(bad["id"])) == {"resolved": 0}


def test_progress_bar_on_a_terminal_and_none_when_piped(env, redis_client, keys):
    make_sessions(redis_client, keys, 400, 1)
    batched = {**env, "BACKUP_BATCH_SESSIONS": "50"}

    code, stdout, tty = stderr_on_tty(batched, "backup", "--all", "--local")
    assert code == OK, tty
    assert summary(stdout)["sessions"] == "400"
    assert "backing up" in tty
    assert "0/400" in tty
    assert "400/400" in tty
    # The bar moved batch by batch (50 sessions each).
    assert re.search(r"\[#+-+\]\s+(?:50|100|150|200|250|300|350)/400", tty), tty
    assert "\r" in tty

    code, _, tty = stderr_on_tty(batched, "restore", "--all", "--local", "--force")
    assert code == OK, tty
    assert "restoring" in tty
    assert "400/400" in tty

    piped = cli(batched, "backup", "--all", "--local", "--full")
    assert piped.returncode == OK, describe(piped)
    assert summary(piped.stdout)["sessions"] == "400"
    assert piped.stderr == ""


def test_python_m_worker_and_bin_dnd_client_agree(env, redis_client, keys):
    import subprocess

    make_sessions(redis_client, keys, 1, 1)
    assert cli(env, "backup", "--all", "--local").returncode == OK
    bin_listing = cli(env, "backup", "list", "-o", "json")
    module = subprocess.run(
        [sys.executable, "-m", "worker", "backup", "list", "-o", "json"],
        cwd=REPO,
        env=base_env(env),
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        stdin=subprocess.DEVNULL,
    )
    assert module.returncode == OK, describe(module)
    assert json.loads(module.stdout) == json.loads(bin_listing.stdout)
    assert len(json.loads(module.stdout)) == 1
