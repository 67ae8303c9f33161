"""Restore drills (`dnd-client restore --target-prefix / --target-redis`), as a user types them."""

from __future__ import annotations

import uuid
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import pytest
import redis

from tests.conftest import delete_prefix
from tests.e2e.trust_helpers import (
    DIFFERENCES,
    OK,
    UNAVAILABLE,
    USAGE,
    cli,
    cli_json,
    describe,
    keys_under,
    one_error_line,
    result_statuses,
    runs_of,
    seed,
)
from tests.factories import make_sessions, session_fields, write_session
from worker.keys import RedisKeys


@pytest.fixture
def drill_prefix(redis_server_url):
    prefix = f"dndtest:drill:{uuid.uuid4().hex[:12]}:"
    yield prefix
    delete_prefix(redis_server_url, prefix)


def test_drill_into_another_prefix(env, redis_client, keys, key_prefix, drill_prefix, pg_conn):
    ids = seed(env, redis_client, keys)
    live = keys_under(redis_client, key_prefix)
    target = RedisKeys(drill_prefix)

    report = cli_json(env, "restore", "--all", "--target-prefix", drill_prefix)

    assert drill_prefix in report["target"]
    assert report["restore"]["status"] == "completed"
    assert report["restore"]["session_count"] == 3
    assert report["verify"]["agree"] is True
    assert report["verify"]["session_count"] == 3
    assert report["cleaned_up_keys"] is None
    assert {m.decode() for m in redis_client.smembers(target.sessions)} == set(ids)
    for sid in ids:
        assert redis_client.hget(target.session(sid), "id") == sid.encode()
        assert redis_client.zcard(target.messages(sid)) == 4
    assert keys_under(redis_client, key_prefix) == live
    [restore] = runs_of(pg_conn, "restore")
    [verify] = runs_of(pg_conn, "verify")
    for run, payload in ((restore, report["restore"]), (verify, report["verify"])):
        assert run["id"] == payload["id"]
        assert run["status"] == "completed"
        assert run["details"]["drill"] is True
        assert drill_prefix in run["details"]["target"]
    assert set(result_statuses(pg_conn, restore["id"]).values()) == {"completed"}

    # Again without --force: the target's sessions are there, so skipped.
    done = cli(env, "restore", "--all", "--target-prefix", drill_prefix)
    assert done.returncode == OK, describe(done)
    assert "Redis and the backup agree" in done.stderr
    second = runs_of(pg_conn, "restore")[-1]
    assert set(result_statuses(pg_conn, second["id"]).values()) == {"skipped"}
    assert len(runs_of(pg_conn, "verify")) == 2

    # --force and --cleanup: restored, verified, then every target key removed.
    in_target = len(keys_under(redis_client, drill_prefix))
    report = cli_json(
        env, "restore", "--all", "--target-prefix", drill_prefix, "--force", "--cleanup"
    )
    assert report["verify"]["agree"] is True
    assert report["restore"]["forced"] is True
    assert report["cleaned_up_keys"] == in_target == 1 + 2 * 3
    assert keys_under(redis_client, drill_prefix) == {}
    assert keys_under(redis_client, key_prefix) == live


def test_drill_that_finds_a_difference(env, redis_client, keys, key_prefix, drill_prefix, pg_conn):
    ids = seed(env, redis_client, keys, sessions=2)
    pg_conn.execute(
        "UPDATE client_messages SET content = 'tampered' WHERE id ="
        " (SELECT id FROM client_messages WHERE session_id = %s LIMIT 1)",
        (ids[0],),
    )
    live = keys_under(redis_client, key_prefix)

    report = cli_json(
        env, "restore", "--all", "--target-prefix", drill_prefix, "--cleanup", status=DIFFERENCES
    )

    # What was restored is what PostgreSQL holds; its checksum says it was changed.
    assert report["restore"]["status"] == "completed"
    assert report["verify"]["agree"] is False
    [session] = report["verify"]["sessions"]
    assert session["session_id"] == ids[0]
    assert session["details"]["backup_damaged"] is True
    assert keys_under(redis_client, drill_prefix) == {}
    assert keys_under(redis_client, key_prefix) == live


def test_drill_into_another_database_of_the_same_server(
    env, redis_client, keys, key_prefix, redis_server_url
):
    ids = seed(env, redis_client, keys, sessions=2)
    parts = urlsplit(redis_server_url)
    database = parts.path.strip("/") or "0"
    other_url = urlunsplit(parts._replace(path="/1" if database != "1" else "/2"))
    other = redis.Redis.from_url(other_url)
    live = keys_under(redis_client, key_prefix)
    try:
        report = cli_json(env, "restore", "--all", "--target-redis", other_url)
        assert report["verify"]["agree"] is True
        members: Any = other.smembers(keys.sessions)
        assert {m.decode() for m in members} == set(ids)
        report = cli_json(
            env, "restore", "--all", "--target-redis", other_url, "--force", "--cleanup"
        )
        assert report["cleaned_up_keys"] == 1 + 2 * 2
        assert keys_under(other, key_prefix) == {}
    finally:
        delete_prefix(other_url, key_prefix)
        other.close()
    assert keys_under(redis_client, key_prefix) == live


def _same_server_urls(url: str) -> list[str]:
    """The live Redis under other names: localhost for 127.0.0.1, the database as a query."""
    parts = urlsplit(url)
    urls = [url]
    database = parts.path.strip("/") or "0"
    if database == "0":
        urls.append(urlunsplit(parts._replace(path="")))
    # redis-py takes ?db= over the path: this is the live database too.
    urls.append(urlunsplit(parts._replace(path="/7", query=f"db={database}")))
    host = parts.hostname or ""
    alias = {"127.0.0.1": "localhost", "localhost": "127.0.0.1"}.get(host)
    if alias:
        urls.append(url.replace(host, alias, 1))
    return urls


def test_drill_refuses_the_live_data(
    env, redis_client, keys, key_prefix, redis_server_url, pg_conn
):
    seed(env, redis_client, keys, sessions=2)
    live = keys_under(redis_client, key_prefix)
    runs_before = pg_conn.execute("SELECT count(*) FROM persistence_snapshots").fetchone()

    # The live prefix, or one whose keys overlap it (--cleanup deletes `{prefix}*`).
    attempts = [
        ["--target-prefix", p] for p in (key_prefix, key_prefix[:-1], "", f"{key_prefix}session:")
    ]
    attempts += [["--target-redis", url] for url in _same_server_urls(redis_server_url)]
    attempts += [
        ["--target-redis", url, "--target-prefix", key_prefix]
        for url in _same_server_urls(redis_server_url)
    ]
    for target in attempts:
        done = cli(env, "restore", "--all", "--force", *target)
        assert done.returncode == USAGE, f"{target}: {describe(done)}"
        assert "live data" in one_error_line(done)
        assert done.stdout == ""

    assert keys_under(redis_client, key_prefix) == live
    assert pg_conn.execute("SELECT count(*) FROM persistence_snapshots").fetchone() == runs_before


@pytest.mark.parametrize(
    "args",
    [
        ["--target-redis", "http://127.0.0.1:6379/0"],
        ["--target-prefix", "drill*"],
        ["--target-prefix", "drill {x}"],
        ["--cleanup", "--local"],
        ["--target-prefix", "drill:", "--no-wait"],
    ],
)
def test_drill_bad_arguments(env, args):
    done = cli(env, "restore", "--all", *args)
    assert done.returncode == USAGE, describe(done)
    one_error_line(done)


def test_drill_into_a_redis_that_does_not_answer(env, redis_client, keys, pg_conn):
    seed(env, redis_client, keys, sessions=1)

    done = cli(
        env,
        "restore",
        "--all",
        "--target-redis",
        "redis://:s3cret@127.0.0.1:1/0",
        "--target-prefix",
        "drill:",
    )

    assert done.returncode == UNAVAILABLE, describe(done)
    line = one_error_line(done, "127.0.0.1:1", "--target-redis")
    assert "REDIS_URL" not in line
    assert "s3cret" not in done.stdout + done.stderr
    assert "running" not in {r["status"] for r in runs_of(pg_conn, "restore")}


def test_drill_leaves_out_soft_deleted_sessions(env, redis_client, keys, drill_prefix):
    sid = write_session(redis_client, keys, session_fields(deleted_at="2026-02-13T00:00:00Z"), [])
    make_sessions(redis_client, keys, 1, 0)
    assert cli(env, "backup", "--all", "--local").returncode == OK

    report = cli_json(env, "restore", "--all", "--target-prefix", drill_prefix)

    assert report["restore"]["details"]["soft_deleted_not_restored"] == 1
    assert report["verify"]["agree"] is True
    assert not redis_client.sismember(RedisKeys(drill_prefix).sessions, sid)


def test_drill_of_one_session(env, redis_client, keys, key_prefix, drill_prefix, pg_conn):
    ids = seed(env, redis_client, keys, sessions=2)
    live = keys_under(redis_client, key_prefix)

    report = cli_json(env, "restore", "--session", ids[1], "--target-prefix", drill_prefix)

    assert (report["restore"]["scope"], report["verify"]["scope"]) == ("session", "session")
    assert report["verify"]["agree"] is True
    target = RedisKeys(drill_prefix)
    assert redis_client.smembers(target.sessions) == {ids[1].encode()}
    assert redis_client.zcard(target.messages(ids[1])) == 4
    assert keys_under(redis_client, key_prefix) == live
    [verify] = runs_of(pg_conn, "verify")
    assert set(result_statuses(pg_conn, verify["id"])) == {ids[1]}
