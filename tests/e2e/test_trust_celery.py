"""Verify and prune through real `celery -A worker worker` processes (see conftest.celery_env)."""

from __future__ import annotations

import json
from collections import Counter

import pytest

from tests.e2e.conftest import wait_for_run
from tests.factories import add_messages, make_sessions, message
from tests.processes import run_cli, run_python
from worker.sharding import shard_of

OK, DIFFERENCES = 0, 11


@pytest.fixture
def celery_env(celery_env: dict[str, str]) -> dict[str, str]:
    # These tests are about explicit and scheduled runs: what each run stores,
    # counts and reports. Continuous backups (on by default) would store the
    # same sessions first, and the runs would find them unchanged; they have
    # their own tests (tests/e2e/test_continuous.py).
    return {**celery_env, "CONTINUOUS_BACKUP": "0"}


def _cli(env, *args):
    done = run_cli(env, *args, timeout=120, stdin="")
    assert "Traceback" not in done.stderr, done.stderr
    return done


def _backed_up(celery_env, redis_client, keys, sessions, messages_each) -> list[str]:
    ids = make_sessions(redis_client, keys, sessions, messages_each)
    done = _cli(celery_env, "backup", "--all", "--local")
    assert done.returncode == OK, done.stderr
    return ids


def _verify_session(celery_env, sid: str, quick: bool = False) -> dict:
    return run_python(
        celery_env,
        f"""
import json
from worker.tasks import verify_session
print(json.dumps(verify_session.delay({sid!r}, quick={quick!r}).get(timeout=60)))
""",
    )


def _full_verify(celery_env) -> dict:
    return run_python(
        celery_env,
        """
import json
from worker.tasks import full_verify
print(json.dumps(full_verify.delay().get(timeout=60)))
""",
    )


def _results(pg_conn, run_id: str) -> dict[str, tuple[str, dict]]:
    found = pg_conn.execute(
        "SELECT session_id::text, status, details FROM persistence_session_results"
        " WHERE snapshot_id = %s",
        (run_id,),
    ).fetchall()
    return {sid: (status, details) for sid, status, details in found}


def test_verify_session_task_and_the_cli_on_workers(
    celery_env, workers, redis_client, keys, pg_conn
):
    ids = _backed_up(celery_env, redis_client, keys, 3, 4)
    worker = workers(celery_env, name="verifier")

    result = _verify_session(celery_env, ids[0])

    assert result["session_id"] == ids[0]
    assert (result["status"], result["run_status"]) == ("completed", "completed")
    assert result["error"] is None
    assert result["messages"] == 4
    assert result["shard"] == shard_of(ids[0], int(celery_env["BACKUP_SHARDS"]))
    assert result["worker"].startswith(f"{worker.name}@")
    assert result["details"]["agrees"] is True
    assert result["details"]["checked_by"] == "messages"
    run = pg_conn.execute(
        "SELECT kind, scope, status FROM persistence_snapshots WHERE id = %s", (result["run_id"],)
    ).fetchone()
    assert run == ("verify", "session", "completed")
    assert _verify_session(celery_env, ids[0], quick=True)["details"]["checked_by"] == "checksum"

    done = _cli(celery_env, "verify", "--all", "-o", "json")
    assert done.returncode == OK, done.stderr
    payload = json.loads(done.stdout)
    assert payload["agree"] is True
    assert payload["details"]["mode"] == "celery"
    assert payload["session_count"] == 3

    extra = message(ids[2], 8)
    add_messages(redis_client, keys, ids[2], [extra])
    differs = _verify_session(celery_env, ids[2])
    assert (differs["status"], differs["run_status"]) == ("different", "failed")
    assert differs["details"]["examples"] == {"missing_from_backup": [extra["id"]]}

    done = _cli(celery_env, "verify", "--session", ids[2])
    assert done.returncode == DIFFERENCES, done.stdout + done.stderr
    assert ids[2] in done.stdout
    done = _cli(celery_env, "verify", "--all", "--quick", "-o", "json")
    assert done.returncode == DIFFERENCES, done.stderr
    assert [s["session_id"] for s in json.loads(done.stdout)["sessions"]] == [ids[2]]


def test_full_verify_chord_completes_or_fails_the_run(
    broker, celery_env, workers, redis_client, keys, pg_conn
):
    ids = _backed_up(celery_env, redis_client, keys, 12, 3)
    workers(celery_env, concurrency=2)

    answer = _full_verify(celery_env)

    assert answer["status"] == "running"
    assert answer["sessions"] == 12
    # Per shard, batches of at most 5 sessions: one batch task each.
    per_shard = Counter(shard_of(sid, int(celery_env["BACKUP_SHARDS"])) for sid in ids)
    assert answer["batches"] == sum(-(-n // 5) for n in per_shard.values())
    run = wait_for_run(pg_conn, answer["run_id"], kind="verify")
    assert run["status"] == "completed", run["error"]
    assert (run["session_count"], run["failed_count"], run["message_count"]) == (12, 0, 36)
    assert run["details"]["dispatched"] is True
    results = _results(pg_conn, run["id"])
    assert set(results) == set(ids)
    assert {status for status, _details in results.values()} == {"completed"}

    # One message edited in Redis: that session differs, and the run fails.
    sid = ids[5]
    raw = redis_client.zrange(keys.messages(sid), 0, 0, withscores=True)[0]
    edited = {**json.loads(raw[0]), "content": "edited"}
    redis_client.zrem(keys.messages(sid), raw[0])
    redis_client.zadd(keys.messages(sid), {json.dumps(edited).encode(): raw[1]})

    answer = _full_verify(celery_env)
    run = wait_for_run(pg_conn, answer["run_id"], kind="verify")

    assert run["status"] == "failed"
    assert (run["session_count"], run["failed_count"]) == (12, 1)
    assert run["error"] == f"1 session(s) differ; first: {sid}: 1 message(s) different"
    results = _results(pg_conn, run["id"])
    assert {s for s, (status, _d) in results.items() if status == "different"} == {sid}
    _status, details = results[sid]
    assert details["different"] == 1
    assert details["examples"] == {"different": [edited["id"]]}


def test_prune_runs_task(celery_env, workers, redis_client, keys, pg_conn):
    _backed_up(celery_env, redis_client, keys, 2, 2)
    for _ in range(3):
        assert _cli(celery_env, "backup", "--all", "--local").returncode == OK
    runs = [
        r[0]
        for r in pg_conn.execute("SELECT id::text FROM persistence_snapshots ORDER BY created_at")
    ]
    assert len(runs) == 4
    # The oldest two ended 40 days ago; PRUNE_KEEP_DAYS is 30 by default.
    pg_conn.execute(
        "UPDATE persistence_snapshots SET created_at = created_at - interval '40 days',"
        " finished_at = finished_at - interval '40 days' WHERE id = ANY(%s::uuid[])",
        (runs[:2],),
    )
    workers(celery_env)

    by_days = run_python(
        celery_env,
        """
import json
from worker.tasks import prune_runs
print(json.dumps(prune_runs.delay().get(timeout=60)))
""",
    )
    assert by_days == {"runs": 2, "session_results": 4, "resolved_kept_records": 0}
    by_count = run_python(
        celery_env,
        """
import json
from worker.tasks import prune_runs
print(json.dumps(prune_runs.delay(keep=1).get(timeout=60)))
""",
    )
    assert by_count == {"runs": 1, "session_results": 2, "resolved_kept_records": 0}
    left = [r[0] for r in pg_conn.execute("SELECT id::text FROM persistence_snapshots")]
    assert left == [runs[3]]
    assert pg_conn.execute("SELECT count(*) FROM client_messages").fetchone() == (4,)


def test_beat_schedules_prune_runs(celery_env):
    entry = run_python(
        {**celery_env, "PRUNE_SCHEDULE": "0 3 * * *", "PRUNE_KEEP_DAYS": "7"},
        """
import json
from worker.celery import app
entry = app.conf.beat_schedule["prune-runs"]
print(json.dumps({"task": entry["task"], "kwargs": entry["kwargs"],
                  "schedule": str(entry["schedule"])}))
""",
    )
    assert entry["task"] == "worker.tasks.prune_runs"
    assert entry["kwargs"] == {"older_than_days": 7}
    assert entry["schedule"].startswith("<crontab: 0 3 * * *")

    off = run_python(
        celery_env,
        """
import json
from worker.celery import app
print(json.dumps(sorted(app.conf.beat_schedule)))
""",
    )
    assert "prune-runs" not in off
