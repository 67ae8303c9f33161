"""`dnd-client verify` and `dnd-client backup prune`, as a user types them."""

from __future__ import annotations

import re

import pytest

from tests.e2e.trust_helpers import (
    DIFFERENCES,
    OK,
    RUN_FAILED,
    USAGE,
    cli,
    cli_json,
    describe,
    one_error_line,
    seed,
)
from tests.factories import add_messages, message

# -- verify -------------------------------------------------------------------


def test_verify_exit_status_and_json(env, redis_client, keys):
    ids = seed(env, redis_client, keys)

    agree = cli_json(env, "verify", "--all", "--local")
    assert agree["agree"] is True
    assert (agree["kind"], agree["scope"], agree["status"]) == ("verify", "all", "completed")
    assert (agree["session_count"], agree["failed_count"]) == (3, 0)
    assert agree["sessions"] == []
    assert cli(env, "verify", "--all", "--local", "--quick").returncode == OK

    extra = message(ids[1], 9)
    add_messages(redis_client, keys, ids[1], [extra])

    for args in ([], ["--quick"]):
        differ = cli_json(env, "verify", "--all", "--local", *args, status=DIFFERENCES)
        assert differ["agree"] is False
        assert differ["status"] == "failed"
        assert differ["failed_count"] == 1
        [session] = differ["sessions"]
        assert session["session_id"] == ids[1]
        assert session["status"] == "different"
        assert session["error"] == "1 message(s) missing from the backup"
        details = session["details"]
        assert (details["agrees"], details["missing_from_backup"]) == (False, 1)
        assert details["examples"] == {"missing_from_backup": [extra["id"]]}
        assert (details["messages_in_redis"], details["messages_in_backup"]) == (5, 4)

    one = cli_json(env, "verify", "--session", ids[0], "--local")
    assert (one["scope"], one["agree"], one["session_count"]) == ("session", True, 1)
    assert cli(env, "verify", "--session", ids[1], "--local").returncode == DIFFERENCES


def test_verify_table_lists_the_differing_session(env, redis_client, keys):
    ids = seed(env, redis_client, keys)
    redis_client.hset(keys.session(ids[2]), "name", "Renamed")

    done = cli(env, "verify", "--all", "--local")

    assert done.returncode == DIFFERENCES, describe(done)
    header, rows = done.stdout.split("\nsession ", 1)[1].split("\n", 1)
    assert header.split() == ["status", "what", "differs"]
    table = [line.split(None, 2) for line in rows.splitlines()[1:] if line.strip()]
    assert table == [[ids[2], "different", "fields differ: name"]], done.stdout
    assert not any(sid in done.stdout for sid in ids[:2])
    assert "1 session(s) differ" in done.stderr
    assert "Traceback" not in done.stderr


def test_verify_says_when_a_session_could_not_be_checked(env, redis_client, keys):
    ids = seed(env, redis_client, keys)
    redis_client.delete(keys.messages(ids[0]))
    redis_client.set(keys.messages(ids[0]), "not a zset")

    unreadable = cli_json(env, "verify", "--all", "--local", status=RUN_FAILED)
    assert {s["session_id"]: s["status"] for s in unreadable["sessions"]} == {ids[0]: "failed"}

    # Differences elsewhere are still found, and say so.
    redis_client.hset(keys.session(ids[1]), "name", "Renamed")
    both = cli_json(env, "verify", "--all", "--local", status=DIFFERENCES)
    assert {s["session_id"]: s["status"] for s in both["sessions"]} == {
        ids[0]: "failed",
        ids[1]: "different",
    }


@pytest.mark.parametrize(
    "args",
    [
        [],
        ["--all", "--session", "0b3c2d1e-0000-4000-8000-000000000000"],
        ["--session", "not-a-uuid"],
        ["--all", "--local", "--no-wait"],
    ],
)
def test_verify_bad_arguments(env, args):
    done = cli(env, "verify", *args)
    assert done.returncode == USAGE, describe(done)
    one_error_line(done)


# -- prune ----------------------------------------------------------------------


def test_prune_from_the_command_line(env, redis_client, keys, pg_conn):
    ids = seed(env, redis_client, keys, sessions=2)
    for index in range(2):
        add_messages(redis_client, keys, ids[0], [message(ids[0], 10 + index)])
        assert cli(env, "backup", "--all", "--local").returncode == OK
    assert cli(env, "verify", "--all", "--local").returncode == OK
    before = pg_conn.execute("SELECT count(*) FROM persistence_snapshots").fetchone()[0]
    assert before == 4

    done = cli(env, "backup", "prune", "--keep", "1", "--dry-run")
    assert done.returncode == OK, describe(done)
    rows = {
        re.split(r" {2,}", line.strip())[0]: line.split()[-1]
        for line in done.stdout.splitlines()[2:]
        if line.strip()
    }
    assert done.stdout.split()[:3] == ["would", "remove", "count"]
    assert rows == {"runs": "2", "session results": "4", "resolved kept records": "0"}

    dry = cli_json(env, "backup", "prune", "--keep", "1", "--dry-run")
    assert dry == {"runs": 2, "session_results": 4, "resolved_kept_records": 0, "dry_run": True}
    assert pg_conn.execute("SELECT count(*) FROM persistence_snapshots").fetchone()[0] == 4
    assert cli_json(env, "backup", "prune", "--older-than", "30d") == {
        "runs": 0,
        "session_results": 0,
        "resolved_kept_records": 0,
        "dry_run": False,
    }

    real = cli_json(env, "backup", "prune", "--keep", "1")
    assert real == {**dry, "dry_run": False}
    listed = cli_json(env, "backup", "list")
    assert sorted(r["kind"] for r in listed) == ["backup", "verify"]
    assert cli(env, "verify", "--all", "--local").returncode == OK


@pytest.mark.parametrize(
    "args",
    [
        [],
        ["--older-than", "30x"],
        ["--older-than=-1d"],
        ["--older-than", ""],
        ["--older-than", "1.5d"],
        ["--older-than", "d"],
        ["--older-than", "1000000d"],
        ["--older-than", "99999999999999w"],
        ["--keep", "-1"],
        ["--keep", "many"],
    ],
)
def test_prune_bad_arguments(env, args):
    done = cli(env, "backup", "prune", *args)
    assert done.returncode == USAGE, describe(done)
    one_error_line(done)
