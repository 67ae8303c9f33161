"""Redis Cluster as the application's Redis (REDIS_CLUSTER=1), against a real cluster.

The module starts 3 primaries with a replica each (`redis-server --cluster-enabled
yes` x6, `redis-cli --cluster create`), on free ports, and stops them by PID.
Each test has a key prefix of its own on it, and a database of its own.
"""

from __future__ import annotations

import gc
import json
import subprocess
import threading
import time
import uuid
from collections.abc import Iterator
from typing import Any

import pytest
import redis
import redis.cluster

from tests.cluster import RedisCluster, redis_cluster
from tests.factories import add_messages, make_sessions, message, session_fields, write_session
from tests.integration.helpers import backup_run, message_count, restore_run, scalar, verify_run
from tests.processes import run_cli
from tests.servers import free_port
from worker import exit_codes
from worker.drill import run_drill
from worker.keys import RedisKeys
from worker.models import RunStatus, SessionStatus
from worker.redis_store import FIRST_PAGES_AT_ONCE
from worker.services import open_services
from worker.settings import Settings


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisCluster]:
    with redis_cluster(tmp_path_factory.mktemp("cluster"), primaries=3, replicas=1) as started:
        yield started


@pytest.fixture
def rc(cluster: RedisCluster) -> Iterator[redis.cluster.RedisCluster]:
    client = redis.cluster.RedisCluster.from_url(cluster.url)
    yield client
    client.close()


@pytest.fixture
def ckeys(rc: Any) -> Iterator[RedisKeys]:
    prefix = f"dndtest:{uuid.uuid4().hex[:12]}:"
    yield RedisKeys(prefix)
    delete_under(rc, prefix)


@pytest.fixture
def cenv(database_url: str, cluster: RedisCluster, ckeys: RedisKeys) -> dict[str, str]:
    return {
        "DATABASE_URL": database_url,
        "REDIS_URL": cluster.url,
        "REDIS_CLUSTER": "1",
        "REDIS_KEY_PREFIX": ckeys.prefix,
    }


@pytest.fixture
def cservices(cenv: dict[str, str]) -> Iterator[Any]:
    with open_services(Settings.from_env(cenv), worker_name="test-worker") as opened:
        yield opened


def delete_under(client: redis.cluster.RedisCluster, prefix: str) -> None:
    found = list(client.scan_iter(match=f"{prefix}*", count=1000))
    if found:
        client.delete(*found)


def nodes_holding(client: redis.cluster.RedisCluster, keys: list[str]) -> set[str]:
    return {client.get_node_from_key(key).name for key in keys}


def redis_state(client: Any, keys: RedisKeys) -> dict[str, Any]:
    """Everything under the prefix: set members, hashes, zsets (as members with scores)."""
    members = sorted(client.smembers(keys.sessions))
    return {
        "sessions": members,
        "hashes": {m: client.hgetall(keys.session(m.decode())) for m in members},
        "zsets": {
            m: client.zrange(keys.messages(m.decode()), 0, -1, withscores=True) for m in members
        },
    }


def test_backup_and_verify_read_every_session_wherever_it_lives(
    cservices: Any, rc: Any, ckeys: RedisKeys, pg_conn: Any
) -> None:
    ids = make_sessions(rc, ckeys, 60, 7)
    # The sessions' keys are spread over all three primaries.
    assert len(nodes_holding(rc, [ckeys.messages(sid) for sid in ids])) == 3
    assert cservices.redis.cluster

    run = backup_run(cservices)

    assert run.status is RunStatus.COMPLETED
    assert run.session_count == 60
    assert message_count(pg_conn) == 60 * 7
    assert scalar(pg_conn, "SELECT count(*) FROM client_sessions") == 60
    verified = verify_run(cservices)
    assert verified.status is RunStatus.COMPLETED, verified.error
    assert verified.session_count == 60
    # Appends after the backup: the next (incremental) run reads only those.
    add_messages(rc, ckeys, ids[0], [message(ids[0], 100 + i) for i in range(3)])
    again = backup_run(cservices)
    assert again.status is RunStatus.COMPLETED
    assert message_count(pg_conn) == 60 * 7 + 3


def test_a_key_of_the_wrong_type_fails_its_session_not_the_batch(
    cservices: Any, rc: Any, ckeys: RedisKeys, pg_conn: Any
) -> None:
    ids = make_sessions(rc, ckeys, 10, 3)
    broken = write_session(rc, ckeys, session_fields())
    rc.set(ckeys.messages(broken), "not a zset")

    run = backup_run(cservices)

    results = {r.session_id: r.status for r in cservices.pg.run_results(run.id)}
    assert results[broken] is SessionStatus.FAILED
    assert all(results[sid] is SessionStatus.COMPLETED for sid in ids)
    assert message_count(pg_conn) == 30


def test_restore_writes_every_key_in_its_slot_and_leaves_no_staging(
    cservices: Any, rc: Any, ckeys: RedisKeys
) -> None:
    ids = make_sessions(rc, ckeys, 40, 5)
    empty = write_session(rc, ckeys, session_fields())  # a session without messages
    assert backup_run(cservices).status is RunStatus.COMPLETED
    before = redis_state(rc, ckeys)
    delete_under(rc, ckeys.prefix)

    run = restore_run(cservices)

    assert run.status is RunStatus.COMPLETED, run.error
    assert run.session_count == 41
    after = redis_state(rc, ckeys)
    assert after["sessions"] == before["sessions"]
    # Restores rewrite timestamps in one form (docs/contract.md): compare names,
    # and let verify compare the values.
    for member, fields in before["hashes"].items():
        assert after["hashes"][member].keys() == fields.keys()
        assert after["hashes"][member][b"name"] == fields[b"name"]
    assert {m: len(z) for m, z in after["zsets"].items()} == {
        m: len(z) for m, z in before["zsets"].items()
    }
    assert rc.exists(ckeys.messages(empty)) == 0
    assert list(rc.scan_iter(match=f"{ckeys.prefix}restore-staging*")) == []
    assert rc.ttl(ckeys.messages(ids[0])) == -1  # the staging key's expiry did not follow
    assert verify_run(cservices).status is RunStatus.COMPLETED


def test_restore_leaves_existing_sessions_unless_forced(
    cservices: Any, rc: Any, ckeys: RedisKeys, pg_conn: Any
) -> None:
    sid = make_sessions(rc, ckeys, 1, 6)[0]
    assert backup_run(cservices).status is RunStatus.COMPLETED
    # The live session moves on: a renamed session, one more message.
    rc.hset(ckeys.session(sid), "name", "changed live")
    add_messages(rc, ckeys, sid, [message(sid, 50)])

    kept = restore_run(cservices, session_id=sid)
    results = cservices.pg.run_results(kept.id)
    assert [r.status for r in results] == [SessionStatus.SKIPPED]
    assert rc.hget(ckeys.session(sid), "name") == b"changed live"
    assert rc.zcard(ckeys.messages(sid)) == 7

    forced = restore_run(cservices, session_id=sid, force=True)
    assert forced.status is RunStatus.COMPLETED, forced.error
    assert rc.hget(ckeys.session(sid), "name") != b"changed live"
    assert rc.zcard(ckeys.messages(sid)) == 6
    assert rc.sismember(ckeys.sessions, sid)
    assert list(rc.scan_iter(match=f"{ckeys.prefix}restore-staging*")) == []


def test_drill_into_another_prefix_of_the_cluster(
    cservices: Any, rc: Any, ckeys: RedisKeys
) -> None:
    make_sessions(rc, ckeys, 20, 4)
    assert backup_run(cservices).status is RunStatus.COMPLETED
    target = f"dndtest:drill:{uuid.uuid4().hex[:12]}:"
    try:
        report = run_drill(cservices, target_url=None, target_prefix=target, cleanup=False)
        assert report.restore.status is RunStatus.COMPLETED, report.restore.error
        assert report.verify.status is RunStatus.COMPLETED, report.verify.error
        assert rc.scard(f"{target}sessions") == 20
        # The same prefix on the same cluster is the live data: refused.
        with pytest.raises(Exception, match="is the live data"):
            run_drill(cservices, target_url=None, target_prefix=ckeys.prefix)
        cleaned = run_drill(cservices, target_url=None, target_prefix=target, cleanup=True)
        assert cleaned.cleaned_up == 20 * 2 + 1  # hash and zset each, and the set
        assert list(rc.scan_iter(match=f"{target}*")) == []
    finally:
        delete_under(rc, target)


def test_drill_from_a_cluster_into_a_single_redis(
    cservices: Any,
    rc: Any,
    ckeys: RedisKeys,
    redis_server_url: str,
    key_prefix: str,
) -> None:
    make_sessions(rc, ckeys, 5, 3)
    assert backup_run(cservices).status is RunStatus.COMPLETED
    report = run_drill(cservices, target_url=redis_server_url, target_prefix=key_prefix)
    assert report.verify.status is RunStatus.COMPLETED, report.verify.error
    single = redis.Redis.from_url(redis_server_url)
    try:
        assert single.scard(f"{key_prefix}sessions") == 5
    finally:
        single.close()


# -- the cluster changes during a backup ---------------------------------------


def backup_while(
    cservices: Any, change: Any, pg_conn: Any, recover: Any = None
) -> tuple[list[Any], int]:
    """Back up (again until complete) while ``change()`` runs once sessions are being stored.

    Returns the runs and how many sessions had results when the change began.
    """
    runs: list[Any] = []
    errors: list[BaseException] = []

    def backup() -> None:
        try:
            runs.append(backup_run(cservices))
        except BaseException as exc:  # handed to the test
            errors.append(exc)

    thread = threading.Thread(target=backup)
    thread.start()
    deadline = time.monotonic() + 60
    done_at_change = 0
    while time.monotonic() < deadline:
        done_at_change = int(scalar(pg_conn, "SELECT count(*) FROM client_sessions"))
        if done_at_change > 0:
            break
        time.sleep(0.02)
    change()
    thread.join(300)
    assert not thread.is_alive()
    # A batch that met the change may have failed (a transient error, retried
    # by Celery once the cluster has recovered): the next run backs up what it did not.
    if errors or runs[-1].status is not RunStatus.COMPLETED:
        if recover is not None:
            recover()
        runs.append(backup_run(cservices))
    return runs, done_at_change


def count_in_redis(rc: Any, keys: RedisKeys, ids: list[str]) -> int:
    pipe = rc.pipeline(transaction=False)
    for sid in ids:
        pipe.zcard(keys.messages(sid))
    return sum(pipe.execute())


def slow_batches(cenv: dict[str, str]) -> Iterator[Any]:
    """Services backing up 5 sessions per batch: a backup long enough to change things under."""
    with open_services(
        Settings.from_env({**cenv, "BACKUP_BATCH_SESSIONS": "5"}), worker_name="test-worker"
    ) as opened:
        yield opened


def test_a_primary_failover_during_a_backup_loses_and_duplicates_nothing(
    cluster: RedisCluster, cenv: dict[str, str], rc: Any,
    ckeys: RedisKeys, pg_conn: Any,
) -> None:  # fmt: skip
    ids = make_sessions(rc, ckeys, 400, 20)
    primary = rc.get_node_from_key(ckeys.messages(ids[-1])).port
    replica = cluster.replica_of(primary)

    def failover() -> None:
        client = cluster.client(replica)
        try:
            client.execute_command("CLUSTER", "FAILOVER")
            deadline = time.monotonic() + 30
            while client.execute_command("ROLE")[0] != b"master":
                assert time.monotonic() < deadline, "the replica was not promoted"
                time.sleep(0.05)
        finally:
            client.close()

    for services in slow_batches(cenv):
        runs, done_before = backup_while(services, failover, pg_conn)
    assert done_before < len(ids), "the backup ended before the failover began"
    assert replica in cluster.primaries()
    stored = message_count(pg_conn)
    assert stored == count_in_redis(rc, ckeys, ids) == 400 * 20
    assert scalar(pg_conn, "SELECT count(DISTINCT id) FROM client_messages") == stored
    assert scalar(pg_conn, "SELECT count(*) FROM client_sessions") == 400
    assert runs[-1].status is RunStatus.COMPLETED


# A --local run that stops on an error leaves the connection of a batch thread
# still at work open (worker/runner.py: "the ones at work ... roll back if the
# process exits"); in a test, the process goes on and psycopg warns when it is
# collected. Collected here, so that the warning belongs to this test.
@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
def test_a_killed_primary_during_a_backup_loses_and_duplicates_nothing(
    cluster: RedisCluster, cenv: dict[str, str], rc: Any, ckeys: RedisKeys, pg_conn: Any
) -> None:
    ids = make_sessions(rc, ckeys, 400, 20)
    primary = rc.get_node_from_key(ckeys.messages(ids[-1])).port
    replica = cluster.replica_of(primary)
    victim = cluster.node_by_port(primary)
    cluster.wait_ok()  # its replica in sync, so that it may take over

    def kill() -> None:
        victim.kill()  # SIGKILL: its replica is promoted after cluster-node-timeout (2 s)

    try:
        for services in slow_batches(cenv):
            runs, done_before = backup_while(services, kill, pg_conn, cluster.wait_ok)
    finally:
        # Back as an empty node: it rejoins as the replica of the promoted one.
        victim.start()
        cluster.wait_ok()
    gc.collect()
    assert done_before < len(ids), "the backup ended before the primary was killed"
    assert replica in cluster.primaries()
    stored = message_count(pg_conn)
    assert stored == count_in_redis(rc, ckeys, ids) == 400 * 20
    assert scalar(pg_conn, "SELECT count(DISTINCT id) FROM client_messages") == stored
    assert scalar(pg_conn, "SELECT count(*) FROM client_sessions") == 400
    assert runs[-1].status is RunStatus.COMPLETED


def test_a_slot_migration_during_a_backup_loses_and_duplicates_nothing(
    cluster: RedisCluster, cenv: dict[str, str], rc: Any,
    ckeys: RedisKeys, pg_conn: Any,
) -> None:  # fmt: skip
    ids = make_sessions(rc, ckeys, 400, 20)
    source, target = cluster.primaries()[:2]
    moved_before = nodes_holding(rc, [ckeys.messages(sid) for sid in ids])

    def reshard() -> None:
        ids_of = {}
        for port in (source, target):
            client = cluster.client(port)
            try:
                ids_of[port] = client.execute_command("CLUSTER", "MYID").decode()
            finally:
                client.close()
        subprocess.run(
            [cluster.cli, "--cluster", "reshard", f"127.0.0.1:{source}",
             "--cluster-from", ids_of[source], "--cluster-to", ids_of[target],
             "--cluster-slots", "1500", "--cluster-yes"],
            check=True, capture_output=True, timeout=120,
        )  # fmt: skip

    for services in slow_batches(cenv):
        runs, done_before = backup_while(services, reshard, pg_conn)
    assert done_before < len(ids), "the backup ended before the migration began"
    assert len(moved_before) == 3
    stored = message_count(pg_conn)
    assert stored == count_in_redis(rc, ckeys, ids) == 400 * 20
    assert scalar(pg_conn, "SELECT count(DISTINCT id) FROM client_messages") == stored
    assert scalar(pg_conn, "SELECT count(*) FROM client_sessions") == 400
    assert runs[-1].status is RunStatus.COMPLETED


# -- reading: first pages grouped, the rest page by page -------------------------


def tied_sessions(client: Any, keys: RedisKeys) -> dict[str, set[bytes]]:
    """Sessions of 0 to 400 members, many sharing a score (ties across page ends)."""
    members: dict[str, set[bytes]] = {}
    for size in (0, 1, 9, 10, 11, 40, 137, 330, 331, 400, 800):
        sid = str(uuid.uuid4())
        scored = {f"{sid}:{i}".encode(): i // 7 for i in range(size)}
        if scored:
            client.zadd(keys.messages(sid), scored)
        members[sid] = set(scored)
    return members


@pytest.mark.parametrize("where", ["single", "cluster"])
def test_read_many_reads_every_member_once(
    where: str, settings: Settings, cenv: dict[str, str]
) -> None:
    env_settings = settings if where == "single" else Settings.from_env(cenv)
    with open_services(env_settings, worker_name="test-worker") as services:
        store = services.redis
        expected = tied_sessions(store.client, store.keys)
        requests = [(sid, None) for sid in expected] + [(next(iter(expected)), 3.0)]
        got: dict[int, list[bytes]] = {}
        # chunk 320: first pages of 320 / FIRST_PAGES_AT_ONCE = 10 members, then pages of 320.
        assert 320 // FIRST_PAGES_AT_ONCE == 10
        for index, page in store.read_many(requests, 320):
            got.setdefault(index, []).extend(member for member, _score in page)
    for index, (sid, after) in enumerate(requests):
        read = got.get(index, [])
        assert len(read) == len(set(read)), f"session {index} read a member twice"
        wanted = {m for m in expected[sid] if after is None or int(m.split(b":")[1]) // 7 > after}
        assert set(read) == wanted


# -- the command line, as a user types it ----------------------------------------


def test_cli_backup_verify_and_restore_on_a_cluster(
    cenv: dict[str, str], rc: Any, ckeys: RedisKeys, pg_conn: Any
) -> None:
    make_sessions(rc, ckeys, 12, 5)
    backup = run_cli(cenv, "backup", "--all", "--local", "--output", "json")
    assert backup.returncode == 0, backup.stderr
    assert json.loads(backup.stdout)["message_count"] == 60
    verify = run_cli(cenv, "verify", "--all", "--local", "--output", "json")
    assert verify.returncode == 0, verify.stderr
    delete_under(rc, ckeys.prefix)
    restore = run_cli(cenv, "restore", "--all", "--local", "--output", "json")
    assert restore.returncode == 0, restore.stderr
    assert rc.scard(ckeys.sessions) == 12


def test_cli_errors_of_a_cluster_setting(cenv: dict[str, str], cluster: RedisCluster) -> None:
    wrong_db = {**cenv, "REDIS_URL": cluster.url.replace("/0", "/3")}
    other_db = run_cli(wrong_db, "backup", "--all", "--local")
    assert other_db.returncode == exit_codes.CONFIG
    assert (
        other_db.stderr.strip()
        .splitlines()[-1]
        .endswith("REDIS_URL: a Redis Cluster has only database 0 (got /3)")
    )
    nobody = run_cli(
        {**cenv, "REDIS_URL": f"redis://:s3cret@127.0.0.1:{free_port()}/0"},
        "backup", "--all", "--local",
    )  # fmt: skip
    assert nobody.returncode == exit_codes.UNAVAILABLE
    assert "cannot reach Redis Cluster" in nobody.stderr
    assert "check REDIS_URL" in nobody.stderr
    assert "s3cret" not in nobody.stderr
    bad_flag = run_cli({**cenv, "REDIS_CLUSTER": "maybe"}, "backup", "--all", "--local")
    assert bad_flag.returncode == exit_codes.CONFIG
    assert "REDIS_CLUSTER must be 1 or 0" in bad_flag.stderr
