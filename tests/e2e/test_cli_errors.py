"""What `dnd-client` says when something is wrong: one clear line on stderr, a named exit status.

Never a traceback, never a password, and no DND_DEBUG needed (processes.base_env
drops every DND_* variable of the test run).
"""

from __future__ import annotations

import subprocess
import sys

import click
import pytest

from tests.e2e.cli_helpers import (
    CONFIG,
    MISSING_ID,
    NO_WORKERS,
    OK,
    SCHEMA,
    UNAVAILABLE,
    USAGE,
    assert_no_password,
    assert_one_error_line,
    cli,
    describe,
    run_count,
    table_exists,
    venv_script,
)
from tests.factories import make_sessions
from tests.processes import REPO, base_env

PASSWORD = "s3cretpw"
# Every server unreachable: a command that exits 2 here refused its arguments
# before connecting to anything (else it would exit 5).
NOWHERE = {
    "DATABASE_URL": f"postgresql://dnd:{PASSWORD}@127.0.0.1:1/x",
    "REDIS_URL": f"redis://:{PASSWORD}@127.0.0.1:1/0",
    "CELERY_BROKER_URL": f"redis://:{PASSWORD}@127.0.0.1:1/1",
}
BAD_SESSION_IDS = [
    "*",
    "a:b",
    " ",
    "",
    "123",
    f"{MISSING_ID}:messages",
    "00000000-0000-4000-8000-00000000000g",
]

# -- bad arguments: exit 2 ----------------------------------------------------


@pytest.mark.parametrize(
    "args",
    [
        ["backup"],
        ["backup", "--local"],
        ["backup", "--all", "--session", MISSING_ID, "--local"],
        *[["backup", "--session", bad, "--local"] for bad in BAD_SESSION_IDS],
        ["backup", "--session"],
        ["backup", "--all", "--local", "--no-wait"],
        ["backup", "--local", "list"],
        ["backup", "list", "--limit", "0"],
        ["backup", "list", "--kind", "everything"],
        ["backup", "show", "not-a-run-id"],
        ["backup", "--all", "--local", "--bogus"],
        ["backup", "--all", "--local", "--output", "xml"],
        ["backup", "list", "-o", "xml"],
        ["migrate", "down", "--steps", "0"],
        ["restore"],
        ["restore", "--all", "--session", MISSING_ID, "--local"],
        ["restore", "--session", "a:b", "--local", "--force"],
        ["restore", "--all", "--local", "--cleanup"],
        ["kept", "list", "--run", "not-a-run-id"],
        ["kept", "show", "abc"],
        ["kept", "resolve"],
        ["kept", "resolve", str(2**64)],
        ["frobnicate"],
    ],
    ids=lambda args: " ".join(args) or "(none)",
)
def test_a_bad_argument_exits_2_before_connecting(args):
    done = cli(NOWHERE, *args)
    assert done.returncode == USAGE, describe(done)
    assert_one_error_line(done)
    assert_no_password(done, PASSWORD)
    assert done.stdout == ""


def test_a_bad_dnd_output_exits_2():
    done = cli({**NOWHERE, "DND_OUTPUT": "xml"}, "backup", "list")
    assert done.returncode == USAGE, describe(done)
    assert_one_error_line(done, "DND_OUTPUT", "xml")


@pytest.mark.parametrize("verb", ["backup", "restore"])
def test_a_session_id_that_is_not_a_uuid_touches_nothing(
    verb, env, redis_client, keys, key_prefix, pg_conn
):
    make_sessions(redis_client, keys, 1, 2)
    before = sorted(redis_client.keys(f"{key_prefix}*"))

    for bad in ["*", "a:b", f"{MISSING_ID}:messages"]:
        done = cli(env, verb, "--session", bad, "--local", *(["--force"] * (verb == "restore")))
        assert done.returncode == USAGE, describe(done)
        assert_one_error_line(done, "--session", "UUID")

    assert sorted(redis_client.keys(f"{key_prefix}*")) == before
    assert run_count(pg_conn) == 0  # no run was even started


# -- unreachable servers: exit 5 ------------------------------------------------


@pytest.mark.parametrize(
    "args",
    [
        ["backup", "--all", "--local"],
        ["restore", "--session", MISSING_ID, "--local"],
        ["backup", "list"],
        ["kept", "list"],
        ["migrate", "up"],
        ["status", "--no-workers"],
    ],
    ids=" ".join,
)
def test_unreachable_postgresql_names_database_url(args, redis_server_url):
    env = {"DATABASE_URL": NOWHERE["DATABASE_URL"], "REDIS_URL": redis_server_url}
    done = cli(env, *args)
    assert done.returncode == UNAVAILABLE, describe(done)
    assert_one_error_line(done, "PostgreSQL", "DATABASE_URL", "127.0.0.1:1")
    assert_no_password(done, PASSWORD)


@pytest.mark.parametrize("password", [PASSWORD, "s3cret/p@ss:w0rd"])
@pytest.mark.parametrize(
    "args", [["backup", "--all", "--local"], ["migrate", "status"]], ids=" ".join
)
def test_unreachable_postgresql_from_postgres_settings_names_them(args, password, redis_server_url):
    env = {
        "POSTGRES_HOST": "127.0.0.1:1",
        "POSTGRES_USER": "dnd",
        "POSTGRES_PASSWORD": password,
        "REDIS_URL": redis_server_url,
    }
    done = cli(env, *args)
    assert done.returncode == UNAVAILABLE, describe(done)
    line = assert_one_error_line(done, "PostgreSQL", "POSTGRES_HOST", "POSTGRES_PASSWORD")
    assert "DATABASE_URL" not in line  # not set: checking it would be the wrong advice
    assert_no_password(done, password)
    assert_no_password(done, "s3cret%2Fp%40ss")


@pytest.mark.parametrize(
    "args",
    [
        ["backup", "--all", "--local"],
        ["backup", "--session", MISSING_ID, "--local"],
        ["restore", "--all", "--local", "--force"],
    ],
    ids=" ".join,
)
def test_unreachable_redis_names_redis_url(args, env, pg_conn):
    done = cli({**env, "REDIS_URL": NOWHERE["REDIS_URL"]}, *args)
    assert done.returncode == UNAVAILABLE, describe(done)
    assert_one_error_line(done, "Redis", "REDIS_URL", "127.0.0.1:1")
    assert_no_password(done, PASSWORD)
    assert run_count(pg_conn) == 0


def test_commands_that_only_read_postgresql_work_without_redis(env):
    for args in (["backup", "list"], ["kept", "list"], ["migrate", "status"]):
        done = cli({**env, "REDIS_URL": NOWHERE["REDIS_URL"]}, *args)
        assert done.returncode == OK, describe(done)
    # status reads PostgreSQL only (a broker for the workers' count; not asked here).
    # Nothing was ever backed up: the recovery point is unbounded, above any --max-lag.
    done = cli({**env, "REDIS_URL": NOWHERE["REDIS_URL"]}, "status", "--no-workers")
    assert done.returncode == 12, describe(done)
    assert done.stdout.startswith("recovery point      unbounded (target 5.0 s)"), done.stdout


def test_no_worker_listening_exits_6_and_suggests_local(env, redis_server_url, key_prefix):
    celery = {
        **env,
        "CELERY_BROKER_URL": redis_server_url,
        "CELERY_RESULT_BACKEND": redis_server_url,
        "CELERY_QUEUE_PREFIX": key_prefix.replace(":", "."),
        "CELERY_KEY_PREFIX": key_prefix,
    }
    done = cli(celery, "backup", "--all")
    assert done.returncode == NO_WORKERS, describe(done)
    assert_one_error_line(done, "no Celery worker", "celery -A worker worker", "--local")


def test_unreachable_broker_names_celery_broker_url(env):
    done = cli(
        {**env, "CELERY_BROKER_URL": NOWHERE["CELERY_BROKER_URL"]},
        "backup",
        "--session",
        MISSING_ID,
    )
    assert done.returncode == UNAVAILABLE, describe(done)
    assert_one_error_line(done, "CELERY_BROKER_URL")
    assert_no_password(done, PASSWORD)


# -- bad settings: exit 7 -----------------------------------------------------


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("BACKUP_SHARDS", "abc"),
        ("BACKUP_BATCH_SESSIONS", "0"),
        ("REDIS_URL", "http://x"),
        ("REDIS_URL", f"http://user:{PASSWORD}@x"),
        ("DATABASE_URL", f"mysql://dnd:{PASSWORD}@127.0.0.1/x"),
        ("REDIS_KEY_PREFIX", "dnd:*"),
        ("CELERY_BROKER_URL", f"http://guest:{PASSWORD}@x"),
    ],
)
def test_a_bad_setting_exits_7_naming_it(name, value, env):
    done = cli({**env, name: value}, "backup", "--all", "--local")
    assert done.returncode == CONFIG, describe(done)
    assert_one_error_line(done, name)
    assert_no_password(done, PASSWORD)


def test_a_bad_postgres_setting_exits_7_naming_it(redis_server_url):
    done = cli(
        {"POSTGRES_SSLMODE": "sometimes", "REDIS_URL": redis_server_url}, "migrate", "status"
    )
    assert done.returncode == CONFIG, describe(done)
    assert_one_error_line(done, "POSTGRES_SSLMODE")


# -- schema not migrated: exit 8 ------------------------------------------------


def test_an_empty_database_says_migrate_up(
    empty_database_url, redis_server_url, key_prefix, redis_client, keys
):
    [sid] = make_sessions(redis_client, keys, 1, 1)
    env = {
        "DATABASE_URL": empty_database_url,
        "REDIS_URL": redis_server_url,
        "REDIS_KEY_PREFIX": key_prefix,
    }
    for args in (
        ["backup", "--all", "--local"],
        ["backup", "--session", sid, "--local"],
        ["restore", "--all", "--local"],
        ["restore", "--session", sid, "--local"],
        ["backup", "list"],
        ["backup", "show", MISSING_ID],
        ["kept", "list"],
        ["kept", "resolve", "1"],
        ["status", "--no-workers"],
    ):
        done = cli(env, *args)
        assert done.returncode == SCHEMA, describe(done)
        assert_one_error_line(done, "dnd-client migrate up")
    assert not table_exists(empty_database_url, "client_sessions")


# -- help and entry points ----------------------------------------------------


def _commands() -> list[tuple[list[str], click.Command]]:
    from worker.cli.main import cli as group

    found: list[tuple[list[str], click.Command]] = []

    def walk(command: click.Command, path: list[str]) -> None:
        found.append((path, command))
        if isinstance(command, click.Group):
            for name, sub in command.commands.items():
                walk(sub, [*path, name])

    walk(group, [])
    return found


def test_every_help_shows_the_environment_variables_of_its_options():
    commands = _commands()
    assert len(commands) >= 12
    running = [
        (
            path,
            command,
            subprocess.Popen(
                [sys.executable, str(REPO / "bin" / "dnd-client"), *path, "--help"],
                cwd=REPO,
                env=base_env({}),
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
                stdin=subprocess.DEVNULL,
            ),
        )
        for path, command in commands
    ]
    for path, command, proc in running:
        out, err = proc.communicate(timeout=60)
        assert proc.returncode == OK, (path, err)
        assert out.startswith(f"Usage: dnd-client {' '.join(path)}".rstrip()), out
        text = " ".join(out.split())  # help text wraps wherever it likes
        for option in command.params:
            envvar = getattr(option, "envvar", None)
            if isinstance(option, click.Option) and envvar:
                assert f"env var: {envvar}" in text, (path, option.name, out)
        # Every command takes --output (docs/contract.md §4), dev included.
        if not isinstance(command, click.Group):
            assert "--output [table|json]" in text, (path, out)
            assert "env var: DND_OUTPUT" in text, (path, out)


@pytest.mark.parametrize(
    "argv",
    [
        [sys.executable, str(REPO / "bin" / "dnd-client")],
        [sys.executable, "-m", "worker"],
        [str(venv_script("dnd-client"))],
    ],
    ids=["bin/dnd-client", "python -m worker", "dnd-client"],
)
def test_every_way_to_start_the_program(argv):
    def start(option: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [*argv, option],
            cwd=REPO,
            env=base_env({}),
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
            stdin=subprocess.DEVNULL,
        )

    shown = start("--help")
    assert shown.returncode == OK, describe(shown)
    assert shown.stdout.startswith("Usage: dnd-client [OPTIONS] COMMAND")
    for command in ("backup", "restore", "migrate", "kept"):
        assert f"  {command} " in shown.stdout
    assert "Exit status:" in shown.stdout

    version = start("--version")
    assert version.returncode == OK, describe(version)
    assert version.stdout.startswith("dnd-client, version ")
