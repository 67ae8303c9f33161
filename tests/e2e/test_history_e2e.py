"""Point-in-time restores end to end: real workers, the CLI, the tasks of the Python API.

The scenario of the issue: sessions backed up (T0); a faulty client renames
sessions, deletes half of one session's messages, edits others in place and
soft-deletes one; a backup captures it (T1). Continuous backups are not on
this branch: T1 is captured by an explicit `full_backup(full=True)` through
the workers (edits in place keep the counts equal, so only a full read sees
them; continuous backups run the same engine).
"""

from __future__ import annotations

import json
import uuid
from datetime import UTC, datetime, timedelta

import pytest

from tests.conftest import delete_prefix
from tests.e2e.cli_helpers import OK, USAGE, assert_one_error_line, cli, describe
from tests.e2e.conftest import wait_for_run
from tests.factories import add_messages, message
from tests.integration.test_history import damage, state
from tests.integration.test_history import table as table  # a fixture
from tests.processes import run_python


@pytest.fixture
def drills(redis_server_url):
    prefix = f"dndtest-drill:{uuid.uuid4().hex[:12]}:"
    yield prefix
    delete_prefix(redis_server_url, prefix)


def task(env, code: str) -> dict:
    return run_python(env, f"import json\nfrom worker import tasks\nprint(json.dumps({code}))")


# The whole scenario, through a worker, on a machine that may be busy.
@pytest.mark.timeout(600)
def test_the_faulty_client_scenario_through_the_workers(
    celery_env,
    workers,
    redis_client,
    keys,
    pg_conn,
    table,
    drills,
):
    workers(celery_env, concurrency=2)
    t0_run = task(celery_env, "tasks.full_backup.delay().get(timeout=60)")["run_id"]
    wait_for_run(pg_conn, t0_run)
    live_t0 = state(redis_client, keys.prefix)

    damage(redis_client, keys, table)
    t1_run = task(celery_env, "tasks.full_backup.delay(True).get(timeout=60)")["run_id"]
    assert wait_for_run(pg_conn, t1_run)["status"] == "completed"
    live_t1 = state(redis_client, keys.prefix, live_only=True)

    # A late message: older than what is backed up, captured by a one-session backup.
    sid_c = table["c"][0]
    late = message(sid_c, 1, created_at=datetime(2026, 2, 12, 10, 0, 0, 500000, tzinfo=UTC))
    add_messages(redis_client, keys, sid_c, [late])
    t2 = task(celery_env, f"tasks.backup_session.delay({sid_c!r}).get(timeout=60)")
    # Captured by this backup, or a moment before by a continuous one (on by
    # default: it follows the writes of the faulty client too).
    assert t2["status"] in ("completed", "unchanged"), t2

    # restore --all --as-of T0 (a run ID) into a target prefix: exactly T0.
    done = cli(celery_env, "restore", "--all", "--as-of", t0_run, "--target-prefix", f"{drills}0:")
    assert done.returncode == OK, describe(done)
    assert state(redis_client, f"{drills}0:") == live_t0
    assert "as of" in done.stdout
    # ... as of T1: the damaged state; the late message is not there yet.
    done = cli(celery_env, "restore", "--all", "--as-of", t1_run, "--target-prefix", f"{drills}1:")
    assert done.returncode == OK, describe(done)
    assert state(redis_client, f"{drills}1:") == live_t1
    at_t1 = state(redis_client, f"{drills}1:")[sid_c][1]
    assert late["id"] not in {row[0] for row, _score in at_t1}
    # verify proves the T0 copy equals T0, and finds the T1 copy is not T0.
    sid_b = table["b"][0]
    done = cli(celery_env, "verify", "--session", sid_b, "--as-of", t0_run,
               "--target-prefix", f"{drills}0:")  # fmt: skip
    assert done.returncode == OK, describe(done)
    done = cli(celery_env, "verify", "--session", sid_b, "--as-of", t0_run,
               "--target-prefix", f"{drills}1:")  # fmt: skip
    assert done.returncode == 11, describe(done)

    # Through the workers, into the live data: the damaged session, forced, as of T0.
    answer = task(
        celery_env,
        f"tasks.restore_session.delay({sid_b!r}, True, as_of={t0_run!r}).get(timeout=60)",
    )
    assert answer["status"] == "completed"
    assert state(redis_client, keys.prefix)[sid_b] == live_t0[sid_b]
    undo = answer["details"]["undo_as_of"]
    run = pg_conn.execute(
        "SELECT as_of FROM persistence_snapshots WHERE id = %s", (answer["run_id"],)
    ).fetchone()
    assert run[0] is not None
    # Its undo brings the damaged state back.
    answer = task(
        celery_env, f"tasks.restore_session.delay({sid_b!r}, True, as_of={undo!r}).get(timeout=60)"
    )
    assert state(redis_client, keys.prefix)[sid_b] == live_t1[sid_b]

    # full_restore(force, as_of) through the workers: every session as of T0.
    answer = task(celery_env, f"tasks.full_restore.delay(True, as_of={t0_run!r}).get(timeout=60)")
    finished = wait_for_run(pg_conn, answer["run_id"], kind="restore")
    assert finished["status"] == "completed", finished
    now = state(redis_client, keys.prefix)
    assert {sid: now[sid] for sid in live_t0} == live_t0

    # The history of the damaged session, as a table and as JSON.
    done = cli(celery_env, "history", "--session", sid_b, "-o", "json")
    assert done.returncode == OK, describe(done)
    captures = json.loads(done.stdout)
    assert captures[1]["removed"] == 5
    assert len(captures[1]["message_changes"]["removed"]) == 5
    done = cli(celery_env, "history", "--session", table["a"][0])
    assert "hash: name" in done.stdout, describe(done)


def test_a_forced_restore_prints_how_to_undo_it(celery_env, redis_client, keys, table):
    sid = table["a"][0]
    assert cli(celery_env, "backup", "--all", "--local").returncode == OK
    done = cli(celery_env, "restore", "--session", sid, "--force", "--local")
    assert done.returncode == OK, describe(done)
    hint = [line for line in done.stderr.splitlines() if line.startswith("to undo:")]
    assert len(hint) == 1, describe(done)
    assert f"restore --session {sid} --as-of " in hint[0]
    undo = cli(celery_env, *hint[0].removeprefix("to undo: dnd-client ").split(), "--local")
    assert undo.returncode == OK, describe(undo)


@pytest.mark.parametrize(
    ("as_of", "expected"),
    [
        ((datetime.now(UTC) + timedelta(days=1)).isoformat(), "in the future"),
        ("not-a-time", "cannot read"),
        (str(uuid.UUID(int=7)), "no run"),
        ("2000-01-01T00:00:00Z", "oldest restorable moment is"),
    ],
)
def test_bad_moments_exit_2_with_one_line(celery_env, table, as_of, expected):
    assert cli(celery_env, "backup", "--all", "--local").returncode == OK
    done = cli(celery_env, "restore", "--all", "--as-of", as_of, "--local")
    assert done.returncode == USAGE, describe(done)
    assert_one_error_line(done, expected)


def test_prune_history_then_a_restore_before_the_window_is_refused(celery_env, table):
    assert cli(celery_env, "backup", "--all", "--local").returncode == OK
    before = datetime.now(UTC).isoformat()
    done = cli(celery_env, "backup", "prune", "--history-older-than", "0s", "-o", "json")
    assert done.returncode == OK, describe(done)
    assert json.loads(done.stdout)["history_sessions"] == 4
    done = cli(celery_env, "restore", "--all", "--as-of", before, "--local")
    assert done.returncode == USAGE, describe(done)
    assert_one_error_line(done, "oldest restorable moment is")
