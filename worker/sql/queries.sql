-- Every query the PostgreSQL store runs, as named blocks: a line "-- name: x"
-- starts the query named x (loaded by worker/sql/__init__.py). Parameters are
-- psycopg's %(name)s placeholders; nothing is ever spliced in as text.

-- name: migration_applied
-- Is this migration applied? (yoyo's bookkeeping table: no table, no schema.)
SELECT EXISTS (SELECT 1 FROM _yoyo_migration WHERE migration_id = %(id)s) AS applied;

-- name: lock_sessions
-- Serialises every backup and restore of the same session, across processes
-- and hosts: they all share this database. Transaction-scoped, so a crashed
-- worker's locks go with its connection. Taken in key order: two batches that
-- share sessions can never deadlock.
SELECT pg_advisory_xact_lock(1684956267, key)
FROM (SELECT DISTINCT hashtext(id) AS key FROM unnest(%(ids)s::text[]) AS id) AS keys
ORDER BY key;

-- name: prefer_indexes
-- Every lookup of a backup is by key. Without this, the foreign-key check of
-- each COPYed message (a query PostgreSQL plans once per connection and then
-- keeps) can be planned as a sequential scan of client_sessions while that
-- table is still small (a first backup), and stay one as it grows: every
-- message then scans every session (measured: 1M messages, 3x slower).
-- And no JIT: a plan with a disabled node costs 1e10, far above jit_above_cost,
-- so every merge query was JIT-compiled with inlining and optimisation, 0.5 to
-- 2 s each whatever its size: a 10,000-message session took 10 s to merge
-- (bench/pg_scale.py, docs/scaling.md). The plans themselves are kept right
-- (the staging table's index, lookups one ID at a time; test_merge_plans.py
-- checks each is costed below the JIT threshold); this is the guard for a
-- statement added later. Every query of a backup reads by key.
SET LOCAL enable_seqscan = off;
SET LOCAL jit = off;

-- name: watermarks
-- Rows by name: every query read into a dataclass (see pg_store.Rows) names its
-- columns after the fields, with an alias wherever a column is cast.
SELECT session_id::text AS session_id, hash_digest, message_count, max_score
FROM backup_watermarks
WHERE session_id = ANY(%(ids)s::uuid[]);

-- name: upsert_session
INSERT INTO client_sessions (
    id, created_at, updated_at, deleted_at, name, creator_id, mcp_server_url,
    websocket_key, max_players, settings, status, backed_up_at
) VALUES (
    %(id)s, %(created_at)s, %(updated_at)s, %(deleted_at)s, %(name)s, %(creator_id)s,
    %(mcp_server_url)s, %(websocket_key)s, %(max_players)s, %(settings)s::jsonb, %(status)s, now()
)
ON CONFLICT (id) DO UPDATE SET
    created_at = EXCLUDED.created_at,
    updated_at = EXCLUDED.updated_at,
    deleted_at = EXCLUDED.deleted_at,
    name = EXCLUDED.name,
    creator_id = EXCLUDED.creator_id,
    mcp_server_url = EXCLUDED.mcp_server_url,
    websocket_key = EXCLUDED.websocket_key,
    max_players = EXCLUDED.max_players,
    settings = EXCLUDED.settings,
    status = EXCLUDED.status,
    backed_up_at = now();

-- name: copy_messages
-- Text, not binary: binary saves PostgreSQL parsing UUIDs and timestamps, but
-- making UUID objects costs us more than it saves (measured on 1M messages:
-- 9.4 s text, 10.5 s binary), and a backup keeps both sides busy.
COPY client_messages (id, session_id, created_at, role, content, tool_calls, player_id)
FROM STDIN;

-- name: create_merge_tables
-- Per-connection scratch tables for the merge path (see PostgresStore.merge_chunk).
-- The index on merge_staging.id is what keeps the merge path's plans right:
-- backups run with enable_seqscan off (prefer_indexes), and a sequential scan
-- then costs 10^10 more, which also crosses jit_above_cost, so PostgreSQL
-- JIT-compiled every merge statement (100-500 ms of JIT each for a query of a
-- few milliseconds: `backup --all --full` of 300 x 100 messages took 119 s
-- against 1.6 s cold). With the index every statement here reads the staging
-- table through it, is costed honestly and is never compiled.
CREATE TEMPORARY TABLE IF NOT EXISTS merge_staging (
    id uuid NOT NULL,
    session_id uuid NOT NULL,
    created_at timestamptz NOT NULL,
    role text NOT NULL,
    content text,
    tool_calls jsonb,
    player_id text
) ON COMMIT DELETE ROWS;
CREATE INDEX IF NOT EXISTS merge_staging_id_idx ON merge_staging (id);
CREATE TEMPORARY TABLE IF NOT EXISTS merge_seen (id uuid PRIMARY KEY) ON COMMIT DELETE ROWS;

-- name: reset_merge_seen
TRUNCATE merge_seen;

-- name: copy_merge_staging
COPY merge_staging (id, session_id, created_at, role, content, tool_calls, player_id)
FROM STDIN;

-- name: merge_rejects
-- Rows of the chunk that must not be merged: an ID already read earlier in this
-- session's scan ('duplicate'), or an ID that belongs to another session (its ID).
WITH fresh AS (
    INSERT INTO merge_seen (id)
    SELECT id FROM merge_staging
    ON CONFLICT DO NOTHING
    RETURNING id
)
-- The owner of each ID is looked up one ID at a time (LATERAL ... LIMIT 1, which
-- the planner cannot turn back into a join): as a plain join, the planner knows
-- nothing of the temporary table and chose a merge join over the whole primary
-- key of client_messages, 22 s a chunk at 1 million rows, minutes at 20 million
-- (bench/pg_scale.py, docs/scaling.md).
SELECT s.id::text AS message_id,
       CASE WHEN f.id IS NULL THEN 'duplicate' ELSE m.session_id::text END AS reason
FROM merge_staging s
LEFT JOIN fresh f ON f.id = s.id
LEFT JOIN LATERAL (
    SELECT c.session_id FROM client_messages c
    WHERE c.id = s.id AND c.session_id <> s.session_id
    LIMIT 1
) m ON true
WHERE f.id IS NULL OR m.session_id IS NOT NULL;

-- name: drop_merge_rejects
DELETE FROM merge_staging WHERE id = ANY(%(ids)s::uuid[]);

-- name: merge_messages
-- New messages are inserted; a message whose content changed in Redis (an
-- edit) is updated; an identical one is left alone, so rowcount counts exactly
-- the messages this run stored. In ID order: the staging table is then read
-- through its index (see create_merge_tables), and two merges that share
-- messages lock them in the same order.
INSERT INTO client_messages (id, session_id, created_at, role, content, tool_calls, player_id)
SELECT id, session_id, created_at, role, content, tool_calls, player_id FROM merge_staging
ORDER BY id
ON CONFLICT (id) DO UPDATE SET
    created_at = EXCLUDED.created_at,
    role = EXCLUDED.role,
    content = EXCLUDED.content,
    tool_calls = EXCLUDED.tool_calls,
    player_id = EXCLUDED.player_id
WHERE client_messages.session_id = EXCLUDED.session_id
  AND (client_messages.created_at, client_messages.role, client_messages.content,
       client_messages.tool_calls, client_messages.player_id)
      IS DISTINCT FROM
      (EXCLUDED.created_at, EXCLUDED.role, EXCLUDED.content,
       EXCLUDED.tool_calls, EXCLUDED.player_id);

-- name: merge_late_rejects
-- Rows merge_messages skipped: their ID was committed for another session by a
-- concurrent backup after merge_rejects looked (the INSERT waited for it, then
-- its ON CONFLICT ... WHERE left the other session's row alone).
-- One ID at a time, as in merge_rejects.
SELECT s.id::text AS message_id, m.session_id::text AS reason
FROM merge_staging s
CROSS JOIN LATERAL (
    SELECT c.session_id FROM client_messages c
    WHERE c.id = s.id AND c.session_id <> s.session_id
    LIMIT 1
) m
ORDER BY s.id;  -- through the staging table's index: see create_merge_tables

-- name: clear_merge_staging
TRUNCATE merge_staging;

-- name: save_watermark
INSERT INTO backup_watermarks (session_id, hash_digest, message_count, max_score, snapshot_id)
VALUES (%(session_id)s, %(hash_digest)s, %(message_count)s, %(max_score)s, %(snapshot_id)s)
ON CONFLICT (session_id) DO UPDATE SET
    hash_digest = EXCLUDED.hash_digest,
    message_count = EXCLUDED.message_count,
    max_score = EXCLUDED.max_score,
    snapshot_id = EXCLUDED.snapshot_id,
    updated_at = now();

-- name: keep_record
INSERT INTO persistence_kept_records (
    kind, redis_key, session_id, message_id, score, reason, raw, raw_sha256, preview,
    first_snapshot_id, last_snapshot_id
) VALUES (
    %(kind)s, %(redis_key)s, %(session_id)s, %(message_id)s, %(score)s, %(reason)s, %(raw)s,
    sha256(%(raw)s), %(preview)s, %(snapshot_id)s, %(snapshot_id)s
)
ON CONFLICT (redis_key, raw_sha256) DO UPDATE SET
    reason = EXCLUDED.reason,
    -- Seen again: still in Redis, still not stored. Whoever marked it resolved
    -- should know it is back.
    resolved_at = NULL,
    last_snapshot_id = EXCLUDED.last_snapshot_id,
    last_seen_at = now(),
    times_seen = persistence_kept_records.times_seen + 1;

-- name: list_kept_records
SELECT id, kind, redis_key, session_id, message_id, score, reason, preview,
       first_snapshot_id::text AS first_snapshot_id, last_snapshot_id::text AS last_snapshot_id,
       first_seen_at, last_seen_at, times_seen, resolved_at
FROM persistence_kept_records
WHERE (%(include_resolved)s OR resolved_at IS NULL)
  AND (%(snapshot_id)s::uuid IS NULL OR last_snapshot_id = %(snapshot_id)s::uuid)
ORDER BY id DESC
LIMIT %(limit)s;

-- name: resolve_kept_records
UPDATE persistence_kept_records SET resolved_at = now()
WHERE id = ANY(%(ids)s::bigint[]) AND resolved_at IS NULL;

-- name: sessions
SELECT id::text AS id, name, creator_id, mcp_server_url, websocket_key, created_at, updated_at,
       max_players, settings::text AS settings, status, deleted_at
FROM client_sessions
WHERE id = ANY(%(ids)s::uuid[]);

-- name: live_session_ids_page
-- Keyset pagination over the sessions a restore may bring back.
SELECT id::text AS id FROM client_sessions
WHERE deleted_at IS NULL AND (%(after)s::uuid IS NULL OR id > %(after)s::uuid)
ORDER BY id
LIMIT %(limit)s;

-- name: count_soft_deleted
SELECT count(*) AS sessions FROM client_sessions WHERE deleted_at IS NOT NULL;

-- name: restore_members
-- Messages as the zset members a restore writes: compact JSON in the
-- contract's key order, built by PostgreSQL (which has a core of its own) so
-- the restoring process only moves bytes. Timestamps are RFC 3339 in UTC; the
-- score is created_at in epoch milliseconds, rounded down like Go's UnixMilli.
COPY (
    SELECT session_id::text,
           convert_to(
               '{"id":"' || id::text
               || '","session_id":"' || session_id::text
               || '","created_at":"'
               || to_char(created_at AT TIME ZONE 'UTC', 'YYYY-MM-DD"T"HH24:MI:SS.US"Z"')
               || '","role":' || to_json(role)::text
               || ',"content":' || coalesce(to_json(content)::text, 'null')
               || ',"tool_calls":' || coalesce(tool_calls::text, 'null')
               || ',"player_id":' || coalesce(to_json(player_id)::text, 'null')
               || '}',
               'UTF8'),
           floor(extract(epoch FROM created_at) * 1000)::bigint
    FROM client_messages
    WHERE session_id = ANY(%(ids)s::uuid[])
) TO STDOUT (FORMAT BINARY);

-- name: message_counts
SELECT session_id::text AS session_id, count(*) AS messages FROM client_messages
WHERE session_id = ANY(%(ids)s::uuid[])
GROUP BY session_id;

-- name: start_run
INSERT INTO persistence_snapshots (id, kind, scope, forced, expected_sessions, kept_count, details,
                                  as_of)
VALUES (%(id)s, %(kind)s, %(scope)s, %(forced)s, %(expected_sessions)s, %(kept_count)s,
        %(details)s::jsonb, %(as_of)s::timestamptz)
-- A retried task starts "its" run again: the run is already there, keep it.
ON CONFLICT (id) DO NOTHING
RETURNING id::text AS id, kind, scope, status, created_at, finished_at, session_count,
          message_count, kept_count, failed_count, duration_ms, error, forced,
          expected_sessions, details, as_of;

-- name: record_results
INSERT INTO persistence_session_results (
    snapshot_id, session_id, status, messages, kept, duration_ms, error, shard, worker,
    finished_at, details
)
SELECT %(snapshot_id)s, r.session_id, r.status, r.messages, r.kept, r.duration_ms, r.error,
       r.shard, r.worker, coalesce(r.finished_at, now()), r.details
FROM unnest(%(session_ids)s::uuid[], %(statuses)s::text[], %(messages)s::int[], %(kept)s::int[],
            %(durations)s::int[], %(errors)s::text[], %(shards)s::int[], %(workers)s::text[],
            %(finished)s::timestamptz[], %(details)s::jsonb[])
     AS r (session_id, status, messages, kept, duration_ms, error, shard, worker, finished_at,
           details)
-- A retried task reports again: its latest word replaces the earlier one.
ON CONFLICT (snapshot_id, session_id) DO UPDATE SET
    status = EXCLUDED.status,
    messages = EXCLUDED.messages,
    kept = EXCLUDED.kept,
    duration_ms = EXCLUDED.duration_ms,
    error = EXCLUDED.error,
    shard = EXCLUDED.shard,
    worker = EXCLUDED.worker,
    finished_at = EXCLUDED.finished_at,
    details = EXCLUDED.details;

-- name: finish_run
-- Totals come from the per-session results, so the numbers in the snapshot row
-- always agree with its results, whoever finishes the run. Only a running run
-- is finished: finishing twice changes nothing.
WITH totals AS (
    SELECT count(*) AS sessions,
           coalesce(sum(messages), 0) AS messages,
           coalesce(sum(kept), 0) AS kept,
           -- A verify's 'different' sessions fail it as errors fail a backup.
           count(*) FILTER (WHERE status IN ('failed', 'different')) AS failed,
           count(*) FILTER (WHERE status = 'skipped') AS skipped,
           count(*) FILTER (WHERE status = 'unchanged') AS unchanged,
           (array_agg(session_id::text || ': ' || coalesce(error, 'no reason given')
                      ORDER BY finished_at) FILTER (WHERE status IN ('failed', 'different')))[1]
               AS first_failure
    FROM persistence_session_results
    WHERE snapshot_id = %(id)s
)
UPDATE persistence_snapshots AS s SET
    session_count = t.sessions,
    message_count = t.messages,
    kept_count = s.kept_count + t.kept,
    failed_count = t.failed,
    -- What the summary shows beside the totals: why sessions moved nothing.
    details = s.details || jsonb_build_object('skipped', t.skipped, 'unchanged', t.unchanged),
    finished_at = now(),
    duration_ms = (extract(epoch FROM now() - s.created_at) * 1000)::bigint,
    error = coalesce(%(error)s::text,
                     CASE WHEN s.expected_sessions > t.sessions
                          THEN (s.expected_sessions - t.sessions)::text
                               || ' of ' || s.expected_sessions::text
                               || ' sessions have no result' END,
                     CASE WHEN t.failed > 0
                          THEN t.failed::text
                               || CASE WHEN s.kind = 'verify' THEN ' session(s) differ'
                                       ELSE ' session(s) failed' END
                               || '; first: ' || t.first_failure END),
    status = CASE
        WHEN %(error)s::text IS NOT NULL OR t.failed > 0 OR s.expected_sessions > t.sessions
            THEN 'failed'
        WHEN s.kept_count + t.kept > 0 THEN 'partial'
        ELSE 'completed'
    END
FROM totals AS t
WHERE s.id = %(id)s AND s.status = 'running'
RETURNING s.id::text AS id, s.kind, s.scope, s.status, s.created_at, s.finished_at,
          s.session_count, s.message_count, s.kept_count, s.failed_count, s.duration_ms,
          s.error, s.forced, s.expected_sessions, s.details, s.as_of;

-- name: get_run
SELECT id::text AS id, kind, scope, status, created_at, finished_at, session_count, message_count,
       kept_count, failed_count, duration_ms, error, forced, expected_sessions, details, as_of
FROM persistence_snapshots
WHERE id = %(id)s;

-- name: list_runs
SELECT id::text AS id, kind, scope, status, created_at, finished_at, session_count, message_count,
       kept_count, failed_count, duration_ms, error, forced, expected_sessions, details, as_of
FROM persistence_snapshots
WHERE (%(kind)s::text IS NULL OR kind = %(kind)s::text)
ORDER BY created_at DESC, id DESC
LIMIT %(limit)s;

-- name: run_progress
-- What a waiting CLI shows: how many sessions of the run have reported so far.
SELECT count(*) AS sessions, coalesce(sum(messages), 0) AS messages,
       coalesce(sum(kept), 0) AS kept, count(*) FILTER (WHERE status = 'failed') AS failed
FROM persistence_session_results
WHERE snapshot_id = %(id)s;

-- name: run_results
SELECT session_id::text AS session_id, status, messages, kept, duration_ms, error, shard, worker,
       finished_at, details
FROM persistence_session_results
WHERE snapshot_id = %(id)s
ORDER BY finished_at, session_id;

-- name: get_kept_record
SELECT id, kind, redis_key, session_id, message_id, score, reason, raw, preview,
       first_snapshot_id::text AS first_snapshot_id, last_snapshot_id::text AS last_snapshot_id,
       first_seen_at, last_seen_at, times_seen, resolved_at
FROM persistence_kept_records
WHERE id = %(id)s;

-- name: running_full_run
SELECT id::text AS id FROM persistence_snapshots
WHERE kind = %(kind)s AND scope = 'all' AND status = 'running';

-- name: stale_runs
-- Runs still `running` with no sign of life (no per-session result, and not
-- started) for longer than the given number of seconds.
SELECT s.id::text AS id
FROM persistence_snapshots s
WHERE s.status = 'running'
  AND greatest(s.created_at,
               (SELECT max(r.finished_at) FROM persistence_session_results r
                WHERE r.snapshot_id = s.id))
      < now() - make_interval(secs => %(seconds)s);

-- name: mark_run_dispatched
UPDATE persistence_snapshots
SET details = details || jsonb_build_object('dispatched', true)
WHERE id = %(id)s;

-- name: checksums
SELECT session_id::text AS session_id, message_count, messages_digest, session_digest
FROM backup_checksums
WHERE session_id = ANY(%(ids)s::uuid[]);

-- name: save_checksum
INSERT INTO backup_checksums (session_id, message_count, messages_digest, session_digest,
                              snapshot_id)
VALUES (%(session_id)s, %(message_count)s, %(messages_digest)s, %(session_digest)s,
        %(snapshot_id)s)
ON CONFLICT (session_id) DO UPDATE SET
    message_count = EXCLUDED.message_count,
    messages_digest = EXCLUDED.messages_digest,
    session_digest = EXCLUDED.session_digest,
    snapshot_id = EXCLUDED.snapshot_id,
    computed_at = now();

-- name: message_rows
-- Messages as stored, for checksums and verify (digests are computed in
-- Python, the same way for rows read from Redis).
COPY (
    SELECT id::text, session_id::text, created_at, role, content, tool_calls::text, player_id
    FROM client_messages
    WHERE session_id = ANY(%(ids)s::uuid[])
) TO STDOUT (FORMAT BINARY);

-- name: create_verify_tables
-- Verify's scratch tables (see PostgresStore.verify_staging), for one session at
-- a time, so that the two sides are compared inside PostgreSQL and verify's
-- memory stays flat whatever the session's size.
-- verify_redis: the digests of the session's messages as read from Redis.
-- `ordinal` is the member's place in Redis (score order): of two members with
-- one ID, the backup keeps the first. `fingerprint`: SHA-256 of the member's
-- canonical form (worker/checksums.py), NULL with tool_calls. No index: the
-- queries below read it whole (a sort), and keeping an index up to date cost
-- more than the table's COPY (measured: 17 ms against 11 ms for 10,000 rows).
CREATE TEMPORARY TABLE IF NOT EXISTS verify_redis (
    id uuid NOT NULL,
    ordinal bigint NOT NULL,
    digest bytea NOT NULL,
    fingerprint bytea
) ON COMMIT DELETE ROWS;
-- verify_stored: the backup's side of a big session, staged (stage_verify_stored)
-- while the worker reads and digests Redis's side, so that the two run at once:
-- client_messages' columns (names, types, NOT NULL) and the fingerprint.
CREATE TEMPORARY TABLE IF NOT EXISTS verify_stored (
    LIKE client_messages,
    fingerprint bytea
) ON COMMIT DELETE ROWS;
-- A stored message's fingerprint: built here as Python builds the canonical
-- form of a message without tool_calls (a JSON array of its ID, created_at in
-- epoch microseconds, role, content, null and player_id; to_json escapes as
-- orjson does), so that equal fingerprints mean equal canonical forms, hence
-- equal digests (canonical_fingerprint in worker/checksums.py). NULL with
-- tool_calls: jsonb orders their keys otherwise. A SQL function: inlined into
-- the queries that call it.
CREATE OR REPLACE FUNCTION pg_temp.verify_fingerprint(
    id uuid, created_at timestamptz, role text, content text, tool_calls jsonb, player_id text
) RETURNS bytea
LANGUAGE sql STABLE AS $$
    SELECT CASE WHEN tool_calls IS NULL AND isfinite(created_at) THEN sha256(convert_to(
        '["' || id::text
        || '",' || (extract(epoch FROM created_at) * 1000000)::bigint::text
        || ',' || to_json(role)::text
        || ',' || coalesce(to_json(content)::text, 'null')
        || ',null,' || coalesce(to_json(player_id)::text, 'null') || ']',
        'UTF8')) END
$$;
-- The backup's messages of one session (with `at`: as history holds them at
-- that moment), each with its fingerprint. PL/pgSQL, for its plan cache: each
-- branch is planned once per connection, where a query naming both would plan
-- the history functions for every session (0.3 to 0.5 ms, measured: a third of
-- the verify of a small session).
CREATE OR REPLACE FUNCTION pg_temp.verify_backup(session uuid, at timestamptz)
RETURNS TABLE (
    id uuid, session_id uuid, created_at timestamptz, role text, content text,
    tool_calls jsonb, player_id text, fingerprint bytea
)
LANGUAGE plpgsql STABLE AS $$
BEGIN
    IF at IS NULL THEN
        RETURN QUERY
        SELECT m.id, m.session_id, m.created_at, m.role, m.content, m.tool_calls, m.player_id,
               pg_temp.verify_fingerprint(m.id, m.created_at, m.role, m.content, m.tool_calls,
                                          m.player_id)
        FROM client_messages m
        WHERE m.session_id = session;
    ELSE
        RETURN QUERY
        SELECT h.id, h.session_id, h.created_at, h.role, h.content, h.tool_calls, h.player_id,
               pg_temp.verify_fingerprint(h.id, h.created_at, h.role, h.content, h.tool_calls,
                                          h.player_id)
        FROM history_messages_as_of(ARRAY[session], at) h;
    END IF;
END
$$;

-- name: copy_verify_redis
COPY verify_redis (id, ordinal, digest, fingerprint) FROM STDIN;

-- name: verify_redis_duplicates
-- Members staged after the first one with the same ID: the backup never stores them.
SELECT message_id, digest
FROM (
    SELECT id::text AS message_id, digest,
           row_number() OVER (PARTITION BY id ORDER BY ordinal) AS nth
    FROM verify_redis
) AS staged
WHERE nth > 1
ORDER BY message_id;

-- name: stage_verify_stored
INSERT INTO verify_stored (id, session_id, created_at, role, content, tool_calls, player_id,
                           fingerprint)
SELECT * FROM pg_temp.verify_backup(%(id)s::uuid, %(at)s::timestamptz);

-- name: verify_compare
-- Every message of the session on either side, paired by ID: Redis's digest
-- (NULL: not in Redis) beside the stored row (NULLs: not in the backup), less
-- the pairs whose fingerprints are equal (the same canonical form: the same
-- digest), which need not be read back. The backup's side as stage_verify_stored
-- staged it (`staged`), or straight from verify_backup (COPY's parameters are
-- bound before planning: the branch not taken stops at a constant filter, and
-- the function is not called).
COPY (
    SELECT r.id::text, r.digest,
           m.id::text, m.session_id::text, m.created_at, m.role, m.content,
           m.tool_calls::text, m.player_id
    FROM (SELECT DISTINCT ON (id) id, digest, fingerprint FROM verify_redis
          ORDER BY id, ordinal) AS r
    FULL JOIN (
        SELECT * FROM verify_stored WHERE %(staged)s
        UNION ALL
        SELECT * FROM pg_temp.verify_backup(%(id)s::uuid, %(at)s::timestamptz)
        WHERE NOT %(staged)s
    ) AS m ON m.id = r.id
    WHERE (r.fingerprint = m.fingerprint) IS NOT TRUE
) TO STDOUT (FORMAT BINARY);

-- name: clear_verify_redis
-- DELETE, not TRUNCATE: verify's transaction is read-only, which allows writing
-- a temporary table's rows but not TRUNCATE. One statement each: they are sent
-- in pipeline mode, which takes one statement per query.
DELETE FROM verify_redis;

-- name: clear_verify_stored
DELETE FROM verify_stored;

-- name: prune_runs
-- Old run records go, with their per-session results (ON DELETE CASCADE).
-- Never a running run; never the backed-up sessions and messages. `keep`
-- counts finished runs per kind (newest first); with both criteria, a run
-- goes only when it meets both.
WITH ranked AS (
    SELECT id, coalesce(finished_at, created_at) AS ended,
           row_number() OVER (PARTITION BY kind ORDER BY created_at DESC, id DESC) AS newest
    FROM persistence_snapshots
    WHERE status <> 'running'
),
doomed AS (
    SELECT id FROM ranked
    WHERE (%(keep)s::int IS NULL OR newest > %(keep)s::int)
      AND (%(before)s::timestamptz IS NULL OR ended < %(before)s::timestamptz)
),
results AS (
    SELECT count(*) AS n FROM persistence_session_results r JOIN doomed d ON d.id = r.snapshot_id
),
deleted AS (
    DELETE FROM persistence_snapshots s USING doomed d WHERE s.id = d.id RETURNING s.id
)
SELECT (SELECT count(*) FROM deleted) AS runs, (SELECT n FROM results) AS session_results;

-- name: prune_resolved_kept
-- Kept-aside records go only once marked resolved, and once the run that last
-- saw them is gone (or they were last seen before the cut-off).
DELETE FROM persistence_kept_records
WHERE resolved_at IS NOT NULL
  AND (last_snapshot_id IS NULL
       OR (%(before)s::timestamptz IS NOT NULL AND last_seen_at < %(before)s::timestamptz));

-- name: try_owner_lock
-- Who drives a run (a --local process, a coordinator task) or works on one of
-- its batches holds this lock on its connection: a session-level advisory lock,
-- gone the moment its connection is (the process died, or PostgreSQL dropped
-- it). Never waits: a key held by someone else means a live owner.
SELECT pg_try_advisory_lock(%(class)s, hashtext(%(key)s)) AS locked;

-- name: release_owner_lock
SELECT pg_advisory_unlock(%(class)s, hashtext(%(key)s)) AS released;

-- name: live_owners
-- The keys whose owner lock someone holds now (in this database).
SELECT key FROM unnest(%(keys)s::text[]) AS key
WHERE EXISTS (
    SELECT 1 FROM pg_locks l
    WHERE l.locktype = 'advisory' AND l.granted AND l.objsubid = 2
      AND l.database = (SELECT oid FROM pg_database WHERE datname = current_database())
      AND l.classid = %(class)s::oid
      AND l.objid = (hashtext(key)::bigint & 4294967295)::oid
);

-- name: copy_batches
COPY persistence_run_batches (snapshot_id, batch_no, shard, session_ids) FROM STDIN;

-- name: batch
SELECT snapshot_id::text AS run_id, batch_no, shard, session_ids::text[] AS session_ids,
       dispatched_at, dispatches, started_at, starts, retry_at, last_error
FROM persistence_run_batches
WHERE snapshot_id = %(id)s AND batch_no = %(batch_no)s;

-- name: begin_batch
-- A worker begins the batch: the sessions it still has to do (no result yet).
WITH begun AS (
    UPDATE persistence_run_batches
    SET started_at = now(), starts = starts + 1, retry_at = NULL
    WHERE snapshot_id = %(id)s AND batch_no = %(batch_no)s
    RETURNING session_ids
)
SELECT sid::text AS session_id
FROM begun, unnest(begun.session_ids) AS sid
WHERE NOT EXISTS (
    SELECT 1 FROM persistence_session_results r
    WHERE r.snapshot_id = %(id)s AND r.session_id = sid
)
ORDER BY sid;

-- name: batch_retry_at
UPDATE persistence_run_batches SET retry_at = %(retry_at)s, last_error = %(error)s
WHERE snapshot_id = %(id)s AND batch_no = %(batch_no)s;

-- name: unfinished_batches
-- Batches with a session that has no result in the run yet.
SELECT b.snapshot_id::text AS run_id, b.batch_no, b.shard, b.session_ids::text[] AS session_ids,
       b.dispatched_at, b.dispatches, b.started_at, b.starts, b.retry_at, b.last_error
FROM persistence_run_batches b
WHERE b.snapshot_id = %(id)s
  AND EXISTS (
      SELECT 1 FROM unnest(b.session_ids) AS sid
      WHERE NOT EXISTS (
          SELECT 1 FROM persistence_session_results r
          WHERE r.snapshot_id = b.snapshot_id AND r.session_id = sid
      )
  )
ORDER BY b.batch_no;

-- name: batch_redispatched
UPDATE persistence_run_batches SET dispatched_at = now(), dispatches = dispatches + 1
WHERE snapshot_id = %(id)s AND batch_no = %(batch_no)s;

-- name: running_runs
SELECT id::text AS id, kind, scope, status, created_at, finished_at, session_count, message_count,
       kept_count, failed_count, duration_ms, error, forced, expected_sessions, details, as_of
FROM persistence_snapshots
WHERE status = 'running'
ORDER BY created_at;

-- name: reported_sessions
SELECT count(*) AS reported FROM persistence_session_results WHERE snapshot_id = %(id)s;

-- name: sessions_without_result
SELECT sid::text AS session_id
FROM unnest(%(ids)s::uuid[]) AS sid
WHERE NOT EXISTS (
    SELECT 1 FROM persistence_session_results r
    WHERE r.snapshot_id = %(id)s AND r.session_id = sid
)
ORDER BY sid;

-- name: status_now
-- The database's clock: every age in `dnd-client status` and the metrics is
-- measured against it, as the timestamps it compares are written by it.
SELECT clock_timestamp() AS now;

-- name: status_pending
-- Sessions changed in Redis and not yet backed up, per shard, and the oldest change.
SELECT shard, count(*) AS sessions, min(changed_at) AS oldest_change
FROM continuous_pending
GROUP BY shard
ORDER BY shard;

-- name: status_watcher
SELECT node, started_at, heartbeat_at, notifications, last_sweep_at, last_sweep_sessions,
       last_sweep_seconds
FROM continuous_watcher;

-- name: status_activity
-- What continuous backups did, per shard, since the rows began.
SELECT shard, sum(backups)::bigint AS backups, sum(sessions)::bigint AS sessions,
       sum(messages)::bigint AS messages, sum(kept_records)::bigint AS kept_records,
       sum(failures)::bigint AS failures
FROM continuous_activity
GROUP BY shard
ORDER BY shard;

-- name: status_run_counts
SELECT kind, status, count(*) AS runs
FROM persistence_snapshots
GROUP BY kind, status
ORDER BY kind, status;

-- name: last_full_backup
-- The last backup over every session that completed (partial: it completed,
-- with records kept aside). The newest first by start, as the index reads.
SELECT id::text AS id, kind, scope, status, created_at, finished_at, session_count, message_count,
       kept_count, failed_count, duration_ms, error, forced, expected_sessions, details, as_of
FROM persistence_snapshots
WHERE kind = 'backup' AND scope = 'all' AND status IN ('completed', 'partial')
ORDER BY created_at DESC
LIMIT 1;

-- name: open_kept_records
SELECT count(*) AS open FROM persistence_kept_records WHERE resolved_at IS NULL;
-- History (migrations/0010.history.sql; docs/architecture.md "History") ------

-- name: last_captures
-- The highest score each session's history has seen (its last capture's): one
-- backward probe of the primary key per session. Not DISTINCT ON over all the
-- sessions' captures (its `session_id` was the text output column, so no index
-- order either): that read and sorted every capture of each session, 8,760 a
-- year of hourly runs: 254 ms for 20 such sessions, 2.3 s for 100, 7.2 s for
-- 500, against 0.4, 2 and 7 ms this way (docs/scaling.md).
SELECT i.id::text AS session_id, c.max_score
FROM unnest(%(ids)s::uuid[]) AS i (id)
CROSS JOIN LATERAL (
    SELECT h.max_score FROM history_captures h
    WHERE h.session_id = i.id
    ORDER BY h.captured_at DESC
    LIMIT 1
) AS c;

-- name: record_captures
INSERT INTO history_captures (session_id, captured_at, snapshot_id, message_count, max_score,
                              hash_changed, added, removed, edited, late, note)
SELECT c.session_id, %(at)s, %(snapshot_id)s, c.message_count, c.max_score, c.hash_changed,
       c.added, c.removed, c.edited, c.late, %(note)s
FROM unnest(%(session_ids)s::uuid[], %(message_counts)s::bigint[], %(max_scores)s::float8[],
            %(hash_changed)s::bool[], %(added)s::int[], %(removed)s::int[], %(edited)s::int[],
            %(late)s::int[])
     AS c (session_id, message_count, max_score, hash_changed, added, removed, edited, late)
ON CONFLICT (session_id, captured_at) DO NOTHING;

-- name: save_session_versions
-- The stored rows of sessions about to be replaced, kept as they were.
INSERT INTO history_session_versions (
    session_id, replaced_at, snapshot_id, created_at, updated_at, deleted_at, name, creator_id,
    mcp_server_url, websocket_key, max_players, settings, status
)
SELECT id, %(at)s, %(snapshot_id)s, created_at, updated_at, deleted_at, name, creator_id,
       mcp_server_url, websocket_key, max_players, settings, status
FROM client_sessions
WHERE id = ANY(%(ids)s::uuid[])
ON CONFLICT (session_id, replaced_at) DO NOTHING;

-- name: history_merge_chunk
-- Before a chunk of a session is merged (merge_messages): keep the earlier
-- content of messages edited in place, mark new messages scored at or below
-- what history already saw as late, and note removed messages that are back.
WITH edited AS (
    INSERT INTO history_messages (session_id, message_id, captured_at, snapshot_id, change,
                                  created_at, role, content, tool_calls, player_id)
    SELECT m.session_id, m.id, %(at)s, %(snapshot_id)s, 'edited',
           m.created_at, m.role, m.content, m.tool_calls, m.player_id
    FROM merge_staging s
    JOIN client_messages m ON m.id = s.id AND m.session_id = s.session_id
    WHERE (m.created_at, m.role, m.content, m.tool_calls, m.player_id)
          IS DISTINCT FROM (s.created_at, s.role, s.content, s.tool_calls, s.player_id)
    RETURNING 1
),
late AS (
    INSERT INTO history_messages (session_id, message_id, captured_at, snapshot_id, change)
    SELECT s.session_id, s.id, %(at)s, %(snapshot_id)s, 'late'
    FROM merge_staging s
    WHERE floor(extract(epoch FROM s.created_at) * 1000) <= %(top)s::float8
      AND NOT EXISTS (SELECT 1 FROM client_messages m WHERE m.id = s.id)
    ORDER BY s.id  -- through the staging table's index: see create_merge_tables
    RETURNING 1
),
returned AS (
    INSERT INTO history_messages (session_id, message_id, captured_at, snapshot_id, change)
    SELECT s.session_id, s.id, %(at)s, %(snapshot_id)s, 'returned'
    FROM merge_staging s
    WHERE (SELECT h.change FROM history_messages h
           WHERE h.message_id = s.id AND h.change IN ('removed', 'returned')
           ORDER BY h.captured_at DESC, h.id DESC LIMIT 1) = 'removed'
    ORDER BY s.id  -- through the staging table's index: see create_merge_tables
    RETURNING 1
)
SELECT (SELECT count(*) FROM edited) AS edited, (SELECT count(*) FROM late) AS late,
       (SELECT count(*) FROM returned) AS returned;

-- name: record_late
INSERT INTO history_messages (session_id, message_id, captured_at, snapshot_id, change)
SELECT %(session_id)s::uuid, id, %(at)s, %(snapshot_id)s, 'late'
FROM unnest(%(ids)s::uuid[]) AS id;

-- name: history_removed
-- After a session's whole zset was merged: its stored messages not read this
-- time (merge_seen) are gone from Redis; note those not noted already.
WITH gone AS (
    INSERT INTO history_messages (session_id, message_id, captured_at, snapshot_id, change)
    SELECT m.session_id, m.id, %(at)s, %(snapshot_id)s, 'removed'
    FROM client_messages m
    WHERE m.session_id = %(session_id)s::uuid
      AND NOT EXISTS (SELECT 1 FROM merge_seen s WHERE s.id = m.id)
      AND (SELECT h.change FROM history_messages h
           WHERE h.message_id = m.id AND h.change IN ('removed', 'returned')
           ORDER BY h.captured_at DESC, h.id DESC LIMIT 1) IS DISTINCT FROM 'removed'
    RETURNING 1
)
SELECT count(*) AS removed FROM gone;

-- name: sessions_as_of
SELECT id::text AS id, name, creator_id, mcp_server_url, websocket_key, created_at, updated_at,
       max_players, settings::text AS settings, status, deleted_at
FROM history_sessions_as_of(%(ids)s::uuid[], %(at)s::timestamptz);

-- name: session_ids_as_of
-- Every session that existed at the moment, and whether it was soft-deleted then.
SELECT id::text AS id, deleted_at IS NOT NULL AS deleted
FROM history_sessions_as_of(NULL, %(at)s::timestamptz)
ORDER BY id;

-- name: restore_members_as_of
-- As restore_members, of the messages as they were at the moment.
COPY (
    SELECT session_id::text,
           convert_to(
               '{"id":"' || id::text
               || '","session_id":"' || session_id::text
               || '","created_at":"'
               || to_char(created_at AT TIME ZONE 'UTC', 'YYYY-MM-DD"T"HH24:MI:SS.US"Z"')
               || '","role":' || to_json(role)::text
               || ',"content":' || coalesce(to_json(content)::text, 'null')
               || ',"tool_calls":' || coalesce(tool_calls::text, 'null')
               || ',"player_id":' || coalesce(to_json(player_id)::text, 'null')
               || '}',
               'UTF8'),
           floor(extract(epoch FROM created_at) * 1000)::bigint
    FROM history_messages_as_of(%(ids)s::uuid[], %(at)s::timestamptz)
) TO STDOUT (FORMAT BINARY);

-- name: message_rows_as_of
COPY (
    SELECT id::text, session_id::text, created_at, role, content, tool_calls::text, player_id
    FROM history_messages_as_of(%(ids)s::uuid[], %(at)s::timestamptz)
) TO STDOUT (FORMAT BINARY);

-- name: oldest_restorable
SELECT min(captured_at) AS oldest FROM history_captures;

-- name: run_finished_at
SELECT finished_at FROM persistence_snapshots WHERE id = %(id)s::uuid;

-- name: set_run_as_of
UPDATE persistence_snapshots SET as_of = %(at)s WHERE id = %(id)s;

-- name: session_captures
SELECT captured_at, snapshot_id::text AS snapshot_id, message_count, max_score, hash_changed,
       added, removed, edited, late, note
FROM history_captures
WHERE session_id = %(id)s::uuid
ORDER BY captured_at;

-- name: session_versions
SELECT replaced_at, created_at, updated_at, deleted_at, name, creator_id, mcp_server_url,
       websocket_key, max_players, settings::text AS settings, status
FROM history_session_versions
WHERE session_id = %(id)s::uuid
ORDER BY replaced_at;

-- name: session_message_changes
SELECT captured_at, change, message_id::text AS message_id
FROM history_messages
WHERE session_id = %(id)s::uuid
ORDER BY captured_at, id;

-- name: fold_history
-- History older than `before` folds into the state at `before`: per session,
-- the last capture at or before it becomes the capture at `before` (one exactly
-- at the cut stays: moving an earlier one there would collide with it); what
-- only earlier moments needed goes (earlier captures, rows replaced by then,
-- edits and late marks by then, presence marks but each message's last one).
-- Each DELETE also says `< before` (implied: base's captures are before it):
-- without it the planner, which cannot estimate "before the session's base
-- capture", takes a third of each session's history and hash-joins the whole
-- table (measured: 21.9M captures, 2.2M session rows: a sequential scan of
-- both, 19.6 s; with it, index probes per session, see docs/scaling.md).
WITH base AS (
    SELECT DISTINCT ON (session_id) session_id, captured_at FROM history_captures
    WHERE captured_at <= %(before)s
    ORDER BY session_id, captured_at DESC
),
captures AS (
    DELETE FROM history_captures c USING base b
    WHERE c.session_id = b.session_id AND c.captured_at < b.captured_at
      AND c.captured_at < %(before)s
    RETURNING 1
),
versions AS (
    DELETE FROM history_session_versions v USING base b
    WHERE v.session_id = b.session_id AND v.replaced_at <= b.captured_at
      AND v.replaced_at < %(before)s
    RETURNING 1
),
messages AS (
    DELETE FROM history_messages h USING base b
    WHERE h.session_id = b.session_id AND h.captured_at <= b.captured_at
      AND h.captured_at < %(before)s
      AND NOT (h.change = 'removed' AND NOT EXISTS (
          SELECT 1 FROM history_messages h2
          WHERE h2.message_id = h.message_id AND h2.change IN ('removed', 'returned')
            AND h2.captured_at <= b.captured_at
            AND (h2.captured_at, h2.id) > (h.captured_at, h.id)))
    RETURNING 1
),
moved AS (
    UPDATE history_captures c SET captured_at = %(before)s
    FROM base b
    WHERE c.session_id = b.session_id AND c.captured_at = b.captured_at
    RETURNING 1
)
SELECT (SELECT count(*) FROM moved) AS sessions, (SELECT count(*) FROM captures) AS captures,
       (SELECT count(*) FROM versions) AS session_versions,
       (SELECT count(*) FROM messages) AS messages;
-- Continuous protection (worker/watch.py marks, worker/continuous.py drains).
-- LOCK ORDER: every statement that locks several continuous_pending rows locks
-- them in session_id order, or the watcher's marking and the drains' claiming
-- and releasing deadlock under load.

-- name: mark_pending
-- Sessions seen changed. A row already pending keeps its oldest change; a row a
-- drain has claimed (its backup may have read Redis before this change) gets
-- changed_again, so it stays pending after that backup.
-- A session backed up less than %(pause)s seconds ago waits for the rest of
-- that pause (retry_after): written without a break, it is backed up every so
-- often, not after every write.
INSERT INTO continuous_pending (session_id, shard, changed_at, retry_after)
SELECT c.id, c.shard, c.changed_at,
       CASE WHEN w.updated_at > now() - make_interval(secs => %(pause)s)
            THEN w.updated_at + make_interval(secs => %(pause)s) END
FROM unnest(%(ids)s::uuid[], %(shards)s::int[], %(times)s::timestamptz[])
    AS c (id, shard, changed_at)
LEFT JOIN backup_watermarks w ON w.session_id = c.id
ORDER BY c.id
ON CONFLICT (session_id) DO UPDATE SET
    changed_at = CASE WHEN continuous_pending.claimed_by IS NULL
                      THEN least(continuous_pending.changed_at, EXCLUDED.changed_at)
                      ELSE continuous_pending.changed_at END,
    changed_again = CASE WHEN continuous_pending.claimed_by IS NULL
                         THEN continuous_pending.changed_again
                         ELSE coalesce(continuous_pending.changed_again, EXCLUDED.changed_at) END;

-- name: drainable_shards
-- Shards with sessions a drain could take now: unclaimed, or claimed by a
-- drain whose owner lock is gone (its worker died), and not backing off.
SELECT DISTINCT p.shard
FROM continuous_pending p
WHERE (p.retry_after IS NULL OR p.retry_after <= now())
  AND (p.claimed_by IS NULL OR NOT EXISTS (
    SELECT 1 FROM pg_locks l
    WHERE l.locktype = 'advisory' AND l.granted AND l.objsubid = 2
      AND l.database = (SELECT oid FROM pg_database WHERE datname = current_database())
      AND l.classid = %(class)s::oid
      AND l.objid = (hashtext(p.claimed_by)::bigint & 4294967295)::oid
  ))
ORDER BY p.shard;

-- name: claim_pending
-- A drain takes up to %(limit)s sessions of its shard (see drainable_shards),
-- oldest change first; rows locked by another statement are skipped, not
-- waited for. The rows are locked in session_id order (the LOCK ORDER above).
WITH candidates AS (
    SELECT p.session_id FROM continuous_pending p
    WHERE p.shard = %(shard)s
      AND (p.retry_after IS NULL OR p.retry_after <= now())
      AND (p.claimed_by IS NULL OR NOT EXISTS (
        SELECT 1 FROM pg_locks l
        WHERE l.locktype = 'advisory' AND l.granted AND l.objsubid = 2
          AND l.database = (SELECT oid FROM pg_database WHERE datname = current_database())
          AND l.classid = %(class)s::oid
          AND l.objid = (hashtext(p.claimed_by)::bigint & 4294967295)::oid
      ))
    ORDER BY p.changed_at
    LIMIT %(limit)s
), locked AS (
    SELECT p.session_id FROM continuous_pending p
    WHERE p.session_id IN (SELECT session_id FROM candidates)
    ORDER BY p.session_id
    FOR UPDATE SKIP LOCKED
)
UPDATE continuous_pending p
SET claimed_by = %(token)s, claimed_at = now(), changed_again = NULL
FROM locked
WHERE p.session_id = locked.session_id
RETURNING p.session_id::text AS session_id;

-- name: lock_claimed
-- Before a multi-row UPDATE or DELETE of a drain's rows: lock them in
-- session_id order (the LOCK ORDER above).
SELECT session_id FROM continuous_pending
WHERE claimed_by = %(token)s AND session_id = ANY(%(ids)s::uuid[])
ORDER BY session_id
FOR UPDATE;

-- name: release_done
-- Backed up, and nothing changed since the claim: done (after lock_claimed).
DELETE FROM continuous_pending
WHERE claimed_by = %(token)s AND session_id = ANY(%(ids)s::uuid[]) AND changed_again IS NULL;

-- name: release_changed_again
-- Backed up, but changed again meanwhile: pending from that change, after a
-- short pause (%(pause)s seconds): a session written without a break is backed
-- up every so often, not without a break. After release_done, same transaction.
UPDATE continuous_pending
SET claimed_by = NULL, claimed_at = NULL, changed_at = changed_again, changed_again = NULL,
    failures = 0, retry_after = now() + make_interval(secs => %(pause)s)
WHERE claimed_by = %(token)s AND session_id = ANY(%(ids)s::uuid[]);

-- name: release_failed
-- Not backed up: the rows stay pending (their oldest change unchanged), and
-- wait %(backoff)s seconds more for each failure in a row, at most 60.
-- %(backoff)s = 0 (a drain that met a transient error): at once, by anyone.
UPDATE continuous_pending
SET claimed_by = NULL, claimed_at = NULL,
    changed_again = NULL,
    failures = failures + %(failed)s,
    retry_after = now() + make_interval(secs => least(60, %(backoff)s * power(2, failures)))
WHERE claimed_by = %(token)s AND session_id = ANY(%(ids)s::uuid[]);

-- name: add_activity
INSERT INTO continuous_activity AS a (minute, shard, backups, sessions, messages, kept_records, failures)
VALUES (date_trunc('minute', now()), %(shard)s, %(backups)s, %(sessions)s, %(messages)s,
        %(kept)s, %(failures)s)
ON CONFLICT (minute, shard) DO UPDATE SET
    backups = a.backups + EXCLUDED.backups,
    sessions = a.sessions + EXCLUDED.sessions,
    messages = a.messages + EXCLUDED.messages,
    kept_records = a.kept_records + EXCLUDED.kept_records,
    failures = a.failures + EXCLUDED.failures;

-- name: watcher_heartbeat
INSERT INTO continuous_watcher AS w (id, node, started_at, heartbeat_at, notifications)
VALUES (true, %(node)s, %(started_at)s, now(), %(notifications)s)
ON CONFLICT (id) DO UPDATE SET
    node = EXCLUDED.node, started_at = EXCLUDED.started_at,
    heartbeat_at = now(), notifications = EXCLUDED.notifications;

-- name: watcher_swept
UPDATE continuous_watcher
SET last_sweep_at = now(), last_sweep_sessions = %(sessions)s,
    last_sweep_seconds = %(seconds)s, heartbeat_at = now()
WHERE node = %(node)s;


-- name: relaxed_commit
-- For continuous_pending / continuous_activity / continuous_watcher only: their
-- rows may be lost in a crash of PostgreSQL without losing a change (a lost
-- mark is found again by the sweep, since the watermark still differs; a lost
-- release means one backup more), so their commits need not wait for the disk.
SET LOCAL synchronous_commit = off;
