"""`dnd-client migrate up | down | status`, and the plain `yoyo` command, on an empty database."""

from __future__ import annotations

import subprocess

import pytest

from tests.e2e.cli_helpers import (
    OK,
    SCHEMA,
    assert_one_error_line,
    cli,
    cli_json,
    describe,
    migration_ids,
    stdin_on_tty,
    table,
    table_exists,
    venv_script,
)
from tests.factories import make_sessions
from tests.processes import REPO, base_env


@pytest.fixture
def db_env(empty_database_url: str) -> dict[str, str]:
    return {"DATABASE_URL": empty_database_url}


def test_status_lists_pending_then_applied(db_env, empty_database_url):
    ids = migration_ids()
    assert len(ids) >= 5

    before = cli(db_env, "migrate", "status")
    assert before.returncode == OK, describe(before)
    assert [(r["migration"], r["state"], r["applied at"]) for r in table(before.stdout)] == [
        (m, "pending", "-") for m in ids
    ]
    assert f"{len(ids)} pending: run `dnd-client migrate up`" in before.stderr
    assert cli_json(db_env, "migrate", "status") == {"applied": [], "pending": ids}

    up = cli(db_env, "migrate", "up")
    assert up.returncode == OK, describe(up)
    assert [r["applied"] for r in table(up.stdout)] == ids
    assert f"applied {len(ids)} migration(s)" in up.stderr
    assert table_exists(empty_database_url, "client_sessions")

    after = cli(db_env, "migrate", "status")
    assert after.returncode == OK, describe(after)
    rows = table(after.stdout)
    assert [(r["migration"], r["state"]) for r in rows] == [(m, "applied") for m in ids]
    assert all(r["applied at"] != "-" for r in rows)
    assert "up to date" in after.stderr
    applied = cli_json(db_env, "migrate", "status")
    assert applied["pending"] == []
    assert [m["id"] for m in applied["applied"]] == ids
    assert all(m["applied"] and m["applied_at"] for m in applied["applied"])


def test_up_twice_is_a_no_op(db_env):
    first = cli(db_env, "migrate", "up")
    assert first.returncode == OK, describe(first)

    again = cli(db_env, "migrate", "up")
    assert again.returncode == OK, describe(again)
    assert "already up to date" in again.stderr
    assert table(again.stdout) == []
    assert cli_json(db_env, "migrate", "up") == {"applied": []}
    assert cli_json(db_env, "migrate", "status")["pending"] == []


def test_down_rolls_back_the_latest_then_all(db_env, empty_database_url):
    ids = migration_ids()
    assert cli(db_env, "migrate", "up").returncode == OK

    # stdin is a pipe, not a terminal: no question, no --yes needed.
    down = cli(db_env, "migrate", "down")
    assert down.returncode == OK, describe(down)
    assert [r["rolled back"] for r in table(down.stdout)] == [ids[-1]]
    assert "rolled back 1 migration(s)" in down.stderr
    assert "[y/N]" not in down.stderr
    status = cli_json(db_env, "migrate", "status")
    assert status["pending"] == [ids[-1]]
    assert [m["id"] for m in status["applied"]] == ids[:-1]

    everything = cli_json(db_env, "migrate", "down", "--all")
    assert everything == {"rolled_back": list(reversed(ids[:-1]))}
    assert cli_json(db_env, "migrate", "status") == {"applied": [], "pending": ids}
    assert not table_exists(empty_database_url, "client_sessions")

    nothing = cli(db_env, "migrate", "down")
    assert nothing.returncode == OK, describe(nothing)
    assert "nothing to roll back" in nothing.stderr


def test_down_on_a_terminal_asks_first(db_env):
    ids = migration_ids()
    assert cli(db_env, "migrate", "up").returncode == OK

    declined = stdin_on_tty(db_env, "migrate", "down", typed=b"n\n")
    # Declining is not an interruption: nothing was done, as the user chose.
    assert declined.returncode == 1, describe(declined)
    assert f"Roll back {ids[-1]}?" in declined.stderr
    assert declined.stderr.endswith("nothing rolled back\n"), describe(declined)
    assert cli_json(db_env, "migrate", "status")["pending"] == []

    # --yes: nothing is asked (nothing is typed: a question would wait forever).
    confirmed = stdin_on_tty(db_env, "migrate", "down", "--yes")
    assert confirmed.returncode == OK, describe(confirmed)
    assert "[y/N]" not in confirmed.stderr
    assert cli_json(db_env, "migrate", "status")["pending"] == [ids[-1]]


def _yoyo(*args: str) -> dict[str, str]:
    """`yoyo ARGS` from the repository root (yoyo.ini); for `list`, migration -> status."""
    done = subprocess.run(
        [str(venv_script("yoyo")), *args],
        cwd=REPO,
        env=base_env({}),
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        stdin=subprocess.DEVNULL,
    )
    assert done.returncode == 0, describe(done)
    ids = set(migration_ids())
    return {
        parts[1]: parts[0]
        for parts in map(str.split, done.stdout.splitlines())
        if len(parts) >= 2 and parts[1] in ids
    }


def test_plain_yoyo_works_on_the_same_migrations(db_env, empty_database_url):
    ids = migration_ids()
    yoyo_url = empty_database_url.replace("postgresql://", "postgresql+psycopg://", 1)
    assert yoyo_url.startswith("postgresql+psycopg://")

    assert _yoyo("list", "--database", yoyo_url) == dict.fromkeys(ids, "U")
    _yoyo("apply", "--database", yoyo_url)  # batch_mode (yoyo.ini): no question
    # What yoyo applied, dnd-client sees applied, and the other way round.
    assert cli_json(db_env, "migrate", "status")["pending"] == []
    assert cli(db_env, "migrate", "down").returncode == OK
    assert _yoyo("list", "--database", yoyo_url) == {**dict.fromkeys(ids[:-1], "A"), ids[-1]: "U"}


def test_a_schema_behind_the_code_says_migrate_up(
    db_env, redis_server_url, key_prefix, redis_client, keys
):
    make_sessions(redis_client, keys, 2, 3)
    env = {**db_env, "REDIS_URL": redis_server_url, "REDIS_KEY_PREFIX": key_prefix}
    assert cli(env, "migrate", "up").returncode == OK
    assert cli(env, "migrate", "down").returncode == OK  # the latest is pending again

    done = cli(env, "backup", "--all", "--local")
    assert done.returncode == SCHEMA, describe(done)
    assert_one_error_line(done, "dnd-client migrate up")

    assert cli(env, "migrate", "up").returncode == OK
    assert cli(env, "backup", "--all", "--local").returncode == OK
