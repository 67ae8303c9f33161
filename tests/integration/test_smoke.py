from tests.factories import make_sessions
from worker.runner import backup_run, restore_run


def test_backup_then_restore_round_trip(services, redis_client, keys, pg_conn):
    ids = make_sessions(redis_client, keys, 3, 10)
    run = backup_run(services)
    assert run.status.value == "completed"
    assert run.message_count == 30
    assert pg_conn.execute("select count(*) from client_messages").fetchone()[0] == 30
    redis_client.delete(*[keys.session(i) for i in ids], *[keys.messages(i) for i in ids])
    run = restore_run(services)
    assert run.message_count == 30
    assert redis_client.zcard(keys.messages(ids[0])) == 10
