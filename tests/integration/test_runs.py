"""The run layer (worker/runs.py) on real servers: one path for every kind of run."""

from __future__ import annotations

import pytest

from tests.factories import message, new_id, session_fields, write_session
from tests.integration.helpers import rows, snapshot
from worker import runs
from worker.errors import RunInProgress
from worker.models import BackupOptions, RestoreOptions, RunStatus, SessionStatus, VerifyOptions
from worker.runner import run_local


def _sessions(redis_client, keys, count):
    sids = sorted(new_id() for _ in range(count))
    for sid in sids:
        write_session(redis_client, keys, session_fields(sid), [message(sid, i) for i in range(3)])
    return sids


def test_a_run_over_a_list_of_sessions_covers_exactly_those(services, redis_client, keys, pg_conn):
    named = _sessions(redis_client, keys, 3)
    other = _sessions(redis_client, keys, 1)[0]
    run = run_local(services, BackupOptions(), session_ids=[named[0], named[2], named[0]])
    assert (run.scope, run.status, run.session_count, run.message_count) == (
        "list",
        RunStatus.COMPLETED,
        2,
        6,
    )
    assert run.expected_sessions == 2
    stored = {
        r["session_id"] for r in rows(pg_conn, "SELECT id::text AS session_id FROM client_sessions")
    }
    assert stored == {named[0], named[2]}
    assert other not in stored


def test_a_list_names_its_sessions_so_a_missing_one_fails(services, redis_client, keys):
    [present] = _sessions(redis_client, keys, 1)
    missing = new_id()
    run = run_local(services, BackupOptions(), session_ids=[present, missing])
    results = {r.session_id: r for r in services.pg.run_results(run.id)}
    assert results[present].status is SessionStatus.COMPLETED
    assert results[missing].status is SessionStatus.FAILED
    assert results[missing].error == f"session {missing} not found in Redis"
    assert run.status is RunStatus.FAILED


@pytest.mark.parametrize(
    ("options", "details"),
    [
        (BackupOptions(full=True), {"full": True}),
        (RestoreOptions(force=True), {"force": True}),
        (VerifyOptions(quick=True), {"quick": True}),
    ],
)
def test_the_options_say_the_kind_and_are_recorded(
    services, redis_client, keys, pg_conn, options, details
):
    [sid] = _sessions(redis_client, keys, 1)
    run_local(services, BackupOptions(), session_ids=[sid])
    run = run_local(services, options, session_ids=[sid])
    row = snapshot(pg_conn, run.id)
    assert row["kind"] == options.kind
    assert row["forced"] is options.forced
    assert {k: row["details"][k] for k in details} == details
    assert row["details"]["mode"] == "local"


def test_start_with_a_chosen_id_returns_the_recorded_run_the_second_time(
    services, redis_client, keys
):
    sids = _sessions(redis_client, keys, 2)
    run_id = new_id()
    first = runs.start(services, BackupOptions(), session_ids=sids, run_id=run_id)
    again = runs.start(services, BackupOptions(), session_ids=sids, run_id=run_id)
    assert first.created
    assert not again.created
    assert again.run.id == first.run.id == run_id
    assert again.session_ids == sids


def test_a_second_run_over_all_of_a_kind_is_refused_while_one_runs(services, redis_client, keys):
    _sessions(redis_client, keys, 1)
    running = runs.start(services, BackupOptions())
    with pytest.raises(RunInProgress) as refused:
        runs.start(services, BackupOptions())
    assert refused.value.run_id == running.run.id
    # Another kind, or named sessions, may run meanwhile.
    runs.start(services, VerifyOptions())
    runs.start(services, BackupOptions(), session_ids=[new_id()])


def test_every_kind_goes_through_the_same_steps(services, redis_client, keys):
    sids = _sessions(redis_client, keys, 3)
    for options in (BackupOptions(), VerifyOptions(), RestoreOptions(force=True)):
        started = runs.start(services, options)
        assert started.session_ids == sids
        for batch in runs.cut_batches(started.session_ids, 8, 2):
            runs.run_batch(services, options, started.run.id, batch.session_ids)
        run = runs.finish(services, started.run.id)
        assert (run.kind, run.status, run.session_count) == (
            options.kind,
            RunStatus.COMPLETED,
            3,
        )


def test_a_batch_bigger_than_a_transaction_is_worked_through_in_parts(
    env, redis_client, keys, pg_conn
):
    from worker.services import open_services
    from worker.settings import Settings

    sids = _sessions(redis_client, keys, 5)
    small = Settings.from_env({**env, "BACKUP_BATCH_SESSIONS": "2", "RUN_MAX_BATCHES": "1"})
    with open_services(small, worker_name="test-worker") as services:
        started = runs.start(services, BackupOptions())
        batches = runs.cut_batches(started.session_ids, 1, 2, small.run_max_batches)
        assert [b.session_ids for b in batches] == [sids]
        runs.hand_out(services, started.run.id, batches)
        # A first try that ended after one part: its results are recorded.
        runs.run_batch(services, BackupOptions(), started.run.id, sids[:2])
        results = runs.run_handed_out_batch(services, BackupOptions(), started.run.id, 0)
        run = runs.finish(services, started.run.id)
    assert results is not None
    assert [r.session_id for r in results] == sids[2:]  # resumed after the recorded part
    assert (run.status, run.session_count, run.message_count) == (RunStatus.COMPLETED, 5, 15)
    # One transaction per part of BACKUP_BATCH_SESSIONS: [2] first, then [2, 1].
    parts = rows(
        pg_conn,
        "SELECT xmin::text AS xid, count(*) AS n FROM client_sessions GROUP BY 1 ORDER BY 1",
    )
    assert sorted(r["n"] for r in parts) == [1, 2, 2]
