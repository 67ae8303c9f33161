"""Signed task messages (CELERY_SECURITY_*): real workers run signed tasks and refuse the rest.

Messages are read and altered where they wait, in the Redis broker's queue
list, before a worker is started: an untouched signed message runs; the same
message with its arguments changed, a plain JSON one (what a producer without
the key sends), and one signed by a key the workers do not trust are refused.
"""

from __future__ import annotations

import base64
import json
import time
import uuid
from pathlib import Path
from typing import Any

import pytest
import redis

from tests.e2e.cli_helpers import OK, cli, describe, summary
from tests.e2e.conftest import runs, wait_for, wait_for_run
from tests.e2e.security_helpers import signing_identity
from tests.factories import make_sessions
from tests.processes import run_python
from worker.keys import RedisKeys

SEND = """
import json, sys
from worker.celery import app
kwargs = {"session_id": sys.argv[1], "run_id": sys.argv[2]}
app.send_task("worker.tasks.backup_session", kwargs=kwargs)
print(json.dumps(app.conf.task_serializer))
"""


@pytest.fixture
def signing_env(celery_env: dict[str, str], tmp_path: Path) -> dict[str, str]:
    key, cert = signing_identity(tmp_path / "certs", "workers")
    return {
        **celery_env,
        "CELERY_SECURITY_KEY": str(key),
        "CELERY_SECURITY_CERTIFICATE": str(cert),
        "CELERY_SECURITY_CERT_STORE": str(tmp_path / "certs" / "*.pem"),
        "BACKUP_SHARDS": "1",  # every session task waits in one queue: they run in order
        # The runs' own counts are checked: continuous backups (on by default, with
        # tests of their own) would store the sessions first.
        "CONTINUOUS_BACKUP": "0",
    }


def send(env: dict[str, str], session_id: str, run_id: str) -> str:
    code = SEND.replace("sys.argv[1]", repr(session_id)).replace("sys.argv[2]", repr(run_id))
    return str(run_python(env, code))


def queued(client: redis.Redis, env: dict[str, str]) -> tuple[str, list[dict[str, Any]]]:
    """The shard queue's list key and its messages (oldest last: LPUSH, BRPOP)."""
    key = f"{env['CELERY_KEY_PREFIX']}{env['CELERY_QUEUE_PREFIX']}shard.0"
    raw: Any = client.lrange(key, 0, -1)
    return key, [json.loads(item) for item in raw]


def test_signed_messages_run_others_are_refused(
    signing_env, workers, redis_client, keys: RedisKeys, pg_conn, tmp_path: Path
) -> None:
    ids = make_sessions(redis_client, keys, 4, 3)
    good, tampered, unsigned, stranger = (str(uuid.uuid4()) for _ in range(4))
    assert send(signing_env, ids[0], good) == "auth"
    assert send(signing_env, ids[1], tampered) == "auth"
    plain = {k: v for k, v in signing_env.items() if not k.startswith("CELERY_SECURITY_")}
    assert send(plain, ids[2], unsigned) == "json"
    other_key, other_cert = signing_identity(tmp_path / "other", "stranger")
    strange = {
        **signing_env,
        "CELERY_SECURITY_KEY": str(other_key),
        "CELERY_SECURITY_CERTIFICATE": str(other_cert),
        "CELERY_SECURITY_CERT_STORE": str(other_cert),
    }
    assert send(strange, ids[3], stranger) == "auth"

    key, messages = queued(redis_client, signing_env)
    assert len(messages) == 4
    # Newest first: [stranger, unsigned, tampered, good].
    assert [m["content-type"] for m in messages] == [
        "application/data", "application/json", "application/data", "application/data",
    ]  # fmt: skip
    # The broker's body (base64) holds the auth serializer's payload (base64 again):
    # signer, signature, content type, encoding and the JSON body, apart by \x00\x01.
    signed = base64.b64decode(base64.b64decode(messages[2]["body"]))
    _signer, _signature, content_type, _, body = signed.split(b"\x00\x01", 4)
    assert (content_type, ids[1].encode() in body) == (b"application/json", True)
    # Tamper: the same signed message, now asking for another session.
    forged = signed.replace(ids[1].encode(), ids[3].encode())
    altered = {**messages[2], "body": base64.b64encode(base64.b64encode(forged)).decode()}
    redis_client.lset(key, 2, json.dumps(altered))

    worker = workers(signing_env)
    assert wait_for_run(pg_conn, good, kind="backup")["status"] == "completed"
    # The three others were taken off the queue and refused, never run.
    wait_for(lambda: redis_client.llen(key) == 0, 30, message="the queue to empty")
    wait_for(lambda: worker.log().count("Can't decode message body") >= 2, 30, message="refusals")
    wait_for(lambda: "Received invalid task message" in worker.log(), 30, message="refusal")
    time.sleep(2)  # a task that had been accepted would have made its run by now
    assert {run["id"] for run in runs(pg_conn)} == {good}
    log = worker.log()
    # The stranger's key is not in the store; the plain message is not 'auth'.
    assert "Unknown certificate" in log, log[-3000:]
    assert "Refusing to deserialize untrusted content of type json" in log, log[-3000:]
    # The tampered one fails its signature check; Celery 5.5 then fails again
    # building the error (reraise_errors of Certificate.verify), so the log
    # shows a TypeError instead of "Bad signature": refused all the same.
    assert "Bad signature" in log or "catching classes that do not inherit" in log


def test_full_run_with_its_chord_signed(
    signing_env, workers, redis_client, keys: RedisKeys, pg_conn
) -> None:
    env = {**signing_env, "BACKUP_SHARDS": "3", "BACKUP_BATCH_SESSIONS": "2"}
    make_sessions(redis_client, keys, 11, 4)
    worker = workers(env, concurrency=2)

    done = cli(env, "backup", "--all")
    assert done.returncode == OK, describe(done)
    rows = summary(done.stdout)
    assert rows["status"] == "completed", describe(done)
    run = wait_for_run(pg_conn)
    assert (run["status"], run["session_count"], run["message_count"]) == ("completed", 11, 44)
    assert run["details"]["dispatched"] is True
    # Batches (the chord's members) and its callback all ran as signed messages.
    batches = pg_conn.execute(
        "SELECT count(*) FROM persistence_run_batches WHERE snapshot_id = %s", (run["id"],)
    ).fetchone()
    assert batches is not None
    assert batches[0] >= 6
    assert "Can't decode message body" not in worker.log()
    # A verify through the workers too (another kind of run, another chord).
    done = cli(env, "verify", "--all")
    assert done.returncode == OK, describe(done)


def test_signing_settings_go_together(signing_env) -> None:
    env = {k: v for k, v in signing_env.items() if k != "CELERY_SECURITY_CERT_STORE"}
    done = cli(env, "backup", "--all")
    assert done.returncode == 7, describe(done)
    assert "CELERY_SECURITY_CERT_STORE" in done.stderr
    env = {**signing_env, "CELERY_SECURITY_KEY": "/nonexistent/key.pem"}
    done = cli(env, "backup", "--all")
    assert done.returncode == 7, describe(done)
    assert "CELERY_SECURITY_KEY: cannot read the file" in done.stderr


def test_the_signature_covers_the_body_not_the_task_name(
    signing_env, workers, redis_client, keys: RedisKeys, pg_conn
) -> None:
    """Evidence for docs/security.md: a signed body under another task name still runs.

    Celery signs the serialized body (arguments, callbacks); the task name is a
    header. Whoever can write to the broker can turn a signed backup of a session
    into a restore of it (same arguments). This is Celery's design, documented as
    a limit of signing: the broker must be writable only by trusted processes.
    """
    [session_id] = make_sessions(redis_client, keys, 1, 2)
    run_id = str(uuid.uuid4())
    assert send(signing_env, session_id, run_id) == "auth"
    key, [message] = queued(redis_client, signing_env)
    assert message["headers"]["task"] == "worker.tasks.backup_session"
    message["headers"]["task"] = "worker.tasks.restore_session"
    redis_client.lset(key, 0, json.dumps(message))

    workers(signing_env)
    run = wait_for_run(pg_conn, run_id, kind="restore")
    assert run["status"] in ("completed", "partial", "failed")
    assert [r["id"] for r in runs(pg_conn, "restore")] == [run_id]
    assert runs(pg_conn, "backup") == []
