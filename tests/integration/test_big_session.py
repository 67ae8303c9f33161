"""A 200,000-message session backs up and restores in chunks, with bounded memory.

Memory is measured outside pytest: the command runs in a child of a tiny wrapper
process, which reports the child's peak RSS (getrusage RUSAGE_CHILDREN). A child
forked straight from pytest would inherit pytest's own high-water mark.

Measured on the development machine (Python 3.11, chunk 5,000 messages; ru_maxrss):
importing the package ~43 MB; backup ~55 MB; full backup ~60 MB; restore ~59 MB;
verify ~60 MB (it was ~170 MB before it compared inside PostgreSQL); loading the whole
session into memory and parsing it (what the chunks avoid) ~280 MB.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.factories import message, new_id, score_of, session_fields, write_session
from tests.integration.helpers import message_count, scalar

REPO = Path(__file__).resolve().parents[2]
TOTAL = 200_000
# Well below the ~280 MB of holding the session in memory, well above the ~60 MB measured.
PEAK_RSS_LIMIT_MB = 150
# What verify may take above the restore of the same session (a few pages in flight).
VERIFY_HEADROOM_MB = 25
CONTENT = "the party searches the room for traps and treasure " * 5

_WRAPPER = """
import json, resource, subprocess, sys
done = subprocess.run(sys.argv[2:])
with open(sys.argv[1], "w") as out:
    json.dump(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss, out)
sys.exit(done.returncode)
"""


def _dnd_client(env, tmp_path, *args):
    """Run `python -m worker ARGS --output json`; return (run as a dict, peak RSS in MB)."""
    rss_file = tmp_path / "rss.json"
    done = subprocess.run(
        [
            sys.executable,
            "-c",
            _WRAPPER,
            str(rss_file),
            sys.executable,
            "-m",
            "worker",
            *args,
            "--local",
            "--output",
            "json",
        ],
        env={**os.environ, **env},
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    peak_kib = json.loads(rss_file.read_text())
    return json.loads(done.stdout), peak_kib / 1024


def _fill(redis_client, keys, sid, sample_every):
    """Write the session, 10,000 members per ZADD; return {id: score} and a sample."""
    write_session(redis_client, keys, session_fields(sid))
    scores: dict[str, int] = {}
    sample: dict[str, dict] = {}
    for start in range(0, TOTAL, 10_000):
        members = {}
        for i in range(start, start + 10_000):
            msg = message(sid, i, content=f"{i}: {CONTENT}")
            scores[msg["id"]] = score_of(msg["created_at"])
            members[json.dumps(msg, separators=(",", ":")).encode()] = scores[msg["id"]]
            if i % sample_every == 0:
                sample[msg["id"]] = msg
        redis_client.zadd(keys.messages(sid), members)
    return scores, sample


# Four runs over 200,000 messages: more than the suite's 120 s on a loaded machine.
@pytest.mark.timeout(360)
@pytest.mark.slow
def test_big_session_backs_up_and_restores_in_bounded_memory(
    env, redis_client, keys, pg_conn, tmp_path
):
    sid = new_id()
    scores, sample = _fill(redis_client, keys, sid, sample_every=97)
    assert redis_client.zcard(keys.messages(sid)) == TOTAL

    run, backup_mb = _dnd_client(env, tmp_path, "backup", "--session", sid)
    assert run["status"] == "completed"
    assert run["message_count"] == TOTAL
    assert backup_mb < PEAK_RSS_LIMIT_MB, f"backup peaked at {backup_mb:.0f} MB"
    assert message_count(pg_conn, sid) == TOTAL
    stored_ids = {
        str(row[0])
        for row in pg_conn.execute("SELECT id FROM client_messages WHERE session_id = %s", (sid,))
    }
    assert stored_ids == set(scores)
    some_id = next(iter(sample))
    assert (
        scalar(pg_conn, "SELECT content FROM client_messages WHERE id = %s", some_id)
        == (sample[some_id]["content"])
    )

    # The merge path (every message read again and compared) is chunked too.
    run, full_mb = _dnd_client(env, tmp_path, "backup", "--session", sid, "--full")
    assert run["status"] == "completed"
    assert run["message_count"] == 0
    assert full_mb < PEAK_RSS_LIMIT_MB, f"full backup peaked at {full_mb:.0f} MB"

    redis_client.delete(keys.session(sid), keys.messages(sid))
    run, restore_mb = _dnd_client(env, tmp_path, "restore", "--session", sid)
    assert run["status"] == "completed"
    assert run["message_count"] == TOTAL
    assert restore_mb < PEAK_RSS_LIMIT_MB, f"restore peaked at {restore_mb:.0f} MB"

    assert redis_client.zcard(keys.messages(sid)) == TOTAL
    seen = set()
    for start in range(0, TOTAL, 10_000):
        for member, score in redis_client.zrange(
            keys.messages(sid), start, start + 9_999, withscores=True
        ):
            obj = json.loads(member)
            _check_restored(obj, score, scores, sample)
            seen.add(obj["id"])
    assert seen == set(scores)
    assert redis_client.hget(keys.session(sid), "id") == sid.encode()

    # Verify compares message by message inside PostgreSQL (the Redis side staged
    # a page at a time), so it stays near the others' size too. Holding one side's
    # digests in a dict, as it once did, cost about 320 bytes a message: +64 MB here.
    run, verify_mb = _dnd_client(env, tmp_path, "verify", "--session", sid)
    assert run["status"] == "completed", run
    assert run["message_count"] == TOTAL
    assert verify_mb < restore_mb + VERIFY_HEADROOM_MB, f"verify peaked at {verify_mb:.0f} MB"
    print(
        f"peak RSS: backup {backup_mb:.0f} MB, full backup {full_mb:.0f} MB, "
        f"restore {restore_mb:.0f} MB, verify {verify_mb:.0f} MB"
    )


def _check_restored(obj, score, scores, sample):
    assert scores[obj["id"]] == score
    if obj["id"] in sample:
        original = sample[obj["id"]]
        assert {k: v for k, v in obj.items() if k != "created_at"} == {
            k: v for k, v in original.items() if k != "created_at"
        }
        assert score_of(obj["created_at"]) == score_of(original["created_at"])
